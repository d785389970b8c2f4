/* flash_io.h -- the I/O engine under flashrt/_core/loader.pyx.
 *
 * Plain C, no Python: one read request type (frt_req), fault injection for
 * tests (frt_fault), and the two backends that execute a batch of requests:
 *   - a pthread pool where every thread preads requests taken from a shared
 *     atomic index (frt_pool_run), and
 *   - io_uring through raw syscalls and mmap'd rings (frt_ring_run), with a
 *     fixed queue depth, the request index as user_data, and short reads,
 *     -EINTR and -EAGAIN resubmitted (never silently dropped).
 * Every function here runs without the GIL.
 */
#ifndef FLASHRT_FLASH_IO_H
#define FLASHRT_FLASH_IO_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* io_uring is Linux's: compiled where <linux/io_uring.h> exists (FLASHRT_NO_URING turns it off,
 * as on macOS); without it frt_ring_new fails with ENOSYS and the loader uses the pread pool. */
#if defined(__has_include) && !defined(FLASHRT_NO_URING)
#  if __has_include(<linux/io_uring.h>)
#    include <linux/io_uring.h>
#    define FRT_HAVE_URING 1
#  endif
#endif
#ifndef FRT_HAVE_URING
#  define FRT_HAVE_URING 0
#endif

/* O_DIRECT is Linux's. Where it does not exist (macOS) O_DIRECT is a flag of ours that never
 * reaches the kernel: frt_open opens without it and asks for fcntl(F_NOCACHE) instead (the
 * page cache bypass macOS has), or fails with EINVAL where neither exists, so the loader falls
 * back to buffered reads with its warning. The loader opens every file through frt_open. */
#ifdef O_DIRECT
#  define FRT_HAVE_O_DIRECT 1
static inline int frt_open(const char *path, int flags) { return open(path, flags); }
#else
#  define FRT_HAVE_O_DIRECT 0
#  define O_DIRECT 0x40000000
_Static_assert((O_DIRECT & (O_ACCMODE | O_CLOEXEC)) == 0, "O_DIRECT stand-in collides with open flags");
static inline int frt_open(const char *path, int flags) {
    int nocache = (flags & O_DIRECT) != 0;
    int fd = open(path, flags & ~O_DIRECT);
    if (fd < 0 || !nocache) return fd;
#  ifdef F_NOCACHE
    if (fcntl(fd, F_NOCACHE, 1) == 0) return fd;
    int err = errno;
#  else
    int err = EINVAL;
#  endif
    close(fd);
    errno = err;
    return -1;
}
#endif

/* One read: `len` bytes at file offset `off` into `buf`; at least `need`
 * bytes must arrive (the rest may be alignment padding past end of file). */
typedef struct frt_req {
    int64_t off;    /* file offset of byte 0 */
    int64_t len;    /* bytes asked for */
    int64_t need;   /* bytes that must arrive (<= len); fewer is an error */
    char   *buf;    /* destination, len bytes */
    int64_t done;   /* bytes arrived so far */
    int     err;    /* 0, or the errno that ended it */
    int     eof;    /* 1 when end of file came before `need` bytes */
    int     retries;/* EINTR / EAGAIN / short reads resubmitted */
} frt_req;

/* Test hook: after `countdown` more read attempts, the next `remaining`
 * attempts fail with `err` (EINTR / EAGAIN are retried, others end the read). */
typedef struct frt_fault {
    int64_t countdown;
    int64_t remaining;
    int     err;
} frt_fault;

static inline int frt_fault_take(frt_fault *f) {
    if (__atomic_load_n(&f->remaining, __ATOMIC_ACQUIRE) <= 0) return 0;
    if (__atomic_sub_fetch(&f->countdown, 1, __ATOMIC_ACQ_REL) >= 0) return 0;
    if (__atomic_sub_fetch(&f->remaining, 1, __ATOMIC_ACQ_REL) >= 0) return f->err;
    return 0;
}

static inline int64_t frt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Read one request with pread: EINTR/EAGAIN retried, short reads continued,
 * end of file before `need` bytes -> err = EIO, eof = 1. */
static void frt_pread_req(int fd, frt_req *r, frt_fault *f) {
    while (r->done < r->need) {
        ssize_t n;
        int inj = frt_fault_take(f);
        if (inj) { n = -1; errno = inj; }
        else n = pread(fd, r->buf + r->done, (size_t)(r->len - r->done), (off_t)(r->off + r->done));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) { r->retries++; continue; }
            r->err = errno;
            return;
        }
        if (n == 0) { r->err = EIO; r->eof = 1; return; }
        r->done += n;
        if (r->done < r->need) r->retries++;
    }
}

/* ------------------------------------------------------------------ */
/* pread thread pool                                                   */
/* ------------------------------------------------------------------ */

