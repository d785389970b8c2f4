"""y = x @ W.T (+ bias) for float16, float32 or quantized (QMatrix) weights in HF layout
(out_features, in_features).

One token (T == 1, decode) runs the GEMV kernel, which converts float16 on the fly and runs
quantized rows as integer dot products against a per-block int8 copy of x.
Many tokens (T > 1, prefill) run BLAS: float32 weights directly; float16 and quantized weights
are converted block by block (rows of W) into a reused float32 scratch, so the full float32
copy never exists. NumPy's own float16 matmul is never used (it is ~100x slower).
"""
import threading

import numpy as np

from flashrt._core import kernels
from flashrt.quant import QMatrix
from flashrt.threads import default_threads

__all__ = ["linear", "KernelLinear", "scratch"]

SCRATCH_ELEMS = 1 << 19          # float32 elements per converted block of W (2 MiB)
MIN_BLOCK_ROWS = 64
MAX_BLOCK_ROWS = 1024

_local = threading.local()       # per-thread float32 scratch for converted blocks of W


def scratch(n_elems):
    """This thread's reused float32 buffer of at least n_elems (for converted float16 blocks)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n_elems:
        buf = np.empty(n_elems, dtype=np.float32)
        _local.buf = buf
    return buf


def block_rows(in_dim, n_rows):
    """Rows of W converted per block: about SCRATCH_ELEMS elements, a multiple of 8."""
    rows = SCRATCH_ELEMS // max(1, in_dim)
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows)) // 8 * 8
    return max(1, min(n_rows, rows))


def _check(W, x, bias, out):
    if isinstance(W, QMatrix):
        pass
    elif (not isinstance(W, np.ndarray) or W.ndim != 2 or W.dtype not in (np.float16, np.float32)
            or not W.flags.c_contiguous):
        raise ValueError("linear: W must be a C-contiguous 2-D float16 or float32 array or a "
                         f"QMatrix (out_features, in_features), got {_describe(W)}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim not in (1, 2):
        raise ValueError(f"linear: x must be a float32 array (T, in_features), got {_describe(x)}")
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but W {W.shape} expects {W.shape[1]}")
    if bias is not None:
        if (not isinstance(bias, np.ndarray) or bias.dtype != np.float32
                or bias.shape != (W.shape[0],)):
            raise ValueError(f"linear: bias must be a float32 array of shape ({W.shape[0]},), "
                             f"got {_describe(bias)}")
    if out is not None:
        want = x.shape[:-1] + (W.shape[0],)
        if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != want
                or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"linear: out must be a writeable C-contiguous float32 array of "
                             f"shape {want}, got {_describe(out)}")


def _describe(a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    return f"{a.dtype} array of shape {a.shape}" + ("" if a.flags.c_contiguous else " (non-contiguous)")


def linear(W, x, bias=None, n_threads=None, out=None):
    """x @ W.T (+ bias).

    W: (out_features, in_features) float16|float32, C-contiguous, or a QMatrix  # IN
    x: (T, in_features) float32 (or (in_features,))                 # IN
    bias: (out_features,) float32 or None                          # IN
    out: (T, out_features) float32 or None (allocated)             # OUT
    Returns (T, out_features) float32 (the shape of x with the last axis replaced).
    """
    _check(W, x, bias, out)
    if n_threads is None:
        n_threads = default_threads()
    squeeze = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if squeeze else x)   # (T, in_features)
    n_out, in_dim = W.shape
    T = x2.shape[0]
    y = np.empty((T, n_out), dtype=np.float32) if out is None else out.reshape(T, n_out)

    if isinstance(W, QMatrix):
        if T == 1:
            kernels.gemv(W.data, x2[0], y[0], n_threads, W.qtype)
        else:
            _matmul_blocks(W.data, W.qtype, in_dim, x2, y, n_threads)
    elif T == 1:
        kernels.gemv(W, x2[0], y[0], n_threads)
    elif W.dtype == np.float32:
        np.matmul(x2, W.T, out=y)
    else:
        _matmul_blocks(W, None, in_dim, x2, y, n_threads)
    if bias is not None:
        y += bias
    return y[0] if squeeze else y


class KernelLinear:
    """`linear` with a fixed thread count, as the models take it (linear(W, x, bias)). A model
    handed one knows its products run these kernels, so a decode step may call the fused
    kernels that contain them (kernels.attn_step) and get the same numbers."""

    __slots__ = ("n_threads",)

    def __init__(self, n_threads=None):
        self.n_threads = n_threads

    def __call__(self, W, x, bias=None, out=None):
        return linear(W, x, bias, self.n_threads, out)

    def threads(self):
        """The kernels' thread count for this call (None: flashrt.threads.default_threads())."""
        return default_threads() if self.n_threads is None else self.n_threads


def _matmul_blocks(W, qtype, in_dim, x, y, n_threads):
    """y (T, n) = x (T, k) @ W.T for float16 W (qtype None) or quantized rows W (n, row_bytes),
    converting row blocks of W to float32."""
    n_out = W.shape[0]
    rows = block_rows(in_dim, n_out)
    buf = scratch(rows * in_dim)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        blk = buf[: (r1 - r0) * in_dim].reshape(r1 - r0, in_dim)   # (rows, in_dim) float32
        kernels.to_f32(W[r0:r1], blk, qtype, n_threads)
        np.matmul(x, blk.T, out=y[:, r0:r1])
