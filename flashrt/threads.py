"""The one thread-count policy: how many threads the compute kernels use by default."""
import os
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["default_threads"]


def _usable_cpus():
    n = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            n = min(n, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, n)


def _parse(name, value):
    # OMP_NUM_THREADS may be a nesting list ("4,2"): the first level is ours.
    head = value.split(",")[0].strip()
    try:
        n = int(head)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a thread count; set it to a positive integer "
                         "or unset it") from None
    if n < 1:
        raise ValueError(f"{name}={value!r} must be at least 1; unset it to use every CPU")
    return n


def default_threads():
    """Threads for the kernels: FLASHRT_THREADS, else OMP_NUM_THREADS, else every usable CPU;
    always capped at the CPUs this process may run on (os.cpu_count() / affinity mask)."""
    cap = _usable_cpus()
    for name in ("FLASHRT_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            return min(_parse(name, value), cap)
    return cap


_blas_controller = None


def blas_single_threaded():
    """A context in which NumPy's BLAS runs on one thread.

    flashrt's own kernels keep every core busy with a spinning thread pool; a multi-threaded
    BLAS beside them fights for the same cores (measured on SmolLM2 prefill, 2 cores:
    101 tokens in 0.43 s with one BLAS thread, 0.9-7 s with two). Entered once per
    generation, not per token: the limit is process-wide while it lasts.
    """
    return _SharedBlasLimit()


_blas_lock = threading.Lock()
_blas_users = 0  # generations inside a limit, across every Generator and thread
_blas_limiter = None


class _SharedBlasLimit:
    """The process-wide limit, counted: the first user sets it, the last one restores the
    original, so overlapping generations in several threads cannot leave BLAS stuck at 1."""

    def __enter__(self):
        global _blas_controller, _blas_users, _blas_limiter
        with _blas_lock:
            if _blas_users == 0:
                if _blas_controller is None:
                    _blas_controller = ThreadpoolController()
                _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
            _blas_users += 1
        return self

    def __exit__(self, *exc):
        global _blas_users, _blas_limiter
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None
        return False
