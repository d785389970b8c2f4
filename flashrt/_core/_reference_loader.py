"""Pure-Python twin of flashrt/_core/loader.pyx: same API, plain os.pread,
buffered (page cache), one thread. The oracle for tests and a fallback when
the compiled core is missing; slow, but simple enough to be obviously right."""
import errno
import os
import time

import numpy as np

DEFAULT_PREAD_THREADS = 1
DEFAULT_QUEUE_DEPTH = 1
DEFAULT_CHUNK_BYTES = 256 * 1024
DEFAULT_MAX_GAP = 4096
ALIGNMENT = 4096


def _flash_io_error():
    try:
        from flashrt.errors import FlashIOError  # _core imports nothing of flashrt at import time
        return FlashIOError
    except ImportError:
        return OSError


def uring_available():
    return False, "the pure-Python reference loader has no io_uring backend"


def aligned_empty(shape, dtype, alignment=ALIGNMENT):
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + n].view(dt).reshape(shape)


def _no_wait():
    """The twin's waiter: its submitted reads are done before submit returns."""


class Loader:
    """Same constructor as the compiled Loader; n_threads, backend, direct and
    queue_depth are accepted and ignored (always buffered, one reader)."""

    def __init__(self, path, n_threads=0, backend="auto", direct=True,
                 queue_depth=DEFAULT_QUEUE_DEPTH, chunk_bytes=DEFAULT_CHUNK_BYTES,
                 coalesce=True, max_gap=DEFAULT_MAX_GAP, _simulate_direct_einval=False):
        if backend not in ("auto", "pread", "uring"):
            raise ValueError(f"backend must be 'auto', 'pread' or 'uring', not {backend!r}")
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.file_size = os.fstat(self.fd).st_size
        self.direct = False
        self.backend = "reference"
        self.n_threads = 1
        self.queue_depth = 1
        self.alignment = ALIGNMENT
        self.chunk_bytes = chunk_bytes
        self.coalesce = coalesce
        self.max_gap = max_gap
        self._fault = None    # [countdown, remaining, errno]
        self._pending_error = None  # a submitted read's error, raised by wait()
        self._pending_ns = 0
        self.reset_stats()

    # -- the one primitive -------------------------------------------------
    def _pread(self, offset, length):
        out = bytearray()
        while len(out) < length:
            f = self._fault
            if f is not None and f[1] > 0:
                f[0] -= 1
                if f[0] < 0:
                    f[1] -= 1
                    if f[2] in (errno.EINTR, errno.EAGAIN):
                        self.st["n_retries"] += 1
                        continue
                    exc = _flash_io_error()(f[2], f"cannot read {self.path}: {os.strerror(f[2])} "
                                                  f"reading {length} bytes at offset {offset} "
                                                  f"(errno {f[2]})")
                    exc.filename = self.path
                    raise exc
            try:
                b = os.pread(self.fd, length - len(out), offset + len(out))
            except InterruptedError:
                continue
            if not b:
                exc = _flash_io_error()(
                    errno.EIO, f"unexpected end of file in {self.path}: wanted {length} bytes at "
                               f"offset {offset}, the file ended after {len(out)}")
                exc.filename = self.path
                raise exc
            out += b
        self.st["n_reads"] += 1
        self.st["bytes_read"] += length
        return bytes(out)

    def _check(self):
        if self.fd < 0:
            raise ValueError(f"Loader for {self.path} is closed")

    def read_rows(self, layer_offset, row_bytes, ids, dest, slots=None):
        self._check()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("ids must be 1-D")
        m = len(ids)
        if not isinstance(dest, np.ndarray) or not dest.flags.c_contiguous or not dest.flags.writeable:
            raise ValueError("dest must be a C-contiguous writable numpy array")
        if slots is None:
            if dest.ndim == 0 or dest.shape[0] != m or dest.nbytes != m * row_bytes:
                raise ValueError(f"dest must hold {m} rows of {row_bytes} bytes")
            pos = np.arange(m)
        else:
            pos = np.ascontiguousarray(slots, dtype=np.int64)
            if pos.ndim != 1 or pos.shape[0] != m:
                raise ValueError(f"slots must be 1-D with one dest row per id ({m})")
            if dest.ndim == 0 or dest.nbytes != dest.shape[0] * row_bytes:
                raise ValueError(f"dest must be rows of {row_bytes} bytes")
            if m and (pos.min() < 0 or pos.max() >= dest.shape[0] or np.unique(pos).size != m):
                raise ValueError(f"slots must be distinct rows of dest [0, {dest.shape[0]})")
        if m == 0:
            return
        if ids[0] < 0 or np.any(np.diff(ids) <= 0):
            raise ValueError("ids must be >= 0, sorted ascending and unique")
        last_end = layer_offset + (int(ids[-1]) + 1) * row_bytes
        if last_end > self.file_size:
            raise _flash_io_error()(errno.EINVAL, f"row {ids[-1]} ends at byte {last_end}, beyond "
                                                  f"the end of {self.path} ({self.file_size} bytes)")
        t0 = time.perf_counter_ns()
        n = dest.shape[0]
        out = dest.reshape(n, -1).view(np.uint8).reshape(n, row_bytes)
        j = 0
        while j < m:                      # one read per run of adjacent ids (into consecutive rows)
            k = j + 1
            while self.coalesce and k < m and ids[k] == ids[k - 1] + 1 and pos[k] == pos[k - 1] + 1:
                k += 1
            b = self._pread(layer_offset + int(ids[j]) * row_bytes, (k - j) * row_bytes)
            out[pos[j]:pos[j] + k - j] = np.frombuffer(b, np.uint8).reshape(k - j, row_bytes)
            j = k
        dt = time.perf_counter_ns() - t0
        self.st["ns_io"] += dt
        self.st["ns_wait"] += dt
        self.st["bytes_useful"] += m * row_bytes
        self.st["n_calls"] += 1

    def read_range(self, offset, dest):
        self._check()
        if not isinstance(dest, np.ndarray) or not dest.flags.c_contiguous or not dest.flags.writeable:
            raise ValueError("dest must be a C-contiguous writable numpy array")
        n = dest.nbytes
        if offset + n > self.file_size:
            raise _flash_io_error()(errno.EINVAL, f"cannot read {n} bytes at offset {offset} of "
                                                  f"{self.path} ({self.file_size} bytes)")
        t0 = time.perf_counter_ns()
        flat = dest.reshape(-1).view(np.uint8)
        for c0 in range(0, n, self.chunk_bytes):
            ln = min(self.chunk_bytes, n - c0)
            flat[c0:c0 + ln] = np.frombuffer(self._pread(offset + c0, ln), np.uint8)
        dt = time.perf_counter_ns() - t0
        self.st["ns_io"] += dt
        self.st["ns_wait"] += dt
        self.st["bytes_useful"] += n
        self.st["n_calls"] += 1

    # -- "background" reads: done at once here, their read errors kept for wait() ----------
    def submit_rows(self, layer_offset, row_bytes, ids, dest, slots=None):
        self._submitted(self.read_rows, layer_offset, row_bytes, ids, dest, slots)

    def submit_range(self, offset, dest):
        self._submitted(self.read_range, offset, dest)

    def _submitted(self, read, *args):
        self.wait()
        self.st["n_async"] += 1
        t0 = time.perf_counter_ns()
        try:
            read(*args)
        except OSError as e:
            self._pending_error = e
        self._pending_ns = time.perf_counter_ns() - t0

    def wait(self):
        """(ns in flight, ns waited) of the last submitted read: both its whole time here."""
        e, self._pending_error = self._pending_error, None
        ns, self._pending_ns = self._pending_ns, 0
        if e is not None:
            raise e
        return (ns, ns)

    @property
    def in_flight(self):
        return False

    @property
    def landed(self):
        return True

    def waiter(self):
        return _no_wait

    def stats(self):
        return dict(self.st)

    def reset_stats(self):
        self.st = dict(bytes_read=0, bytes_useful=0, n_reads=0, ns_io=0, ns_wait=0, n_calls=0, n_async=0,
                       n_retries=0)

    def _inject_fault(self, after_n_reads, err, count=1):
        self._fault = [after_n_reads, count, err]

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"Loader({self.path!r}, reference)"

