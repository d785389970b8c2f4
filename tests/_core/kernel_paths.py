"""Fixtures the kernel tests share (imported by name): each kernel path this CPU has, and thread
partitioning forced on."""
import pytest

from flashrt._core import kernels

PATHS = ["scalar"] + (["avx2"] if kernels.cpu_features()["avx2_available"] else [])


@pytest.fixture(params=PATHS)
def path(request):
    assert kernels.set_path(request.param) == request.param
    yield request.param
    kernels.set_path("auto")


@pytest.fixture
def threaded():
    """Let any problem size split across threads, so small odd shapes exercise the partitioning."""
    kernels._set_chunk_elems(1)
    yield
    kernels._set_chunk_elems(0)