typedef struct frt_pool {
    int n_workers;          /* threads besides the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_start, cv_done;
    uint64_t generation;    /* bumped for every batch */
    int stop;
    int busy;               /* workers still inside the current batch */
    /* the current batch */
    int fd;
    frt_req *reqs;
    int64_t n_reqs;
    int64_t next;           /* atomic: next request to take */
    frt_fault *fault;
} frt_pool;

static void frt_pool_drain(frt_pool *p) {
    for (;;) {
        int64_t i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (i >= p->n_reqs) return;
        frt_pread_req(p->fd, &p->reqs[i], p->fault);
    }
}

static void *frt_pool_worker(void *arg) {
    frt_pool *p = (frt_pool *)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->generation == seen && !p->stop) pthread_cond_wait(&p->cv_start, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        frt_pool_drain(p);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->cv_done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Start n_threads - 1 workers (the caller is the n-th reader). Returns NULL
 * on allocation failure; starts fewer workers if pthread_create fails. */
static frt_pool *frt_pool_new(int n_threads) {
    frt_pool *p = (frt_pool *)calloc(1, sizeof(frt_pool));
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_start, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    int want = n_threads > 1 ? n_threads - 1 : 0;
    p->threads = want ? (pthread_t *)calloc((size_t)want, sizeof(pthread_t)) : NULL;
    if (want && !p->threads) want = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* workers never take signals */
    for (int i = 0; i < want; i++) {
        if (pthread_create(&p->threads[i], &attr, frt_pool_worker, p) != 0) break;
        p->n_workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return p;
}

static void frt_pool_free(frt_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_workers; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_start);
    pthread_cond_destroy(&p->cv_done);
    free(p);
}

/* Execute n requests on fd; the caller reads too. Returns when all are done. */
static void frt_pool_run(frt_pool *p, int fd, frt_req *reqs, int64_t n, frt_fault *f) {
    p->fd = fd; p->reqs = reqs; p->n_reqs = n; p->fault = f;
    __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
    if (p->n_workers == 0 || n <= 1) { frt_pool_drain(p); return; }
    pthread_mutex_lock(&p->mu);
    p->busy = p->n_workers;
    p->generation++;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    frt_pool_drain(p);
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0) pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

/* ------------------------------------------------------------------ */
/* io_uring through raw syscalls                                       */
/* ------------------------------------------------------------------ */

typedef struct frt_ring {
    int fd;
    unsigned sq_entries, cq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
#if FRT_HAVE_URING
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
#else
    void *sqes, *cqes;
#endif
    void *sq_ptr, *cq_ptr;
    size_t sq_sz, cq_sz, sqes_sz;
    int64_t *pending;       /* requests to resubmit, at most sq_entries */
} frt_ring;

/* Set up a ring of `entries` SQEs. Returns NULL and sets *err to the errno
 * (ENOSYS when the headers lack io_uring, EPERM when seccomp forbids it). */
static frt_ring *frt_ring_new(unsigned entries, int *err) {
#if !FRT_HAVE_URING || !defined(__NR_io_uring_setup)
    (void)entries;
    *err = ENOSYS;
    return NULL;
#else
    struct io_uring_params prm;
    memset(&prm, 0, sizeof prm);
    int fd = (int)syscall(__NR_io_uring_setup, entries, &prm);
    if (fd < 0) { *err = errno; return NULL; }
    frt_ring *r = (frt_ring *)calloc(1, sizeof(frt_ring));
    if (!r) { close(fd); *err = ENOMEM; return NULL; }
    r->fd = fd;
    r->sq_entries = prm.sq_entries;
    r->cq_entries = prm.cq_entries;
    r->sq_sz = prm.sq_off.array + prm.sq_entries * sizeof(unsigned);
    r->cq_sz = prm.cq_off.cqes + prm.cq_entries * sizeof(struct io_uring_cqe);
    int single = (prm.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (r->cq_sz > r->sq_sz) r->sq_sz = r->cq_sz;
        r->cq_sz = r->sq_sz;
    }
    r->sq_ptr = mmap(NULL, r->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) { *err = errno; r->sq_ptr = NULL; goto fail; }
    if (single) r->cq_ptr = r->sq_ptr;
    else {
        r->cq_ptr = mmap(NULL, r->cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         fd, IORING_OFF_CQ_RING);
        if (r->cq_ptr == MAP_FAILED) { *err = errno; r->cq_ptr = NULL; goto fail; }
    }
    r->sqes_sz = prm.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = (struct io_uring_sqe *)mmap(NULL, r->sqes_sz, PROT_READ | PROT_WRITE,
                                          MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if ((void *)r->sqes == MAP_FAILED) { *err = errno; r->sqes = NULL; goto fail; }
    {
        char *sq = (char *)r->sq_ptr, *cq = (char *)r->cq_ptr;
        r->sq_head = (unsigned *)(sq + prm.sq_off.head);
        r->sq_tail = (unsigned *)(sq + prm.sq_off.tail);
        r->sq_mask = (unsigned *)(sq + prm.sq_off.ring_mask);
        r->sq_array = (unsigned *)(sq + prm.sq_off.array);
        r->cq_head = (unsigned *)(cq + prm.cq_off.head);
        r->cq_tail = (unsigned *)(cq + prm.cq_off.tail);
        r->cq_mask = (unsigned *)(cq + prm.cq_off.ring_mask);
        r->cqes = (struct io_uring_cqe *)(cq + prm.cq_off.cqes);
    }
    r->pending = (int64_t *)malloc(sizeof(int64_t) * (r->sq_entries + 1));
    if (!r->pending) { *err = ENOMEM; goto fail; }
    return r;
fail:
    if (r->sqes) munmap((void *)r->sqes, r->sqes_sz);
    if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_sz);
    if (r->sq_ptr) munmap(r->sq_ptr, r->sq_sz);
    close(fd);
    free(r);
    return NULL;
#endif
}

static void frt_ring_free(frt_ring *r) {
    if (!r) return;
    if (r->sqes) munmap((void *)r->sqes, r->sqes_sz);
    if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_sz);
    if (r->sq_ptr) munmap(r->sq_ptr, r->sq_sz);
    if (r->fd >= 0) close(r->fd);
    free(r->pending);
    free(r);
}

