"""The flash loader (flashrt/_core/loader.pyx) against plain file reads.

Oracle: np.fromfile at the same offsets. Every backend (pread pool, io_uring
where the kernel allows it, the pure-Python twin), O_DIRECT and buffered,
coalescing on and off, rows of odd byte lengths; then faults: truncated
files, injected EIO / EINTR / EAGAIN, fd and thread leaks.
"""
import errno
import os
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt._core import _reference_loader
from flashrt._core import loader as cloader
from flashrt.errors import FlashIOError

URING_OK, URING_WHY = cloader.uring_available()
needs_uring = pytest.mark.skipif(not URING_OK, reason=f"io_uring unavailable here: {URING_WHY}")

FILE_BYTES = 3 * 1024 * 1024 + 1234          # not a multiple of the 4096 alignment
ROW_BYTES = (3456, 2304, 1000, 8192)           # SmolLM2 f16 bundle, f32 (576,), odd, aligned

# (name, backend, direct) of every compiled configuration; uring ones skipped when absent
CONFIGS = [("pread-direct", "pread", True), ("pread-buffered", "pread", False)]
if URING_OK:
    CONFIGS += [("uring-direct", "uring", True), ("uring-buffered", "uring", False)]
ALL_BACKENDS = [pytest.param("pread", id="pread"),
                pytest.param("uring", id="uring", marks=needs_uring)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "ffn.bin"
    rng = np.random.default_rng(1234)
    rng.integers(0, 256, FILE_BYTES, dtype=np.uint8).tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def loaders(data_file):
    """One open Loader per (config, coalesce, chunk) so hypothesis examples are cheap."""
    made = {}

    def get(name, coalesce=True, chunk=256 * 1024, max_gap=4096):
        key = (name, coalesce, chunk, max_gap)
        if key not in made:
            if name == "reference":
                made[key] = _reference_loader.Loader(data_file, coalesce=coalesce,
                                                     chunk_bytes=chunk, max_gap=max_gap)
            else:
                _, backend, direct = next(c for c in CONFIGS if c[0] == name)
                made[key] = cloader.Loader(data_file, backend=backend, direct=direct,
                                           coalesce=coalesce, chunk_bytes=chunk,
                                           max_gap=max_gap, n_threads=4, queue_depth=8)
        return made[key]

    yield get
    for ld in made.values():
        ld.close()


def expected_rows(path, layer_offset, row_bytes, ids):
    """The oracle: each row read on its own with np.fromfile."""
    out = np.empty((len(ids), row_bytes), np.uint8)
    for j, i in enumerate(ids):
        out[j] = np.fromfile(path, np.uint8, count=row_bytes, offset=layer_offset + int(i) * row_bytes)
    return out


@st.composite
def row_requests(draw):
    row_bytes = draw(st.sampled_from(ROW_BYTES))
    layer_offset = draw(st.sampled_from([0, 4096, 3 * 4096, 777]))
    n_rows = (FILE_BYTES - layer_offset) // row_bytes
    # dense runs, sparse picks and the last rows of the file (EOF alignment tail)
    kind = draw(st.sampled_from(["sparse", "runs", "tail"]))
    if kind == "sparse":
        ids = draw(st.sets(st.integers(0, n_rows - 1), max_size=60))
    elif kind == "runs":
        ids = set()
        for _ in range(draw(st.integers(1, 6))):
            a = draw(st.integers(0, n_rows - 1))
            ids.update(range(a, min(n_rows, a + draw(st.integers(1, 40)))))
    else:
        ids = draw(st.sets(st.integers(max(0, n_rows - 8), n_rows - 1), min_size=1))
    return layer_offset, row_bytes, np.array(sorted(ids), dtype=np.int64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=row_requests(),
       name=st.sampled_from([c[0] for c in CONFIGS] + ["reference"]),
       coalesce=st.booleans(),
       chunk=st.sampled_from([4096, 16384, 256 * 1024]),
       max_gap=st.sampled_from([0, 4096, 20000]),
       dtype=st.sampled_from([np.float16, np.float32, np.uint8]),
       dest_shift=st.sampled_from([0, 16, 4096]))
def test_read_rows_matches_fromfile(data_file, loaders, req, name, coalesce, chunk, max_gap, dtype,
                                    dest_shift):
    layer_offset, row_bytes, ids = req
    itemsize = np.dtype(dtype).itemsize
    if row_bytes % itemsize:
        dtype, itemsize = np.uint8, 1
    ld = loaders(name, coalesce, chunk, max_gap)
    # dest at a 4096-aligned address (O_DIRECT reads may land in place) or shifted off it
    raw = cloader.aligned_empty((len(ids) * row_bytes + dest_shift,), np.uint8)
    dest = raw[dest_shift:].view(dtype).reshape(len(ids), row_bytes // itemsize)  # (m, row_elems)
    dest[:] = 7
    before = ld.stats()
    ld.read_rows(layer_offset, row_bytes, ids, dest)
    after = ld.stats()
    np.testing.assert_array_equal(dest.view(np.uint8).reshape(len(ids), row_bytes),
                                  expected_rows(data_file, layer_offset, row_bytes, ids))
    useful = after["bytes_useful"] - before["bytes_useful"]
    assert useful == len(ids) * row_bytes
    assert after["bytes_read"] - before["bytes_read"] >= useful
    if len(ids) and not coalesce and name != "reference":
        assert after["n_reads"] - before["n_reads"] >= len(ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([c[0] for c in CONFIGS] + ["reference"]),
       offset=st.integers(0, FILE_BYTES - 1),
       length=st.integers(0, 600_000),
       aligned=st.booleans(),
       chunk=st.sampled_from([4096, 65536, 256 * 1024]))
def test_read_range_matches_fromfile(data_file, loaders, name, offset, length, aligned, chunk):
    length = min(length, FILE_BYTES - offset)
    ld = loaders(name, True, chunk)
    mod = cloader if name != "reference" else _reference_loader
    dest = mod.aligned_empty((length,), np.uint8) if aligned else np.empty(length, np.uint8)
    ld.read_range(offset, dest)
    np.testing.assert_array_equal(dest, np.fromfile(data_file, np.uint8, count=length, offset=offset))


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_read_range_whole_layer_into_aligned_buffer(data_file, loaders, name):
    ld = loaders(name)
    dest = cloader.aligned_empty((1536, 576), np.float16)      # (n_neurons, dim) one 1.7 MB layer
    ld.read_range(8192, dest)
    ref = np.fromfile(data_file, np.float16, count=dest.size, offset=8192).reshape(dest.shape)
    np.testing.assert_array_equal(dest.view(np.uint16), ref.view(np.uint16))


def test_coalescing_and_gap_counts(data_file):
    with cloader.Loader(data_file, backend="pread", direct=False, max_gap=1000) as ld:
        dest = np.empty((100, 1000), np.uint8)
        ld.read_rows(0, 1000, np.arange(100), dest)
        assert ld.stats()["n_reads"] == 1                   # one run, one read
        ld.reset_stats()
        ld.read_rows(0, 1000, np.arange(0, 200, 2), dest)    # gaps of one row = 1000 bytes
        assert ld.stats()["n_reads"] == 1
        assert ld.stats()["bytes_read"] == 199 * 1000        # the gaps read and discarded
        np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 1000, np.arange(0, 200, 2)))
        ld.max_gap = 999
        ld.reset_stats()
        ld.read_rows(0, 1000, np.arange(0, 200, 2), dest)
        assert ld.stats()["n_reads"] == 100
        ld.coalesce = False
        ld.reset_stats()
        ld.read_rows(0, 1000, np.arange(100), dest)
        assert ld.stats()["n_reads"] == 100
    with cloader.Loader(data_file, backend="pread", direct=True, chunk_bytes=16384) as ld:
        dest = np.empty((100, 1000), np.uint8)
        ld.read_rows(0, 1000, np.arange(100), dest)       # 100_000 bytes -> 25 blocks -> 7 chunks
        st_ = ld.stats()
        assert st_["n_reads"] == 7 and st_["bytes_read"] == 25 * 4096
        np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 1000, np.arange(100)))


