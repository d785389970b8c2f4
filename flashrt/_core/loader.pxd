# Declarations of the C I/O engine (flash_io.h) and of the Loader class,
# for other _core modules that want to cimport them.
from libc.stdint cimport int64_t, uint64_t


cdef extern from "flash_io.h" nogil:
    ctypedef struct frt_req:
        int64_t off
        int64_t len
        int64_t need
        char* buf
        int64_t done
        int err
        int eof
        int retries

    ctypedef struct frt_fault:
        int64_t countdown
        int64_t remaining
        int err

    ctypedef struct frt_pool:
        int n_workers

    ctypedef struct frt_ring:
        int fd
        unsigned sq_entries

    int FRT_HAVE_URING
    int64_t frt_now_ns()
    frt_pool* frt_pool_new(int n_threads)
    void frt_pool_free(frt_pool* p)
    void frt_pool_run(frt_pool* p, int fd, frt_req* reqs, int64_t n, frt_fault* f)
    frt_ring* frt_ring_new(unsigned entries, int* err)
    void frt_ring_free(frt_ring* r)
    int frt_ring_run(frt_ring* r, int fd, frt_req* reqs, int64_t n, unsigned qd, frt_fault* f)
    void* frt_aligned_alloc(size_t alignment, size_t size)

    ctypedef struct frt_copy:
        char* dst
        const char* src
        int64_t n

    ctypedef struct frt_async:
        int started
        int pending
        int busy
        int fd
        frt_ring* ring
        frt_pool* pool
        frt_req* reqs
        int64_t n
        unsigned qd
        frt_fault* fault
        char* dest
        const char* bounce
        const int64_t* src_off
        const int64_t* dst_row
        int64_t m
        int64_t row_bytes
        frt_copy copies[3]
        int n_copies
        int rc
        int64_t t_submit
        int64_t t_done
        int64_t ns_waited

    ctypedef struct frt_waiter:
        void (*wait)(void* ctx) noexcept nogil
        void* ctx

    int frt_async_start(frt_async* a)
    void frt_async_submit(frt_async* a)
    void frt_async_wait(frt_async* a)
    int frt_async_idle(frt_async* a)
    void frt_async_wait_cb(void* ctx)
    void frt_async_stop(frt_async* a)


cdef class Loader:
    cdef int fd
    cdef readonly object path
    cdef readonly bint direct
    cdef readonly str backend
    cdef readonly int n_threads
    cdef readonly int queue_depth
    cdef readonly int64_t alignment
    cdef readonly int64_t file_size
    cdef public int64_t chunk_bytes
    cdef public int64_t max_gap
    cdef public bint coalesce
    cdef frt_pool* pool
    cdef frt_ring* ring
    cdef char* bounce            # (bounce_cap,) bytes, `alignment`-aligned
    cdef int64_t bounce_cap
    cdef frt_req* reqs           # (reqs_cap,)
    cdef int64_t reqs_cap
    cdef int64_t* src_off        # (src_cap,) per dest row: byte offset in bounce, -1 = read in place
    cdef int64_t src_cap
    cdef int64_t* dst_row        # (src_cap,) per row: its dest row when read_rows got slots
    cdef bint has_dst_row
    cdef frt_fault fault
    cdef frt_copy copies[3]      # the bounce copies a range read needs after its reads
    cdef int n_copies
    cdef frt_async aio           # the background batch (submit_rows / submit_range ... wait)
    cdef frt_waiter aio_waiter   # {frt_async_wait_cb, &aio}, handed to kernels through waiter()
    cdef readonly object _waiter_capsule
    cdef bint aio_active         # a batch is in flight (the lock is held until wait())
    cdef int64_t aio_n_reqs, aio_useful
    cdef object aio_keep         # the arrays a batch in flight writes into / reads from
    cdef int64_t st_ns_wait, st_ns_flight, st_n_async
    cdef int64_t st_bytes_read, st_bytes_useful, st_n_reads, st_ns_io, st_n_calls, st_n_retries
    cdef object _lock
    cdef int owner_pid           # the process that started pool/ring; another pid means fork()

    cdef int _ensure(self, int64_t n_reqs, int64_t bounce_bytes, int64_t n_rows) except -1
    cdef int _execute(self, int64_t n_reqs) except -1
    cdef int _complete(self, int64_t n_reqs, int64_t ns, int rc) except -1
    cdef int64_t _prepare_rows(self, int64_t layer_offset, int64_t row_bytes, object ids, object dest,
                               object slots, int64_t* m_out) except -2
    cdef int64_t _prepare_range(self, int64_t offset, object dest) except -2
    cdef int _submit(self, int64_t n_reqs, char* dest, bint rows, int64_t m, int64_t row_bytes,
                     int64_t useful, object keep) except -1
    cdef object _start_uring(self)
    cdef int _open_fd(self, bint direct, bint simulate_einval) except -1
    cdef int _after_fork(self) except -1
    cdef void _check_open(self) except *
    cdef void _release(self) noexcept