/* Execute n requests with at most `qd` in flight. On a request error no new
 * request is submitted, but every one in flight is reaped before returning
 * (their buffers stay ours). Returns 0, or -errno when io_uring_enter itself
 * failed (then requests may be left unfinished; the ring must be dropped). */
static int frt_ring_run(frt_ring *r, int fd, frt_req *reqs, int64_t n, unsigned qd,
                        frt_fault *f) {
#if !FRT_HAVE_URING || !defined(__NR_io_uring_enter)
    (void)r; (void)fd; (void)reqs; (void)n; (void)qd; (void)f;
    return -ENOSYS;
#else
    if (qd < 1) qd = 1;
    if (qd > r->sq_entries) qd = r->sq_entries;
    int64_t next = 0, inflight = 0, n_pend = 0;
    int stop = 0;
    const unsigned sq_mask = *r->sq_mask, cq_mask = *r->cq_mask;
    for (;;) {
        unsigned tail = *r->sq_tail;      /* only we write the SQ tail */
        while (inflight < (int64_t)qd && (n_pend > 0 || (!stop && next < n))) {
            int64_t i;
            if (n_pend > 0) i = r->pending[--n_pend];
            else i = next++;
            frt_req *q = &reqs[i];
            unsigned idx = tail & sq_mask;
            struct io_uring_sqe *sqe = &r->sqes[idx];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_READ;
            sqe->fd = fd;
            sqe->addr = (uint64_t)(uintptr_t)(q->buf + q->done);
            sqe->len = (uint32_t)(q->len - q->done);
            sqe->off = (uint64_t)(q->off + q->done);
            sqe->user_data = (uint64_t)i;
            r->sq_array[idx] = idx;
            tail++;
            inflight++;
        }
        __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        if (inflight == 0) break;
        unsigned to_submit = tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        long rc = syscall(__NR_io_uring_enter, r->fd, to_submit, 1, IORING_ENTER_GETEVENTS,
                          NULL, 0);
        if (rc < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) return -errno;
        unsigned head = *r->cq_head;
        unsigned ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        while (head != ctail) {
            struct io_uring_cqe *cqe = &r->cqes[head & cq_mask];
            int64_t i = (int64_t)cqe->user_data;
            int res = cqe->res;
            head++;
            inflight--;
            frt_req *q = &reqs[i];
            int inj = frt_fault_take(f);
            if (inj) res = -inj;
            if (res == -EINTR || res == -EAGAIN) { q->retries++; r->pending[n_pend++] = i; continue; }
            if (res < 0) { q->err = -res; stop = 1; continue; }
            if (res == 0) { q->err = EIO; q->eof = 1; stop = 1; continue; }
            q->done += res;
            if (q->done < q->need) {                  /* short read: resubmit the rest */
                q->retries++;
                r->pending[n_pend++] = i;
            }
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        if (stop) n_pend = 0;   /* a request failed: stop after draining the ring */
    }
    return 0;
#endif
}

/* ------------------------------------------------------------------ */
/* Reads in the background: one driver thread per loader               */
/* ------------------------------------------------------------------ */

/* The driver thread runs one batch at a time (through the ring or the pread pool, exactly as
 * a blocking read would), then copies the bounce-buffered rows into place, then says done.
 * The caller computes meanwhile and blocks in frt_async_wait only when it needs the rows.
 * Everything a batch touches (reqs, bounce, src_off, dest) stays untouched by the caller
 * until frt_async_wait has returned. */
typedef struct frt_copy {      /* one memcpy the driver does after the reads */
    char *dst;
    const char *src;
    int64_t n;
} frt_copy;

typedef struct frt_async {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;        /* the thread exists */
    int stop;
    int pending;        /* a batch was submitted and not yet waited for */
    int busy;           /* the driver holds a batch */
    /* the batch */
    int fd;
    frt_ring *ring;
    frt_pool *pool;
    frt_req *reqs;
    int64_t n;
    unsigned qd;
    frt_fault *fault;
    char *dest;                 /* rows: dest[j] <- bounce[src_off[j]] when src_off[j] >= 0 */
    const char *bounce;
    const int64_t *src_off;
    const int64_t *dst_row;     /* rows: row j's dest row (NULL: j) */
    int64_t m, row_bytes;
    frt_copy copies[3];         /* ranges: head / tail (or whole) bounce copies */
    int n_copies;
    /* results */
    int rc;
    int64_t t_submit, t_done;   /* submit -> reads and copies finished: time in flight */
    int64_t ns_waited;          /* caller time blocked in frt_async_wait for this batch */
} frt_async;

static void frt_async_exec(frt_async *a) {
    if (a->ring != NULL) a->rc = frt_ring_run(a->ring, a->fd, a->reqs, a->n, a->qd, a->fault);
    else frt_pool_run(a->pool, a->fd, a->reqs, a->n, a->fault);
    if (a->rc == 0) {
        if (a->src_off != NULL)
            for (int64_t j = 0; j < a->m; j++)
                if (a->src_off[j] >= 0)
                    memcpy(a->dest + (a->dst_row != NULL ? a->dst_row[j] : j) * a->row_bytes,
                           a->bounce + a->src_off[j], (size_t)a->row_bytes);
        for (int c = 0; c < a->n_copies; c++)
            memcpy(a->copies[c].dst, a->copies[c].src, (size_t)a->copies[c].n);
    }
}

static void *frt_async_main(void *arg) {
    frt_async *a = (frt_async *)arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->busy && !a->stop) pthread_cond_wait(&a->cv, &a->mu);
        if (a->stop && !a->busy) break;
        pthread_mutex_unlock(&a->mu);
        frt_async_exec(a);
        int64_t t = frt_now_ns();
        pthread_mutex_lock(&a->mu);
        a->t_done = t;
        a->busy = 0;
        pthread_cond_broadcast(&a->cv);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* Start the driver thread (signals blocked in it). Returns 0 or an errno. */
static int frt_async_start(frt_async *a) {
    memset(a, 0, sizeof *a);
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&a->th, &attr, frt_async_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        pthread_mutex_destroy(&a->mu);
        pthread_cond_destroy(&a->cv);
        return rc;
    }
    a->started = 1;
    return 0;
}