def test_properties_and_validation(data_file):
    with cloader.Loader(data_file, backend="pread") as ld:
        assert ld.backend == "pread" and ld.direct is True and ld.file_size == FILE_BYTES
        dest = np.empty((3, 1000), np.uint8)
        with pytest.raises(ValueError, match="sorted"):
            ld.read_rows(0, 1000, np.array([3, 2, 5]), dest)
        with pytest.raises(ValueError, match="sorted"):
            ld.read_rows(0, 1000, np.array([2, 2, 5]), dest)
        with pytest.raises(ValueError, match="sorted"):
            ld.read_rows(0, 1000, np.array([-1, 2, 5]), dest)
        with pytest.raises(ValueError, match="rows of 1000 bytes"):
            ld.read_rows(0, 1000, np.array([1, 2]), dest)
        with pytest.raises(ValueError, match="C-contiguous"):
            ld.read_rows(0, 1000, np.array([1, 2, 3]), np.empty((3, 2000), np.uint8)[:, ::2])
        with pytest.raises(FlashIOError, match="beyond the end"):
            ld.read_rows(0, 1000, np.array([1, FILE_BYTES // 1000]), np.empty((2, 1000), np.uint8))
        with pytest.raises(FlashIOError, match="only"):
            ld.read_range(FILE_BYTES - 10, np.empty(11, np.uint8))
        ld.read_rows(0, 1000, np.array([], np.int64), np.empty((0, 1000), np.uint8))
    assert ld.closed
    with pytest.raises(ValueError, match="closed"):
        ld.read_rows(0, 1000, np.array([1]), np.empty((1, 1000), np.uint8))
    with pytest.raises(ValueError, match="backend"):
        cloader.Loader(data_file, backend="mmap")
    with pytest.raises(FileNotFoundError):
        cloader.Loader(data_file + ".missing")


def test_direct_fallback_warns(data_file):
    with pytest.warns(RuntimeWarning, match="O_DIRECT"):
        ld = cloader.Loader(data_file, backend="pread", _simulate_direct_einval=True)
    with ld:
        assert ld.direct is False
        dest = np.empty((2, 3456), np.uint8)
        ld.read_rows(4096, 3456, np.array([5, 9]), dest)
        np.testing.assert_array_equal(dest, expected_rows(data_file, 4096, 3456, [5, 9]))


def test_env_overrides_auto(data_file, monkeypatch):
    monkeypatch.setenv("FLASHRT_IO", "pread")
    with cloader.Loader(data_file) as ld:
        assert ld.backend == "pread"
    with cloader.Loader(data_file, backend="pread") as ld:
        assert ld.backend == "pread"
    monkeypatch.setenv("FLASHRT_IO", "uring")
    if URING_OK:
        with cloader.Loader(data_file) as ld:
            assert ld.backend == "uring"
    else:
        with pytest.warns(RuntimeWarning, match="uring"):
            ld = cloader.Loader(data_file)
        assert ld.backend == "pread"
        ld.close()
        with pytest.raises(OSError, match="io_uring"):
            cloader.Loader(data_file, backend="uring")
    monkeypatch.delenv("FLASHRT_IO")
    with cloader.Loader(data_file) as ld:
        assert ld.backend == ("uring" if URING_OK else "pread")


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_truncated_file_raises_not_garbage(tmp_path, backend, direct):
    path = tmp_path / "trunc.bin"
    data = np.random.default_rng(5).integers(0, 256, 200_000, dtype=np.uint8)
    data.tofile(path)
    with cloader.Loader(path, backend=backend, direct=direct) as ld:
        os.truncate(path, 100_000)                    # shrinks under the open loader
        dest = np.zeros((3, 3456), np.uint8)
        with pytest.raises(FlashIOError) as ei:
            ld.read_rows(0, 3456, np.array([1, 30, 50]), dest)   # row 50 ends at 176256
        e = ei.value
        assert e.errno == errno.EIO and isinstance(e, OSError)
        assert str(path) in str(e) and "offset" in str(e) and "end of file" in str(e)
        # rows that still exist read fine afterwards
        ld.read_rows(0, 3456, np.array([1, 2, 20]), dest)
        np.testing.assert_array_equal(dest, np.stack([data[i * 3456:(i + 1) * 3456] for i in (1, 2, 20)]))
    # opened after the truncation: the bounds check refuses before reading
    with cloader.Loader(path, backend=backend, direct=direct) as ld:
        with pytest.raises(FlashIOError, match="beyond the end") as ei:
            ld.read_rows(0, 3456, np.array([50]), np.empty((1, 3456), np.uint8))
        assert str(path) in str(ei.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS + [pytest.param("reference", id="reference")])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_injected_eio_then_still_usable(data_file, backend, direct):
    mk = (_reference_loader.Loader if backend == "reference"
          else lambda p, **kw: cloader.Loader(p, backend=backend, **kw))
    ids = np.array([3, 4, 5, 100, 400, 401, 800])
    ref = expected_rows(data_file, 4096, 2304, ids)
    with mk(data_file, direct=direct, chunk_bytes=4096) as ld:
        dest = np.zeros((len(ids), 2304), np.uint8)
        ld._inject_fault(2, errno.EIO)
        with pytest.raises(FlashIOError) as ei:
            ld.read_rows(4096, 2304, ids, dest)
        e = ei.value
        assert e.errno == errno.EIO and e.filename == data_file
        assert data_file in str(e) and "offset" in str(e) and "Input/output error" in str(e)
        ld.read_rows(4096, 2304, ids, dest)         # the fault was one-shot: works again
        np.testing.assert_array_equal(dest, ref)
        ld._inject_fault(0, errno.ENOSPC)            # the first read of read_range
        with pytest.raises(FlashIOError) as ei:
            ld.read_range(100, np.empty(50_000, np.uint8))
        assert ei.value.errno == errno.ENOSPC


@pytest.mark.parametrize("backend", ALL_BACKENDS + [pytest.param("reference", id="reference")])
@pytest.mark.parametrize("err", [errno.EINTR, errno.EAGAIN], ids=["EINTR", "EAGAIN"])
def test_injected_eintr_is_retried(data_file, backend, err):
    mk = (_reference_loader.Loader if backend == "reference"
          else lambda p, **kw: cloader.Loader(p, backend=backend, **kw))
    ids = np.arange(0, 300, 3)
    with mk(data_file, chunk_bytes=4096) as ld:
        dest = np.zeros((len(ids), 3456), np.uint8)
        ld._inject_fault(1, err, count=5)
        ld.read_rows(0, 3456, ids, dest)
        np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 3456, ids))
        assert ld.stats()["n_retries"] == 5          # every injected failure was retried
        d2 = np.zeros(300_001, np.uint8)
        ld._inject_fault(0, err, count=3)
        ld.read_range(5, d2)
        np.testing.assert_array_equal(d2, np.fromfile(data_file, np.uint8, count=300_001, offset=5))
        assert ld.stats()["n_retries"] == 8


def _n_fds():
    return len(os.listdir("/proc/self/fd"))


def _n_threads():
    return len(os.listdir("/proc/self/task"))


def test_no_fd_or_thread_leaks(data_file):
    dest = np.empty((4, 1000), np.uint8)
    ids = np.array([1, 2, 9, 70])
    fds, threads = _n_fds(), _n_threads()
    for i in range(60):
        for backend in ["pread"] + (["uring"] if URING_OK else []):
            with cloader.Loader(data_file, backend=backend, n_threads=4) as ld:
                ld.read_rows(0, 1000, ids, dest)
                if i % 10 == 0:
                    ld._inject_fault(0, errno.EIO)
                    with pytest.raises(FlashIOError):
                        ld.read_rows(0, 1000, ids, dest)
            ld.close()                                        # idempotent
        # never closed explicitly: __dealloc__ must release everything
        ld = cloader.Loader(data_file, backend="pread", n_threads=3)
        ld.read_rows(0, 1000, ids, dest)
        del ld
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20):
            cloader.Loader(data_file, _simulate_direct_einval=True).close()
    assert _n_fds() == fds
    assert _n_threads() == threads


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shared_loader_across_python_threads(data_file, backend):
    rng = np.random.default_rng(9)
    with cloader.Loader(data_file, backend=backend, n_threads=4) as ld:
        errors = []

        def work(seed):
            r = np.random.default_rng(seed)
            try:
                for _ in range(20):
                    ids = np.sort(r.choice(800, 50, replace=False))
                    dest = np.empty((50, 3456), np.uint8)
                    ld.read_rows(0, 3456, ids, dest)
                    np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 3456, ids))
            except Exception as e:          # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=work, args=(int(rng.integers(1 << 30)),)) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors


