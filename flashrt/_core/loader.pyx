# cython: language_level=3
"""Read FFN neuron bundles (rows) from flash: a pread thread pool or io_uring,
O_DIRECT with aligned bounce buffers, adjacent rows coalesced into one read.

    with Loader(path) as ld:                       # backend "auto", O_DIRECT
        ld.read_rows(layer_offset, row_bytes, ids, dest)   # dest[j] <- row ids[j]
        ld.read_range(offset, dest)                # one big sequential read
        ld.submit_rows(...); compute(); ld.wait()  # the same reads in the background
        ld.stats()                                 # bytes_read, bytes_useful, n_reads, ns_io

The I/O engine is plain C (flash_io.h); this file plans the reads (runs of
adjacent ids, gaps, alignment, chunks), runs them without the GIL and copies
bounce buffers into the caller's rows. The pure-Python twin is
flashrt/_core/_reference_loader.py.
"""
import os
import threading
import warnings

import numpy as np
cimport numpy as cnp

from libc.errno cimport EINVAL, EIO, ENOSYS, EPERM, errno
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, strerror
from cpython.pycapsule cimport PyCapsule_New

cnp.import_array()

cdef extern from "<fcntl.h>" nogil:
    int c_open "frt_open"(const char* path, int flags)   # open(); F_NOCACHE for O_DIRECT on macOS (flash_io.h)
    int O_RDONLY
    int O_DIRECT
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int getpid()

cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat:
        int64_t st_size
    int fstat(int fd, stat* buf)

# Defaults measured with bench/bench_loader.py on the 2-core dev VM (virtual SSD, O_DIRECT):
# decode-shaped reads (2.4% of a layer's 16 KiB bundles) ran 603 MB/s with 32 pread threads
# vs 519 with 8; io_uring 560-607 MB/s at queue depth 32 vs 404 at 8 (64 ~ 32); the biggest
# chunk tried (256 KiB) was fastest for random reads, 256 KiB ~ 1 MiB for sequential ones.
DEFAULT_PREAD_THREADS = 32      # concurrent pread()s in flight (threads sleep in I/O, not CPU)
DEFAULT_QUEUE_DEPTH = 32        # io_uring requests in flight
DEFAULT_CHUNK_BYTES = 256 * 1024
DEFAULT_MAX_GAP = 4096          # read (and discard) gaps up to this many bytes between rows
ALIGNMENT = 4096                # O_DIRECT alignment of file offsets, lengths and buffers

