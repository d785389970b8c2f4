"""Compute kernels: GEMV, the bundled-row FFN, float16 -> float32 conversion.

Two layers per kernel (see kernels.pxd):
  - a pointer kernel `*_ptr(...) noexcept nogil` that splits its rows into chunks run by the
    caller plus a small work-sharing pool (simd.h), each chunk calling the single-threaded
    inner loops of simd.h (AVX2/FMA/F16C or scalar);
  - a thin Python wrapper that checks its arguments (ValueError, never a crash), takes
    typed memoryviews and releases the GIL.

float16 arrays are read through a uint16 view of their bits. Every wrapper has a NumPy twin
with the same name and signature in `_reference_kernels.py` (the test oracle).

Threads: `n_threads <= 0` means every CPU in the affinity mask; problems too small to repay
splitting run on the caller alone. The Python layers pass flashrt.threads.default_threads().
Results do not depend on n_threads (chunking depends only on the shape).
"""
from libc.stdint cimport int64_t, uint16_t
cimport numpy as cnp

import numpy as np

cnp.import_array()

cdef extern from "simd.h" nogil:
    int FRT_PATH_SCALAR
    int FRT_PATH_AVX2
    int frt_path
    int frt_init_path()
    int frt_set_path(int want_avx2)
    int frt_avx2_available()
    int frt_cpu_has(const char* feature)
    void frt_gemv_f32(const float* W, const float* x, float* out, int64_t n, int64_t k)
    void frt_gemv_f16(const uint16_t* W, const float* x, float* out, int64_t n, int64_t k)
    void frt_f16_to_f32(const uint16_t* src, float* out, int64_t n)
    void frt_ffn_rows_f32(const float* rows, int64_t n, int64_t d, int gated, int act,
                          const float* x, const float* up_bias, float* h_out, float* acc)
    void frt_ffn_rows_f16(const uint16_t* rows, int64_t n, int64_t d, int gated, int act,
                          const float* x, const float* up_bias, float* h_out, float* acc)
    int frt_default_threads()
    int64_t frt_set_chunk_elems(int64_t elems)
    void frt_gemv_par(const void* W, int f16, const float* x, float* out,
                      int64_t n, int64_t k, int n_threads)
    int frt_ffn_rows_par(const void* rows, int f16, int64_t n, int64_t d, int gated, int act,
                         const float* x, const float* up_bias, float* h_out, float* out,
                         int n_threads)
    void frt_f16_to_f32_par(const uint16_t* src, float* out, int64_t n, int n_threads)
    void frt_act_inplace_par(float* a, int64_t n, int act, int n_threads)

ACT_SILU = 0
ACT_RELU = 1
ACT_GELU = 2
ACT_CODES = {"silu": ACT_SILU, "relu": ACT_RELU, "gelu": ACT_GELU}


frt_init_path()


# ---------------------------------------------------------------- pointer kernels
# Thin: the chunking and the work-sharing pool live in simd.h (see its comment on why the
# pool is not OpenMP: a caller must never wait for a worker the OS has not scheduled).