# ---------------------------------------------------------------- reads in the background
ASYNC_NAMES = [c[0] for c in CONFIGS] + ["reference"]


@pytest.mark.parametrize("name", ASYNC_NAMES)
def test_submitted_reads_land_as_blocking_ones_do(data_file, loaders, name):
    ld = loaders(name)
    ids = np.array([0, 1, 2, 7, 300, 301, 640])
    dest = np.zeros((len(ids), 3456), np.uint8)
    ld.submit_rows(4096, 3456, ids, dest)
    flight, waited = ld.wait()
    np.testing.assert_array_equal(dest, expected_rows(data_file, 4096, 3456, ids))
    assert 0 <= waited and 0 <= flight
    assert ld.wait() == (0, 0)                       # nothing in flight any more
    for offset, n, aligned in [(100, 50_001, False), (8192, 1 << 20, True), (4096 + 77, 300_000, True)]:
        buf = cloader.aligned_empty(n, np.uint8) if aligned else np.zeros(n, np.uint8)
        ld.submit_range(offset, buf)
        ld.wait()
        np.testing.assert_array_equal(buf, np.fromfile(data_file, np.uint8, count=n, offset=offset))
    # a blocking read (or another submit) issued while a batch is in flight waits for it first
    a = np.zeros((3, 1000), np.uint8)
    b = np.zeros(20_000, np.uint8)
    ld.submit_rows(0, 1000, np.array([5, 6, 900]), a)
    ld.read_range(12345, b)
    assert not ld.in_flight
    np.testing.assert_array_equal(a, expected_rows(data_file, 0, 1000, [5, 6, 900]))
    np.testing.assert_array_equal(b, np.fromfile(data_file, np.uint8, count=20_000, offset=12345))