cdef inline int64_t _floor(int64_t x, int64_t a) noexcept nogil:
    return (x // a) * a

cdef inline int64_t _ceil(int64_t x, int64_t a) noexcept nogil:
    return ((x + a - 1) // a) * a


def _flash_io_error():
    try:
        from flashrt.errors import FlashIOError
        return FlashIOError
    except ImportError:      # _core used alone
        return OSError


def uring_available():
    """(True, "") when io_uring_setup works here, else (False, reason)."""
    cdef int err = 0
    cdef frt_ring* r = frt_ring_new(4, &err)
    if r == NULL:
        reason = os.strerror(err)
        if err == EPERM or err == ENOSYS:
            reason += " (io_uring forbidden here: seccomp, kernel.io_uring_disabled or an old kernel)"
        return False, f"io_uring_setup failed: {reason}"
    frt_ring_free(r)
    return True, ""


def aligned_empty(shape, dtype, int64_t alignment=ALIGNMENT):
    """np.empty whose data starts on an `alignment` boundary, so that an
    O_DIRECT read_range at an aligned offset lands in it without a bounce copy."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + n].view(dt).reshape(shape)


cdef int64_t _plan_rows(const int64_t* ids, int64_t m, int64_t layer_offset, int64_t rb,
                        int64_t A, bint direct, bint coalesce, int64_t max_gap,
                        int64_t chunk, char* dest, const int64_t* pos, char* bounce, frt_req* reqs,
                        int64_t* src_off, int64_t* bounce_bytes) noexcept nogil:
    """Plan the reads for read_rows. With reqs == NULL only count: returns the
    number of requests and sets *bounce_bytes (dest must be the real one: its
    alignment decides what bounces). Otherwise fill reqs and src_off. Row j lands in
    dest row pos[j] (pos NULL: row j); rows coalesce only into consecutive dest rows."""
    cdef int64_t j = 0, k, t, start, end, s2, a0, a1, c0, ln, nreq = 0, bpos = 0, pj
    cdef bint gapped, via_bounce
    cdef frt_req* q
    while j < m:
        start = layer_offset + ids[j] * rb
        end = start + rb
        pj = pos[j] if pos != NULL else j
        k = j + 1
        gapped = False
        if coalesce:
            while k < m:
                s2 = layer_offset + ids[k] * rb
                if pos != NULL and pos[k] != pos[k - 1] + 1:
                    break
                if s2 - end > max_gap and not (direct and _floor(s2, A) < _ceil(end, A)):
                    break
                if s2 != end:
                    gapped = True
                end = s2 + rb
                k += 1
        # O_DIRECT needs aligned offset, length and address: a gap-free run that
        # has all three is read straight into dest, anything else via the bounce buffer
        via_bounce = gapped or (direct and not (
            start % A == 0 and end % A == 0 and (<uintptr_t>(dest + pj * rb)) % A == 0))
        if via_bounce and direct:
            a0 = _floor(start, A)
            a1 = _ceil(end, A)
        else:
            a0 = start
            a1 = end
        c0 = a0
        while c0 < a1:
            ln = min(chunk, a1 - c0)
            if reqs != NULL:
                q = &reqs[nreq]
                q.off = c0
                q.len = ln
                q.need = min(ln, end - c0)
                if via_bounce:
                    q.buf = bounce + bpos + (c0 - a0)
                else:
                    q.buf = dest + pj * rb + (c0 - a0)
                q.done = 0
                q.err = 0
                q.eof = 0
                q.retries = 0
            nreq += 1
            c0 += ln
        if reqs != NULL:
            for t in range(j, k):
                src_off[t] = (bpos + layer_offset + ids[t] * rb - a0) if via_bounce else -1
        if via_bounce:
            bpos += a1 - a0
        j = k
    bounce_bytes[0] = bpos
    return nreq


cdef int64_t _plan_span(int64_t off, int64_t n, int64_t A, bint direct, int64_t chunk,
                        char* dest, char* buf, frt_req* reqs, int64_t nreq) noexcept nogil:
    """Append chunked requests reading [off, off+n) into buf (buf[0] <-> the
    aligned start when direct); returns the new request count. reqs may be NULL."""
    cdef int64_t a0 = _floor(off, A) if direct else off
    cdef int64_t a1 = _ceil(off + n, A) if direct else off + n
    cdef int64_t c0 = a0, ln
    cdef frt_req* q
    while c0 < a1:
        ln = min(chunk, a1 - c0)
        if reqs != NULL:
            q = &reqs[nreq]
            q.off = c0
            q.len = ln
            q.need = min(ln, off + n - c0)
            q.buf = buf + (c0 - a0)
            q.done = 0
            q.err = 0
            q.eof = 0
            q.retries = 0
        nreq += 1
        c0 += ln
    return nreq


cdef class Loader:
    """Reads byte rows of one file (the model's ffn.bin) into caller arrays.

    path        the file
    n_threads   pread backend: concurrent readers (0 = DEFAULT_PREAD_THREADS)
    backend     "auto" (io_uring where io_uring_setup works, else pread; the
                environment variable FLASHRT_IO=pread|uring overrides "auto"),
                "pread" or "uring"
    direct      O_DIRECT (bypass the page cache); falls back to buffered reads
                with a warning when the file system refuses it (.direct says which)
    queue_depth io_uring requests in flight
    chunk_bytes largest single read; bigger runs are split so readers share work
    coalesce    merge runs of adjacent ids (and gaps up to max_gap bytes) into one read
    max_gap     largest gap (bytes) between two rows that is read and discarded
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.pool = NULL
        self.ring = NULL
        self.bounce = NULL
        self.reqs = NULL
        self.src_off = NULL
        self.dst_row = NULL
        self.has_dst_row = False
        self.owner_pid = getpid()

    def __init__(self, path, int n_threads=0, str backend="auto", bint direct=True,
                 int queue_depth=DEFAULT_QUEUE_DEPTH, int64_t chunk_bytes=DEFAULT_CHUNK_BYTES,
                 bint coalesce=True, int64_t max_gap=DEFAULT_MAX_GAP,
                 bint _simulate_direct_einval=False):
        if backend not in ("auto", "pread", "uring"):
            raise ValueError(f"backend must be 'auto', 'pread' or 'uring', not {backend!r}")
        if n_threads < 0 or queue_depth < 0:
            raise ValueError("n_threads and queue_depth must be >= 0")
        self.path = os.fspath(path)
        self.alignment = ALIGNMENT
        self.chunk_bytes = max(_ceil(chunk_bytes, ALIGNMENT), ALIGNMENT)
        self.max_gap = max_gap
        self.coalesce = coalesce
        self.n_threads = n_threads if n_threads > 0 else DEFAULT_PREAD_THREADS
        self.queue_depth = queue_depth if queue_depth > 0 else DEFAULT_QUEUE_DEPTH
        self._lock = threading.Lock()

        self._open_fd(direct, _simulate_direct_einval)

        want = backend
        if backend == "auto":
            env = os.environ.get("FLASHRT_IO", "").strip().lower()
            if env in ("pread", "uring"):
                want = env
            elif env:
                warnings.warn(f"FLASHRT_IO={env!r} ignored: use 'pread' or 'uring'",
                              RuntimeWarning, stacklevel=2)
        if want in ("auto", "uring"):
            reason = self._start_uring()
            if reason is None:
                self.backend = "uring"
            elif want == "uring" and backend == "uring":
                self.close()
                raise OSError(EINVAL, f"io_uring backend unavailable for {self.path}: {reason}")
            else:
                if want == "uring":      # asked for by FLASHRT_IO
                    warnings.warn(f"FLASHRT_IO=uring: {reason}; using pread",
                                  RuntimeWarning, stacklevel=2)
                want = "pread"
        if want == "pread":
            self.pool = frt_pool_new(self.n_threads)
            if self.pool == NULL:
                self.close()
                raise MemoryError("cannot start the pread thread pool")
            self.backend = "pread"
        self._ensure(64, 4 * ALIGNMENT, 64)

    cdef int _open_fd(self, bint direct, bint simulate_einval) except -1:
        """Open self.path (O_DIRECT when asked and allowed) into self.fd; set file_size."""
        cdef bytes bpath = os.fsencode(self.path)
        cdef int fd, err
        self.direct = direct
        if direct:
            if simulate_einval:
                fd, err = -1, EINVAL
            else:
                fd = c_open(bpath, O_RDONLY | O_DIRECT | O_CLOEXEC)
                err = errno
            if fd < 0 and err == EINVAL:
                warnings.warn(
                    f"O_DIRECT is not supported for {self.path} ({os.strerror(EINVAL)}): "
                    "reading through the page cache instead, so measured speed may be RAM's, "
                    "not flash's", RuntimeWarning, stacklevel=2)
                self.direct = False
            elif fd < 0:
                raise OSError(err, os.strerror(err), self.path)
            else:
                self.fd = fd
        if self.fd < 0:
            fd = c_open(bpath, O_RDONLY | O_CLOEXEC)
            if fd < 0:
                err = errno
                raise OSError(err, os.strerror(err), self.path)
            self.fd = fd
        cdef stat st
        if fstat(self.fd, &st) != 0:
            err = errno
            raise OSError(err, os.strerror(err), self.path)
        self.file_size = st.st_size
        return 0

    cdef int _after_fork(self) except -1:
        """In a child of fork(): the pread workers do not exist here and the ring is
        shared with the parent, so give up both (the pool's memory is leaked: its
        threads cannot be joined), reopen the file and start a fresh backend and lock."""
        cdef int err
        self.owner_pid = getpid()
        self._lock = threading.Lock()
        self.aio.started = 0                  # the read thread is the parent's (its batch too)
        self.aio_active = False
        self.aio_keep = None
        self._waiter_capsule = None
        self.pool = NULL                      # not frt_pool_free: it would join absent threads
        if self.ring != NULL:                 # unmapping and closing our copy leaves the parent's ring alone
            frt_ring_free(self.ring)
            self.ring = NULL
        if self.fd < 0:                       # closed before the fork: stays closed
            return 0
        close(self.fd)
        self.fd = -1
        cls = _flash_io_error()
        try:
            self._open_fd(self.direct, False)
        except OSError as e:
            raise cls(e.errno, f"cannot reopen {self.path} after fork(): {e.strerror}") from None
        if self.backend == "uring" and self._start_uring() is None:
            return 0
        self.pool = frt_pool_new(self.n_threads)
        if self.pool == NULL:
            close(self.fd)
            self.fd = -1
            raise cls(0, f"cannot start the pread thread pool for {self.path} after fork()")
        self.backend = "pread"
        return 0

    cdef object _start_uring(self):
        """Set up the ring and check one read works; None, or why not."""
        cdef int err = 0
        self.ring = frt_ring_new(<unsigned>self.queue_depth, &err)
        if self.ring == NULL:
            return f"io_uring_setup failed: {os.strerror(err)}"
        self._ensure(1, ALIGNMENT, 1)
        cdef int64_t n = min(ALIGNMENT, self.file_size)
        if n == 0:
            return None
        self.reqs[0].off = 0
        self.reqs[0].len = ALIGNMENT if self.direct else n
        self.reqs[0].need = n
        self.reqs[0].buf = self.bounce
        self.reqs[0].done = 0
        self.reqs[0].err = 0
        self.reqs[0].eof = 0
        self.reqs[0].retries = 0
        cdef frt_fault nofault
        nofault.countdown = 0
        nofault.remaining = 0
        nofault.err = 0
        cdef int rc
        with nogil:
            rc = frt_ring_run(self.ring, self.fd, self.reqs, 1, 1, &nofault)
        if rc < 0 or self.reqs[0].err != 0:
            err = -rc if rc < 0 else self.reqs[0].err
            frt_ring_free(self.ring)
            self.ring = NULL
            return f"a test read through io_uring failed: {os.strerror(err)}"
        return None

    cdef int _ensure(self, int64_t n_reqs, int64_t bounce_bytes, int64_t n_rows) except -1:
        """Grow the request table, the bounce buffer and the row map as needed."""
        cdef void* p
        if n_reqs > self.reqs_cap:
            n_reqs = max(n_reqs, 2 * self.reqs_cap)
            p = realloc(self.reqs, n_reqs * sizeof(frt_req))
            if p == NULL:
                raise MemoryError()
            self.reqs = <frt_req*>p
            self.reqs_cap = n_reqs
        if n_rows > self.src_cap:
            n_rows = max(n_rows, 2 * self.src_cap)
            p = realloc(self.src_off, n_rows * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            self.src_off = <int64_t*>p
            p = realloc(self.dst_row, n_rows * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            self.dst_row = <int64_t*>p
            self.src_cap = n_rows
        if bounce_bytes > self.bounce_cap:
            bounce_bytes = _ceil(max(bounce_bytes, self.bounce_cap + self.bounce_cap // 2), ALIGNMENT)
            p = frt_aligned_alloc(ALIGNMENT, bounce_bytes)
            if p == NULL:
                raise MemoryError(f"cannot allocate a {bounce_bytes}-byte read buffer")
            free(self.bounce)
            self.bounce = <char*>p
            self.bounce_cap = bounce_bytes
        return 0

    cdef int _execute(self, int64_t n_reqs) except -1:
        """Run reqs[:n_reqs] without the GIL; count stats; raise on the first failure."""
        cdef int64_t t0, t1
        cdef int rc = 0
        with nogil:
            t0 = frt_now_ns()
            if self.ring != NULL:
                rc = frt_ring_run(self.ring, self.fd, self.reqs, n_reqs,
                                  <unsigned>self.queue_depth, &self.fault)
            else:
                frt_pool_run(self.pool, self.fd, self.reqs, n_reqs, &self.fault)
            t1 = frt_now_ns()
        self.st_ns_wait += t1 - t0       # a blocking read waits for all of its time in flight
        return self._complete(n_reqs, t1 - t0, rc)

    cdef int _complete(self, int64_t n_reqs, int64_t ns, int rc) except -1:
        """After reqs[:n_reqs] ran for `ns` (rc from the ring): count stats, raise on failure."""
        cdef int64_t i, got = 0, retries = 0
        for i in range(n_reqs):
            got += self.reqs[i].done
            retries += self.reqs[i].retries
        self.st_ns_io += ns
        self.st_n_reads += n_reqs
        self.st_bytes_read += got
        self.st_n_calls += 1
        self.st_n_retries += retries
        cls = _flash_io_error()
        if rc < 0:
            # io_uring_enter itself failed: reads may still be in flight into the
            # bounce buffer, so give it up (leak it) and continue with pread.
            frt_ring_free(self.ring)
            self.ring = NULL
            self.bounce = NULL
            self.bounce_cap = 0
            self.pool = frt_pool_new(self.n_threads)
            self.backend = "pread"
            raise cls(-rc, f"io_uring_enter failed reading {self.path}: {os.strerror(-rc)} "
                           "(switched to the pread backend; retry the read)")
        cdef frt_req* q
        for i in range(n_reqs):
            q = &self.reqs[i]
            if q.err == 0:
                continue
            if q.eof:
                msg = (f"unexpected end of file in {self.path}: wanted {q.need} bytes at offset "
                       f"{q.off}, the file ended after {q.done} (file truncated or changed "
                       "since it was opened? re-convert the model)")
            else:
                msg = (f"cannot read {self.path}: {os.strerror(q.err)} reading {q.len} bytes "
                       f"at offset {q.off} (errno {q.err})")
            exc = cls(q.err, msg)
            exc.filename = self.path
            raise exc
        return 0

    cdef void _check_open(self) except *:
        if self.owner_pid != getpid():
            self._after_fork()
        if self.fd < 0:
            raise ValueError(f"Loader for {self.path} is closed")

    cdef int64_t _prepare_rows(self, int64_t layer_offset, int64_t row_bytes, object ids, object dest,
                               object slots, int64_t* m_out) except -2:
        """Check read_rows' arguments and plan its reads into self.reqs / src_off / dst_row
        (the lock held). Returns the request count (-1: nothing to read); *m_out = rows."""
        cdef cnp.ndarray idarr = np.ascontiguousarray(ids, dtype=np.int64)
        if idarr.ndim != 1:
            ids_shape = np.shape(ids)
            raise ValueError(f"ids must be 1-D, got shape {ids_shape}")
        cdef int64_t m = idarr.shape[0]
        m_out[0] = m
        if not isinstance(dest, np.ndarray) or not dest.flags.c_contiguous or not dest.flags.writeable:
            raise ValueError("dest must be a C-contiguous writable numpy array")
        cdef cnp.ndarray slotarr = None
        if slots is None:
            if dest.ndim == 0 or dest.shape[0] != m or dest.nbytes != m * row_bytes:
                raise ValueError(f"dest must hold {m} rows of {row_bytes} bytes, "
                                 f"got shape {dest.shape} ({dest.nbytes} bytes)")
        else:
            slotarr = np.ascontiguousarray(slots, dtype=np.int64)
            if slotarr.ndim != 1 or slotarr.shape[0] != m:
                raise ValueError(f"slots must be 1-D with one dest row per id ({m}), got shape {np.shape(slots)}")
            if dest.ndim == 0 or dest.nbytes != dest.shape[0] * row_bytes:
                raise ValueError(f"dest must be rows of {row_bytes} bytes, got shape {dest.shape} "
                                 f"({dest.nbytes} bytes)")
            if m and (slotarr.min() < 0 or slotarr.max() >= dest.shape[0] or np.unique(slotarr).size != m):
                raise ValueError(f"slots must be distinct rows of dest [0, {dest.shape[0]})")
        if row_bytes <= 0 or layer_offset < 0:
            raise ValueError("row_bytes must be > 0 and layer_offset >= 0")
        if m == 0:
            return -1
        cdef const int64_t* pid = <const int64_t*>cnp.PyArray_DATA(idarr)
        cdef int64_t j
        cdef bint ok = pid[0] >= 0
        with nogil:
            for j in range(1, m):
                if pid[j] <= pid[j - 1]:
                    ok = False
                    break
        if not ok:
            raise ValueError("ids must be >= 0, sorted ascending and unique")
        cdef int64_t last_end = layer_offset + (pid[m - 1] + 1) * row_bytes
        if last_end > self.file_size:
            raise _flash_io_error()(
                EINVAL, f"row {pid[m - 1]} ({row_bytes} bytes at layer offset {layer_offset}) "
                        f"ends at byte {last_end}, beyond the end of {self.path} "
                        f"({self.file_size} bytes): the file is truncated or the offsets are wrong")
        cdef char* pdest = <char*>cnp.PyArray_DATA(dest)
        cdef int64_t n_reqs, bbytes
        cdef int64_t A = self.alignment
        cdef bint direct = self.direct, coalesce = self.coalesce
        cdef int64_t max_gap = self.max_gap, chunk = self.chunk_bytes
        cdef const int64_t* ppos = NULL
        if slotarr is not None:
            ppos = <const int64_t*>cnp.PyArray_DATA(slotarr)
        n_reqs = _plan_rows(pid, m, layer_offset, row_bytes, A, direct, coalesce,
                            max_gap, chunk, pdest, ppos, NULL, NULL, NULL, &bbytes)
        self._ensure(n_reqs, bbytes, m)
        _plan_rows(pid, m, layer_offset, row_bytes, A, direct, coalesce, max_gap,
                   chunk, pdest, ppos, self.bounce, self.reqs, self.src_off, &bbytes)
        self.has_dst_row = ppos != NULL
        if ppos != NULL:
            memcpy(self.dst_row, ppos, m * sizeof(int64_t))
        return n_reqs

    cdef int64_t _prepare_range(self, int64_t offset, object dest) except -2:
        """Check read_range's arguments and plan its reads into self.reqs and the bounce
        copies into self.copies (the lock held). Returns the request count (-1: nothing)."""
        if not isinstance(dest, np.ndarray) or not dest.flags.c_contiguous or not dest.flags.writeable:
            raise ValueError("dest must be a C-contiguous writable numpy array")
        cdef int64_t n = dest.nbytes
        if offset < 0:
            raise ValueError("offset must be >= 0")
        if offset + n > self.file_size:
            raise _flash_io_error()(
                EINVAL, f"cannot read {n} bytes at offset {offset} of {self.path}: the file has "
                        f"only {self.file_size} bytes (truncated, or wrong offsets)")
        self.n_copies = 0
        if n == 0:
            return -1
        cdef char* pdest = <char*>cnp.PyArray_DATA(dest)
        cdef int64_t A = self.alignment, chunk = self.chunk_bytes
        cdef int64_t end = offset + n, mid0, mid1, nreq, head_n = 0, tail_n = 0, bpos
        cdef bint direct = self.direct
        if not direct:
            nreq = _plan_span(offset, n, A, False, chunk, pdest, pdest, NULL, 0)
            self._ensure(nreq, 0, 0)
            _plan_span(offset, n, A, False, chunk, pdest, pdest, self.reqs, 0)
        elif (<uint64_t>(<uintptr_t>pdest) - <uint64_t>offset) % <uint64_t>A == 0 and \
                _ceil(offset, A) < _floor(end, A):
            # the aligned middle straight into dest; the partial head/tail blocks bounce
            mid0 = _ceil(offset, A)
            mid1 = _floor(end, A)
            nreq = _plan_span(mid0, mid1 - mid0, A, True, chunk, pdest,
                              pdest + (mid0 - offset), NULL, 0)
            head_n = mid0 - offset
            tail_n = end - mid1
            nreq += (head_n > 0) + (tail_n > 0)
            self._ensure(nreq, 2 * A, 0)
            nreq = _plan_span(mid0, mid1 - mid0, A, True, chunk, pdest,
                              pdest + (mid0 - offset), self.reqs, 0)
            if head_n > 0:
                nreq = _plan_span(offset, head_n, A, True, chunk, pdest, self.bounce,
                                  self.reqs, nreq)
                self.copies[self.n_copies].dst = pdest
                self.copies[self.n_copies].src = self.bounce + (offset - _floor(offset, A))
                self.copies[self.n_copies].n = head_n
                self.n_copies += 1
            if tail_n > 0:
                nreq = _plan_span(mid1, tail_n, A, True, chunk, pdest, self.bounce + A,
                                  self.reqs, nreq)
                self.copies[self.n_copies].dst = pdest + (mid1 - offset)
                self.copies[self.n_copies].src = self.bounce + A
                self.copies[self.n_copies].n = tail_n
                self.n_copies += 1
        else:
            bpos = _ceil(end, A) - _floor(offset, A)
            nreq = _plan_span(offset, n, A, True, chunk, pdest, self.bounce, NULL, 0)
            self._ensure(nreq, bpos, 0)
            _plan_span(offset, n, A, True, chunk, pdest, self.bounce, self.reqs, 0)
            self.copies[0].dst = pdest
            self.copies[0].src = self.bounce + (offset - _floor(offset, A))
            self.copies[0].n = n
            self.n_copies = 1
        return nreq

    cdef int _submit(self, int64_t n_reqs, char* dest, bint rows, int64_t m, int64_t row_bytes,
                     int64_t useful, object keep) except -1:
        """Hand reqs[:n_reqs] (+ the row or range copies) to the read thread (the lock held
        and kept until wait())."""
        cdef int err, c
        if not self.aio.started:
            err = frt_async_start(&self.aio)
            if err != 0:
                raise _flash_io_error()(err, f"cannot start the read thread for {self.path}: "
                                             f"{os.strerror(err)}")
            self.aio_waiter.wait = frt_async_wait_cb
            self.aio_waiter.ctx = &self.aio
        cdef frt_async* a = &self.aio
        a.fd = self.fd
        a.ring = self.ring
        a.pool = self.pool
        a.reqs = self.reqs
        a.n = n_reqs
        a.qd = <unsigned>self.queue_depth
        a.fault = &self.fault
        a.dest = dest
        a.bounce = self.bounce
        a.src_off = self.src_off if rows else NULL
        a.dst_row = self.dst_row if (rows and self.has_dst_row) else NULL
        a.m = m
        a.row_bytes = row_bytes
        a.n_copies = 0 if rows else self.n_copies
        for c in range(a.n_copies):
            a.copies[c] = self.copies[c]
        self.aio_n_reqs = n_reqs
        self.aio_useful = useful
        self.aio_keep = keep
        self.aio_active = True
        frt_async_submit(a)
        return 0

    def read_rows(self, int64_t layer_offset, int64_t row_bytes, ids, dest, slots=None):
        """dest[j] <- bytes [layer_offset + ids[j]*row_bytes, +row_bytes) of the file
        (dest[slots[j]] when slots is given).

        ids   (m,) integers, sorted ascending, unique
        dest  C-contiguous writable array (m, ...) whose rows are row_bytes bytes
              ((n, ...) with slots: e.g. a whole cache whose slots do not move)
        slots (m,) distinct dest rows, or None
        """
        self._check_open()
        self.wait()
        cdef int64_t n_reqs, m = 0, j
        cdef char* pdest
        with self._lock:
            n_reqs = self._prepare_rows(layer_offset, row_bytes, ids, dest, slots, &m)
            if n_reqs < 0:
                return
            self._execute(n_reqs)
            pdest = <char*>cnp.PyArray_DATA(dest)
            with nogil:
                for j in range(m):
                    if self.src_off[j] >= 0:
                        memcpy(pdest + (self.dst_row[j] if self.has_dst_row else j) * row_bytes,
                               self.bounce + self.src_off[j], row_bytes)
            self.st_bytes_useful += m * row_bytes

    def read_range(self, int64_t offset, dest):
        """dest (any C-contiguous writable array) <- dest.nbytes bytes of the file
        from `offset`: one big sequential read, split in chunks across readers.
        O_DIRECT reads land straight in dest when dest's address and offset agree
        modulo the alignment (see aligned_empty); otherwise through the bounce buffer."""
        self._check_open()
        self.wait()
        cdef int64_t nreq
        cdef int c
        with self._lock:
            nreq = self._prepare_range(offset, dest)
            if nreq < 0:
                return
            self._execute(nreq)
            with nogil:
                for c in range(self.n_copies):
                    memcpy(self.copies[c].dst, self.copies[c].src, self.copies[c].n)
            self.st_bytes_useful += dest.nbytes

    def submit_rows(self, int64_t layer_offset, int64_t row_bytes, ids, dest, slots=None):
        """read_rows in the background: returns once the reads are issued. dest must not be
        read (nor ids' array changed) until wait() returns, or until a kernel given waiter()
        has waited; errors surface in wait(). One batch at a time: a new read or submit
        first waits for the one in flight."""
        self._check_open()
        self.wait()
        cdef int64_t n_reqs, m = 0
        self._lock.acquire()
        try:
            n_reqs = self._prepare_rows(layer_offset, row_bytes, ids, dest, slots, &m)
            if n_reqs < 0:
                self._lock.release()
                return
            self._submit(n_reqs, <char*>cnp.PyArray_DATA(dest), True, m, row_bytes, m * row_bytes,
                         (ids, dest, slots))
        except BaseException:
            if not self.aio_active:
                self._lock.release()
            raise

    def submit_range(self, int64_t offset, dest):
        """read_range in the background (see submit_rows)."""
        self._check_open()
        self.wait()
        cdef int64_t nreq
        self._lock.acquire()
        try:
            nreq = self._prepare_range(offset, dest)
            if nreq < 0:
                self._lock.release()
                return
            self._submit(nreq, <char*>cnp.PyArray_DATA(dest), False, 0, 0, dest.nbytes, dest)
        except BaseException:
            if not self.aio_active:
                self._lock.release()
            raise

    def wait(self):
        """Block until the batch in flight (if any) has landed; raise its read error, if any.
        Returns (ns the batch was in flight, ns callers were blocked waiting for it, here or
        in a kernel through waiter()); (0, 0) when there was none."""
        if not self.aio_active:
            return (0, 0)
        with nogil:
            frt_async_wait(&self.aio)
        self.aio_active = False
        self.aio_keep = None
        cdef int64_t flight = self.aio.t_done - self.aio.t_submit
        try:
            self.st_ns_wait += self.aio.ns_waited
            self.st_ns_flight += flight
            self.st_n_async += 1
            self._complete(self.aio_n_reqs, flight, self.aio.rc)
            self.st_bytes_useful += self.aio_useful
        finally:
            self._lock.release()
        return (flight, self.aio.ns_waited)

    @property
    def last_batch(self):
        """(t_submit, t_done) of the last submitted batch, CLOCK_MONOTONIC ns (the clock of
        time.monotonic_ns and time.perf_counter_ns on Linux): when two loaders read at
        once, the time either had reads in flight is the union of their batches."""
        return (self.aio.t_submit, self.aio.t_done)

    @property
    def in_flight(self):
        """True while a submitted batch has not been waited for."""
        return self.aio_active

    @property
    def landed(self):
        """True when no submitted batch is still being read (wait() then returns at once);
        never blocks on the reads."""
        if not self.aio_active:
            return True
        return frt_async_idle(&self.aio) != 0

    def waiter(self):
        """A PyCapsule ("flashrt.frt_waiter": {wait(ctx), ctx}) that blocks, without the GIL,
        until the batch in flight has landed; kernels.ffn_rows(..., wait=) calls it between
        the rows that are ready and those being read. wait() must still follow."""
        if not self.aio.started:
            return None
        if self._waiter_capsule is None:
            self._waiter_capsule = PyCapsule_New(&self.aio_waiter, b"flashrt.frt_waiter", NULL)
        return self._waiter_capsule

    def stats(self):
        """dict(bytes_read: bytes that came from the device, alignment padding and
        gaps included; bytes_useful: bytes delivered to callers; n_reads: read
        requests issued (after chunking; retries not counted); ns_io: wall time with
        reads in flight; ns_wait: time callers were blocked waiting for reads (== ns_io
        for blocking reads, less when submit_* overlapped them with work); n_calls:
        read and submit calls; n_async: submitted batches; n_retries: reads resubmitted
        after EINTR, EAGAIN or a short read)."""
        return dict(bytes_read=self.st_bytes_read, bytes_useful=self.st_bytes_useful,
                    n_reads=self.st_n_reads, ns_io=self.st_ns_io, ns_wait=self.st_ns_wait,
                    n_calls=self.st_n_calls, n_async=self.st_n_async, n_retries=self.st_n_retries)

    def reset_stats(self):
        self.st_bytes_read = 0
        self.st_bytes_useful = 0
        self.st_n_reads = 0
        self.st_ns_io = 0
        self.st_ns_wait = 0
        self.st_ns_flight = 0
        self.st_n_async = 0
        self.st_n_calls = 0
        self.st_n_retries = 0

    def _inject_fault(self, int64_t after_n_reads, int err, int64_t count=1):
        """Test hook: after `after_n_reads` more read attempts (syscalls or io_uring
        completions) succeed, the next `count` fail with errno `err`. EINTR and
        EAGAIN are retried by the loader; anything else raises FlashIOError."""
        self.fault.err = err
        self.fault.countdown = after_n_reads
        self.fault.remaining = count

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        """Join the reader threads, tear down the ring, close the file. Idempotent."""
        if self.owner_pid != getpid():
            self._lock = None                 # may have been held by a parent thread at fork()
            self.aio.started = 0
            self.aio_active = False
        elif self.aio_active:                 # a batch in flight writes into its arrays: let it land
            try:
                self.wait()
            except OSError:
                pass
        if self._lock is not None:
            with self._lock:
                self._release()
        else:
            self._release()

    cdef void _release(self) noexcept:
        if self.owner_pid != getpid():        # a fork()ed child: the pool's threads are the parent's
            self.pool = NULL
            self.aio.started = 0
        frt_async_stop(&self.aio)             # joins the read thread (after its batch, if any)
        self.aio_active = False
        if self.pool != NULL:
            frt_pool_free(self.pool)
            self.pool = NULL
        if self.ring != NULL:
            frt_ring_free(self.ring)
            self.ring = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        self._release()
        free(self.bounce)
        free(self.reqs)
        free(self.src_off)
        free(self.dst_row)

    def __repr__(self):
        state = "closed" if self.fd < 0 else f"{self.backend}, direct={self.direct}"
        return f"Loader({self.path!r}, {state})"