/* Hand the batch already filled in (fd, ring/pool, reqs, n, qd, fault, copies) to the driver. */
static void frt_async_submit(frt_async *a) {
    pthread_mutex_lock(&a->mu);
    a->rc = 0;
    a->ns_waited = 0;
    a->t_submit = frt_now_ns();
    a->t_done = a->t_submit;
    a->pending = 1;
    a->busy = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

/* Block until the batch's reads and copies are done (a no-op when nothing is in flight);
 * adds the time blocked to ns_waited. Safe to call more than once per batch. */
static void frt_async_wait(frt_async *a) {
    int64_t t0 = frt_now_ns();
    pthread_mutex_lock(&a->mu);
    while (a->busy) pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
    a->ns_waited += frt_now_ns() - t0;
}

/* 1 when no batch is being read (the one submitted has landed, or none was): never blocks
 * on the reads, only on the driver's mutex. */
static int frt_async_idle(frt_async *a) {
    pthread_mutex_lock(&a->mu);
    int idle = !a->busy;
    pthread_mutex_unlock(&a->mu);
    return idle;
}

/* The kernels' view of a wait: a plain function and its argument (see kernels.ffn_rows). */
typedef struct frt_waiter {
    void (*wait)(void *ctx);
    void *ctx;
} frt_waiter;

static void frt_async_wait_cb(void *ctx) { frt_async_wait((frt_async *)ctx); }

/* Join the thread (waits for a batch in flight first). */
static void frt_async_stop(frt_async *a) {
    if (!a->started) return;
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    pthread_join(a->th, NULL);
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    a->started = 0;
}

/* Aligned allocation helpers. */
static inline void *frt_aligned_alloc(size_t alignment, size_t size) {
    void *p = NULL;
    if (size == 0) size = alignment;
    if (posix_memalign(&p, alignment, size) != 0) return NULL;
    return p;
}

#endif /* FLASHRT_FLASH_IO_H */
