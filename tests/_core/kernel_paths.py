"""Fixtures the kernel tests share (imported by name): each kernel path this CPU has, and thread
partitioning forced on; and the FATReLU threshold the FFN tests use."""
import numpy as np
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


def fatrelu_threshold(pre, scale, start=0.25):
    """A FATReLU threshold no pre-activation lies within float32 rounding of (there the step
    makes the kernel and the twin differ by the whole value, rightly)."""
    p = np.float32(start)
    while pre.size and np.min(np.abs(pre - p) / (scale + 1e-30)) < 1e-3:
        p = np.float32(p + 0.0137)
    return float(p)