@pytest.mark.parametrize("backend", ALL_BACKENDS + [pytest.param("reference", id="reference")])
def test_a_submitted_read_error_surfaces_in_wait(data_file, backend):
    mk = (_reference_loader.Loader if backend == "reference"
          else lambda p, **kw: cloader.Loader(p, backend=backend, **kw))
    ids = np.array([3, 4, 5, 100, 400])
    with mk(data_file, chunk_bytes=4096) as ld:
        dest = np.zeros((len(ids), 2304), np.uint8)
        ld._inject_fault(1, errno.EIO)
        ld.submit_rows(4096, 2304, ids, dest)        # issued: the failure comes with wait()
        with pytest.raises(FlashIOError) as ei:
            ld.wait()
        assert ei.value.errno == errno.EIO and data_file in str(ei.value)
        assert not ld.in_flight
        ld.submit_rows(4096, 2304, ids, dest)        # usable again
        ld.wait()
        np.testing.assert_array_equal(dest, expected_rows(data_file, 4096, 2304, ids))
        with pytest.raises(ValueError, match="sorted"):   # bad arguments fail at submit
            ld.submit_rows(0, 100, np.array([5, 2]), np.zeros((2, 100), np.uint8))
        ld.read_rows(0, 100, np.array([1]), np.zeros((1, 100), np.uint8))  # the lock was released


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_wait_time_is_measured_apart_from_flight_time(data_file, backend):
    """Work done between submit and wait hides the read: the loader counts the time the
    reads were in flight (ns_io) and, apart, the time the caller was blocked (ns_wait)."""
    import time
    ids = np.arange(0, 700, 2)
    with cloader.Loader(data_file, backend=backend, n_threads=4) as ld:
        dest = np.zeros((len(ids), 4096), np.uint8)
        ld.read_rows(0, 4096, ids, dest)             # blocking: waits for all of it
        s = ld.stats()
        assert s["ns_wait"] == s["ns_io"] > 0
        ld.reset_stats()
        t0 = time.perf_counter_ns()
        ld.submit_rows(0, 4096, ids, dest)
        time.sleep(0.2)                              # far longer than 1.4 MB takes
        flight, waited = ld.wait()
        s = ld.stats()
        assert s["ns_io"] == flight and s["ns_wait"] == waited and s["n_async"] == 1
        assert flight < 0.2e9 and waited < flight
        a, b = ld.last_batch                         # the batch's interval, on perf_counter's clock
        assert b - a == flight and t0 <= a < b < t0 + 0.2e9
        np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 4096, ids))


def test_close_with_a_read_in_flight_lets_it_land(data_file):
    threads = _n_threads()
    for backend in ["pread"] + (["uring"] if URING_OK else []):
        for _ in range(5):
            ld = cloader.Loader(data_file, backend=backend, n_threads=4)
            dest = np.zeros((200, 4096), np.uint8)
            ld.submit_rows(0, 4096, np.arange(200), dest)
            ld.close()                               # joins the read thread after its batch
            assert ld.closed and not ld.in_flight
            np.testing.assert_array_equal(dest, expected_rows(data_file, 0, 4096, range(200)))
            ld = cloader.Loader(data_file, backend=backend, n_threads=2)
            ld.submit_range(0, np.zeros(1 << 20, np.uint8))
            del ld                                   # __dealloc__ too
    assert _n_threads() == threads
