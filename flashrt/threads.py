"""The one thread-count policy: how many threads the compute kernels use by default."""
import os

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
    global _blas_controller
    from threadpoolctl import ThreadpoolController

    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")