cdef void gemv_f32_ptr(const float* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil:
    frt_gemv_par(W, 0, x, out, n, k, n_threads)


cdef void gemv_f16_ptr(const uint16_t* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil:
    frt_gemv_par(W, 1, x, out, n, k, n_threads)


cdef int ffn_rows_f32_ptr(const float* rows, int64_t n, int64_t d, int gated, int act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil:
    return frt_ffn_rows_par(rows, 0, n, d, gated, act, x, up_bias, h_out, out, n_threads)


cdef int ffn_rows_f16_ptr(const uint16_t* rows, int64_t n, int64_t d, int gated, int act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil:
    return frt_ffn_rows_par(rows, 1, n, d, gated, act, x, up_bias, h_out, out, n_threads)


cdef void f16_to_f32_ptr(const uint16_t* src, float* out, int64_t n, int n_threads) noexcept nogil:
    frt_f16_to_f32_par(src, out, n, n_threads)


# ---------------------------------------------------------------- argument checks

cdef str _describe(a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    kind = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"{a.dtype} array of shape {a.shape} ({kind})"


cdef _need(str fn, str name, a, tuple dtypes, int ndim, bint writeable=False):
    """Check `a` is a C-contiguous ndarray of one of `dtypes` with `ndim` dimensions."""
    if (not isinstance(a, np.ndarray) or a.dtype not in dtypes or a.ndim != ndim
            or not a.flags.c_contiguous):
        want = " or ".join(str(np.dtype(t)) for t in dtypes)
        raise ValueError(f"{fn}: {name} must be a C-contiguous {ndim}-D {want} array, "
                         f"got {_describe(a)}; use np.ascontiguousarray(..., dtype=...)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{fn}: {name} must be writeable (it receives the result)")


cdef _need_len(str fn, str name, a, Py_ssize_t n, str what):
    if a.shape[0] != n:
        raise ValueError(f"{fn}: {name} has length {a.shape[0]} but must have {what} = {n}")


cdef int _act_code(str fn, act) except -1:
    if isinstance(act, str):
        if act not in ACT_CODES:
            raise ValueError(f"{fn}: unknown activation {act!r}; use one of {sorted(ACT_CODES)}")
        return ACT_CODES[act]
    if isinstance(act, (int, np.integer)) and int(act) in (ACT_SILU, ACT_RELU, ACT_GELU):
        return int(act)
    raise ValueError(f"{fn}: act must be 0 (silu), 1 (relu), 2 (gelu) or its name, got {act!r}")


_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)


cdef inline bint _ok(object a, int ndim, bint writeable) noexcept:
    """Fast check for the hot path: a C-contiguous ndarray with ndim dims (dtype checked by
    the caller). Anything else falls through to the slow path, which explains the problem."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef inline int _type(object a) noexcept:
    return cnp.PyArray_TYPE(<cnp.ndarray>a)


# ---------------------------------------------------------------- Python wrappers

def gemv(W, x, out, int n_threads=0):
    """out (n,) float32 = W (n, k) @ x (k,), W float16 or float32; float32 accumulation.

    W: (n, k) float16|float32, C-contiguous       # IN
    x: (k,) float32                                # IN
    out: (n,) float32, overwritten                 # OUT
    Returns out.
    """
    cdef int64_t n, k
    cdef int wt
    if _ok(W, 2, False) and _ok(x, 1, False) and _ok(out, 1, True):       # hot path
        wt = _type(W)
        n = cnp.PyArray_DIM(<cnp.ndarray>W, 0)
        k = cnp.PyArray_DIM(<cnp.ndarray>W, 1)
        if ((wt == cnp.NPY_FLOAT16 or wt == cnp.NPY_FLOAT) and _type(x) == cnp.NPY_FLOAT
                and _type(out) == cnp.NPY_FLOAT and n > 0 and k > 0
                and cnp.PyArray_DIM(<cnp.ndarray>x, 0) == k
                and cnp.PyArray_DIM(<cnp.ndarray>out, 0) == n):
            with nogil:
                if wt == cnp.NPY_FLOAT16:
                    gemv_f16_ptr(<const uint16_t*>cnp.PyArray_DATA(<cnp.ndarray>W),
                                 <const float*>cnp.PyArray_DATA(<cnp.ndarray>x),
                                 <float*>cnp.PyArray_DATA(<cnp.ndarray>out), n, k, n_threads)
                else:
                    gemv_f32_ptr(<const float*>cnp.PyArray_DATA(<cnp.ndarray>W),
                                 <const float*>cnp.PyArray_DATA(<cnp.ndarray>x),
                                 <float*>cnp.PyArray_DATA(<cnp.ndarray>out), n, k, n_threads)
            return out
    _need("gemv", "W", W, (_F16, _F32), 2)
    _need("gemv", "x", x, (_F32,), 1)
    _need("gemv", "out", out, (_F32,), 1, writeable=True)
    n = W.shape[0]
    k = W.shape[1]
    _need_len("gemv", "x", x, k, "W.shape[1]")
    _need_len("gemv", "out", out, n, "W.shape[0]")
    if n == 0:
        return out
    if k == 0:
        out[...] = 0.0
        return out
    cdef const float[::1] xv = x
    cdef float[::1] ov = out
    cdef const float[:, ::1] w32
    cdef const uint16_t[:, ::1] w16
    if W.dtype == _F16:
        w16 = W.view(np.uint16)
        with nogil:
            gemv_f16_ptr(&w16[0, 0], &xv[0], &ov[0], n, k, n_threads)
    else:
        w32 = W
        with nogil:
            gemv_f32_ptr(&w32[0, 0], &xv[0], &ov[0], n, k, n_threads)
    return out


def ffn_rows(rows, x, out, gated, act, up_bias=None, h_out=None, int n_threads=0):
    """The FFN over n bundle rows: out (d,) = sum_i h_i * down_i.

    rows: (n, n_parts * d) float16|float32; parts gate, up, down (gated) or up, down  # IN
    x: (d,) float32                                                                     # IN
    out: (d,) float32, overwritten                                                     # OUT
    gated: bool; act: 0/"silu", 1/"relu", 2/"gelu" (exact erf gelu)
      gated:     h_i = act(gate_i . x) * (up_i . x)
      otherwise: h_i = act(up_i . x + up_bias[i])
    up_bias: (n,) float32 or None (not gated only)                                      # IN
    h_out: (n,) float32 or None, receives h                                             # OUT
    Returns out.
    """
    cdef bint g = bool(gated)
    cdef int a = _act_code("ffn_rows", act)
    cdef int n_parts = 3 if g else 2
    cdef int rt, rc = 0
    cdef int64_t n, d
    cdef const float* bptr = NULL
    cdef float* hptr = NULL
    cdef const void* rptr
    if _ok(rows, 2, False) and _ok(x, 1, False) and _ok(out, 1, True):     # hot path
        rt = _type(rows)
        n = cnp.PyArray_DIM(<cnp.ndarray>rows, 0)
        d = cnp.PyArray_DIM(<cnp.ndarray>x, 0)
        if ((rt == cnp.NPY_FLOAT16 or rt == cnp.NPY_FLOAT) and _type(x) == cnp.NPY_FLOAT
                and _type(out) == cnp.NPY_FLOAT and n > 0 and d > 0
                and cnp.PyArray_DIM(<cnp.ndarray>rows, 1) == n_parts * d
                and cnp.PyArray_DIM(<cnp.ndarray>out, 0) == d
                and (up_bias is None or (not g and _ok(up_bias, 1, False)
                                         and _type(up_bias) == cnp.NPY_FLOAT
                                         and cnp.PyArray_DIM(<cnp.ndarray>up_bias, 0) == n))
                and (h_out is None or (_ok(h_out, 1, True) and _type(h_out) == cnp.NPY_FLOAT
                                       and cnp.PyArray_DIM(<cnp.ndarray>h_out, 0) == n))):
            if up_bias is not None:
                bptr = <const float*>cnp.PyArray_DATA(<cnp.ndarray>up_bias)
            if h_out is not None:
                hptr = <float*>cnp.PyArray_DATA(<cnp.ndarray>h_out)
            rptr = cnp.PyArray_DATA(<cnp.ndarray>rows)
            with nogil:
                if rt == cnp.NPY_FLOAT16:
                    rc = ffn_rows_f16_ptr(<const uint16_t*>rptr, n, d, g, a,
                                          <const float*>cnp.PyArray_DATA(<cnp.ndarray>x), bptr, hptr,
                                          <float*>cnp.PyArray_DATA(<cnp.ndarray>out), n_threads)
                else:
                    rc = ffn_rows_f32_ptr(<const float*>rptr, n, d, g, a,
                                          <const float*>cnp.PyArray_DATA(<cnp.ndarray>x), bptr, hptr,
                                          <float*>cnp.PyArray_DATA(<cnp.ndarray>out), n_threads)
            if rc != 0:
                raise MemoryError("ffn_rows: could not allocate the per-chunk accumulators")
            return out
    _need("ffn_rows", "rows", rows, (_F16, _F32), 2)
    _need("ffn_rows", "x", x, (_F32,), 1)
    _need("ffn_rows", "out", out, (_F32,), 1, writeable=True)
    n = rows.shape[0]
    d = x.shape[0]
    if rows.shape[1] != n_parts * d:
        raise ValueError(f"ffn_rows: rows has {rows.shape[1]} columns but a "
                         f"{'gated' if g else 'non-gated'} bundle of dim {d} (= len(x)) "
                         f"needs n_parts * d = {n_parts} * {d} = {n_parts * d}")
    _need_len("ffn_rows", "out", out, d, "len(x)")
    cdef const float[::1] bv
    cdef float[::1] hv
    if up_bias is not None:
        if g:
            raise ValueError("ffn_rows: up_bias is only supported for non-gated FFNs")
        _need("ffn_rows", "up_bias", up_bias, (_F32,), 1)
        _need_len("ffn_rows", "up_bias", up_bias, n, "rows.shape[0]")
        if n > 0:
            bv = up_bias
            bptr = &bv[0]
    if h_out is not None:
        _need("ffn_rows", "h_out", h_out, (_F32,), 1, writeable=True)
        _need_len("ffn_rows", "h_out", h_out, n, "rows.shape[0]")
        if n > 0:
            hv = h_out
            hptr = &hv[0]
    if d == 0:
        return out
    if n == 0:
        out[...] = 0.0
        return out
    cdef const float[::1] xv = x
    cdef float[::1] ov = out
    cdef const float[:, ::1] r32
    cdef const uint16_t[:, ::1] r16
    if rows.dtype == _F16:
        r16 = rows.view(np.uint16)
        with nogil:
            rc = ffn_rows_f16_ptr(&r16[0, 0], n, d, g, a, &xv[0], bptr, hptr, &ov[0], n_threads)
    else:
        r32 = rows
        with nogil:
            rc = ffn_rows_f32_ptr(&r32[0, 0], n, d, g, a, &xv[0], bptr, hptr, &ov[0], n_threads)
    if rc != 0:
        raise MemoryError("ffn_rows: could not allocate the per-chunk accumulators")
    return out


def f16_to_f32(src, out, int n_threads=0):
    """out = float32(src) for C-contiguous buffers of any shape with the same number of elements.

    src: float16, C-contiguous      # IN
    out: float32, C-contiguous      # OUT
    Returns out.
    """
    if not isinstance(src, np.ndarray) or src.dtype != _F16 or not src.flags.c_contiguous:
        raise ValueError(f"f16_to_f32: src must be a C-contiguous float16 array, got {_describe(src)}")
    if not isinstance(out, np.ndarray) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError(f"f16_to_f32: out must be a C-contiguous float32 array, got {_describe(out)}")
    if not out.flags.writeable:
        raise ValueError("f16_to_f32: out must be writeable (it receives the result)")
    if src.size != out.size:
        raise ValueError(f"f16_to_f32: src has {src.size} elements but out has {out.size}")
    cdef int64_t n = src.size
    if n == 0:
        return out
    cdef const uint16_t[::1] sv = src.reshape(-1).view(np.uint16)
    cdef float[::1] ov = out.reshape(-1)
    with nogil:
        f16_to_f32_ptr(&sv[0], &ov[0], n, n_threads)
    return out


def activation_inplace(a, act, int n_threads=0):
    """a = act(a) elementwise for a C-contiguous float32 array of any shape (silu, relu, gelu).

    a: float32, C-contiguous      # IN/OUT
    Returns a.
    """
    cdef int code = _act_code("activation_inplace", act)
    if not isinstance(a, np.ndarray) or a.dtype != _F32 or not a.flags.c_contiguous:
        raise ValueError(f"activation_inplace: a must be a C-contiguous float32 array, got {_describe(a)}")
    if not a.flags.writeable:
        raise ValueError("activation_inplace: a must be writeable")
    cdef int64_t n = a.size
    if n == 0:
        return a
    cdef float[::1] av = a.reshape(-1)
    with nogil:
        frt_act_inplace_par(&av[0], n, code, n_threads)
    return a


# ---------------------------------------------------------------- code path

def cpu_features():
    """Which CPU features exist and which kernel path is active.

    Returns {"path": "avx2" | "scalar", "avx2": bool, "fma": bool, "f16c": bool,
             "avx512f": bool, "avx2_available": bool, "forced_scalar_by_env": bool,
             "omp_max_threads": int}
    """
    import os
    return {
        "path": "avx2" if frt_path == FRT_PATH_AVX2 else "scalar",
        "avx2": bool(frt_cpu_has(b"avx2")),
        "fma": bool(frt_cpu_has(b"fma")),
        "f16c": bool(frt_cpu_has(b"f16c")),
        "avx512f": bool(frt_cpu_has(b"avx512f")),
        "avx2_available": bool(frt_avx2_available()),
        "forced_scalar_by_env": os.environ.get("FLASHRT_KERNELS") == "scalar",
        "default_threads": frt_default_threads(),
    }


def _set_chunk_elems(int64_t elems):
    """Set the minimum elements per work chunk (<= 0: the defaults); returns the old gemv value.
    Tests set 1 so tiny problems split into many chunks across threads."""
    return frt_set_chunk_elems(elems)


def set_path(str path):
    """Switch the kernel path at run time ("avx2", "scalar" or "auto"); returns the path now active.

    For tests and benchmarks: not thread-safe against kernels running concurrently.
    "avx2" on a CPU without AVX2/FMA/F16C raises ValueError.
    """
    if path not in ("avx2", "scalar", "auto"):
        raise ValueError(f"set_path: path must be 'avx2', 'scalar' or 'auto', got {path!r}")
    if path == "avx2" and not frt_avx2_available():
        raise ValueError("set_path: this CPU lacks AVX2/FMA/F16C; only 'scalar' is available")
    frt_set_path(0 if path == "scalar" else 1)
    return "avx2" if frt_path == FRT_PATH_AVX2 else "scalar"
