"""Overlapped flash decode (flashrt/ffn/flash.py, overlap=True): the missing rows are read in
the background while the kernel computes over the rows already cached. Oracle: the serial
path (read, then compute) on the same model and the same selections, which must give the same
logits bit for bit, on every tiny model and every storage type; and the kernel with a wait
against the kernel without one."""

import numpy as np
import pytest

import flashrt
from flashrt._core import PURE, kernels
from flashrt._core import loader as cloader

from conftest import HF_NAMES, convert_hf_fixtures

STORAGE = ["float32", "float16", "q8_0", "q4_0", "q4_1"]


@pytest.fixture
def small_chunks():
    """Split even the tiny models' FFNs into many kernel chunks, so some are computed while
    the reads are in flight (SmolLM2-sized layers split on their own)."""
    if PURE:
        yield
        return
    old = kernels._set_chunk_elems(256)
    yield
    kernels._set_chunk_elems(0)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(name, storage) -> converted model directory."""
    return convert_hf_fixtures(tmp_path_factory.mktemp("overlap"), STORAGE)


def decode(g, ids, overlap):
    g.ffn.overlap = overlap
    g._reset()
    logits = np.stack([g.model.forward(np.array([t], dtype=np.int64), g.kv)[-1] for t in ids])
    return logits, g.ffn.decode_stats()


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("name", HF_NAMES)
def test_overlapped_decode_is_bit_for_bit_the_serial_one(stored, small_chunks, name, storage):
    ids = np.random.default_rng(0).integers(0, 200, 24)
    # the oracle selects the true top half per token; window 2 keeps reads coming every token
    with flashrt.Generator(stored[name, storage], mode="flash", select="oracle", sparsity=0.5,
                           window=2) as g:
        g.ffn.start_decode()
        serial, s_stats = decode(g, ids, overlap=False)
        g.ffn.start_decode()
        over, o_stats = decode(g, ids, overlap=True)
    assert np.array_equal(serial, over), f"{name} {storage}: max diff {np.abs(serial - over).max()}"
    assert np.isfinite(over).all()
    assert s_stats["neurons_read_per_token"] == o_stats["neurons_read_per_token"] > 0
    assert s_stats["neurons_overlapped_per_token"] == 0
    assert s_stats["ms_io_wait_per_token"] == pytest.approx(s_stats["ms_io_per_token"])
    if not PURE:  # rows computed while their neighbours were being read
        assert o_stats["neurons_overlapped_per_token"] > 0


@pytest.mark.skipif(PURE, reason="the compiled kernel's chunked wait")
@pytest.mark.parametrize("storage", STORAGE)
def test_kernel_with_a_wait_equals_the_kernel_without(tmp_path, small_chunks, storage):
    """ffn_rows(n_ready=k, wait=loader.waiter()) while rows [k, n) are being read into place
    gives out and h bit for bit as ffn_rows over the finished rows."""
    rng = np.random.default_rng(3)
    d, n, k = 64, 300, 170
    qtype = None if storage in ("float32", "float16") else storage
    if qtype is None:
        rows = rng.standard_normal((n, 3 * d)).astype(storage)
    else:
        from flashrt.quant import quantize
        rows = np.concatenate([quantize(rng.standard_normal((n, d)).astype(np.float32), qtype)
                               for _ in range(3)], axis=1)
    path = tmp_path / "rows.bin"
    rows.tofile(path)
    x = rng.standard_normal(d).astype(np.float32)
    want, h_want = np.empty(d, np.float32), np.empty(n, np.float32)
    kernels.ffn_rows(rows, x, want, True, "silu", None, h_want, 2, qtype)
    got, h_got = np.empty(d, np.float32), np.empty(n, np.float32)
    work = rows.copy()
    work[k:] = 0                                          # what the slots held before the read
    with cloader.Loader(str(path), n_threads=4) as ld:
        ld.submit_rows(0, rows[0].nbytes, np.arange(k, n), work[k:])
        kernels.ffn_rows(work, x, got, True, "silu", None, h_got, 2, qtype, n_ready=k, wait=ld.waiter())
        ld.wait()
    assert np.array_equal(got, want) and np.array_equal(h_got, h_want)
    assert 0 < kernels.ffn_ready_rows(n, d, True, k) <= k
