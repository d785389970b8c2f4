"""Compute kernels: GEMV, the bundled-row FFN, conversion to float32, for every storage type.

Storage types: float32, float16, and the block-quantized q8_0, q4_0, q4_1 (blocks of 32
weights with a float16 scale, byte for byte ggml's blocks; see quant.h). Float matrices are
float16/float32 arrays; a quantized matrix of n rows of k weights is a uint8 array
(n, row_bytes(qtype, k)) and every kernel taking one gets `qtype=` too.

Two layers per kernel (see kernels.pxd):
  - a pointer kernel `*_ptr(...) noexcept nogil` that splits its rows into chunks run by the
    caller plus a small work-sharing pool (simd.h), each chunk calling the single-threaded
    inner loops of simd.h / quant.h (AVX2/FMA/F16C or scalar);
  - a thin Python wrapper: one cheap check of every argument, one dispatch into the pointer
    kernel with the GIL released; anything the check rejects goes to a slow path that explains
    the problem (ValueError, never a crash) or handles empty shapes.

Quantized GEMV and FFN quantize x per block of 32 (int8, scale amax / 127) and use integer
dot products: the result is dequant(W) @ dequant(quant(x)), which is what the NumPy twins
(`_reference_kernels.py`, same names and signatures, the test oracle) compute.

Threads: `n_threads <= 0` means every CPU in the affinity mask; problems too small to repay
splitting run on the caller alone. The Python layers pass flashrt.threads.default_threads().
Results do not depend on n_threads (chunking depends only on the shape).
"""
from libc.stdint cimport int8_t, int64_t, uint16_t
from cpython.pycapsule cimport PyCapsule_GetPointer
cimport numpy as cnp

import numpy as np

cnp.import_array()

cdef extern from "simd.h" nogil:
    int FRT_PATH_SCALAR
    int FRT_PATH_AVX2
    int FRT_T_F32
    int FRT_T_F16
    int FRT_T_Q8_0
    int FRT_T_Q4_0
    int FRT_T_Q4_1
    int FRT_QK
    int frt_path
    int frt_init_path()
    int frt_set_path(int want_avx2)
    int frt_avx2_available()
    int frt_cpu_has(const char* feature)
    int64_t frt_type_unit_bytes(int t)
    int frt_default_threads()
    int64_t frt_set_chunk_elems(int64_t elems)
    int FRT_PF_AHEAD
    int frt_gemv_par(const void* W, int type, const float* x, float* out,
                     int64_t n, int64_t k, int n_threads)
    int frt_ffn_rows_par(const void* rows, int type, int type_down, int64_t n, int64_t d, int gated, frt_act_t act,
                         const float* x, const float* up_bias, float* h_out, float* out,
                         int n_threads)
    int frt_ffn_rows_wait(const void* rows, int type, int type_down, int64_t n, int64_t d, int gated, frt_act_t act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads, int64_t n_ready, void (*wait)(void*) noexcept nogil, void* wait_ctx)
    int64_t frt_ffn_ready_rows(int64_t n, int64_t d, int gated, int64_t n_ready)
    void frt_to_f32_par(const void* src, int type, float* out, int64_t n, int n_threads)
    void frt_f16_to_f32_par(const uint16_t* src, float* out, int64_t n, int n_threads)
    void frt_act_inplace_par(float* a, int64_t n, frt_act_t act, int n_threads)
    void frt_quantize_x(const float* x, int64_t k, int8_t* q, float* d, float* s)

cdef extern from "step.h" nogil:
    void frt_rms_norm(const float* x, const float* w, float eps, float* out, int64_t T, int64_t d)
    void frt_rope(float* x, const float* cos_t, const float* sin_t, int64_t T, int64_t H, int64_t hd)
    int frt_attend_one(const float* q, const float* K, const float* V, int64_t S, int64_t first,
                       int64_t n_heads, int64_t n_kv, int64_t hd, float scale, float* out)
    int frt_attn_step(float* x, const float* add, const float* in_w, const float* post_w,
                      float eps, const void* Wqkv, int t_qkv, const float* bqkv,
                      const void* Wo, int t_o, const float* bo, int64_t d, int64_t n_heads,
                      int64_t n_kv, int64_t hd, const float* cos_row, const float* sin_row,
                      float* K, float* V, int64_t pos, int64_t first, float scale,
                      float* qkv, float* att, float* o, float* xn, int n_threads)

ACT_SILU = 0
ACT_RELU = 1
ACT_GELU = 2          # exact (erf)
ACT_GELU_TANH = 3     # tanh approximation (HF gelu_pytorch_tanh)
ACT_FATRELU = 4       # v > act_param ? v : 0
ACT_DRELU = 5         # gated: relu(gate . x) * relu(up . x); not gated: relu
ACT_CODES = {"silu": ACT_SILU, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH,
             "fatrelu": ACT_FATRELU, "drelu": ACT_DRELU}

# Storage types: name -> code (the codes of simd.h / quant.h).
STORAGE_CODES = {"float32": FRT_T_F32, "float16": FRT_T_F16, "q8_0": FRT_T_Q8_0,
                 "q4_0": FRT_T_Q4_0, "q4_1": FRT_T_Q4_1}
QUANT_TYPES = ("q8_0", "q4_0", "q4_1")
BLOCK_ELEMS = 32                                   # weights per quantized block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # bytes per quantized block


def row_bytes(str qtype, int64_t k):
    """Bytes of one row of k weights stored as `qtype` (k % 32 == 0 for quantized types)."""
    if qtype not in STORAGE_CODES:
        raise ValueError(f"unknown storage type {qtype!r}; use one of {sorted(STORAGE_CODES)}")
    if qtype in BLOCK_BYTES:
        if k % BLOCK_ELEMS:
            raise ValueError(f"{qtype} rows need a multiple of {BLOCK_ELEMS} weights, got {k}")
        return k // BLOCK_ELEMS * BLOCK_BYTES[qtype]
    return k * (4 if qtype == "float32" else 2)


frt_init_path()


# ---------------------------------------------------------------- pointer kernels
# Thin: the chunking and the work-sharing pool live in simd.h (see its comment on why the
# pool is not OpenMP: a caller must never wait for a worker the OS has not scheduled).

cdef int gemv_ptr(const void* W, int type, const float* x, float* out,
                  int64_t n, int64_t k, int n_threads) noexcept nogil:
    return frt_gemv_par(W, type, x, out, n, k, n_threads)


cdef void gemv_f32_ptr(const float* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil:
    frt_gemv_par(W, FRT_T_F32, x, out, n, k, n_threads)


cdef void gemv_f16_ptr(const uint16_t* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil:
    frt_gemv_par(W, FRT_T_F16, x, out, n, k, n_threads)


cdef int ffn_rows_ptr(const void* rows, int type, int type_down, int64_t n, int64_t d, int gated,
                      frt_act_t act, const float* x, const float* up_bias, float* h_out, float* out,
                      int n_threads) noexcept nogil:
    return frt_ffn_rows_par(rows, type, type_down, n, d, gated, act, x, up_bias, h_out, out, n_threads)


cdef int ffn_rows_f32_ptr(const float* rows, int64_t n, int64_t d, int gated, frt_act_t act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil:
    return frt_ffn_rows_par(rows, FRT_T_F32, FRT_T_F32, n, d, gated, act, x, up_bias, h_out, out, n_threads)


cdef int ffn_rows_f16_ptr(const uint16_t* rows, int64_t n, int64_t d, int gated, frt_act_t act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil:
    return frt_ffn_rows_par(rows, FRT_T_F16, FRT_T_F16, n, d, gated, act, x, up_bias, h_out, out, n_threads)


cdef void to_f32_ptr(const void* src, int type, float* out, int64_t n, int n_threads) noexcept nogil:
    frt_to_f32_par(src, type, out, n, n_threads)


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


cdef frt_act_t _act(str fn, act, act_param) except *:
    """The activation `act` (a name of ACT_CODES or its code) with its parameter (FATReLU's
    threshold, a finite float; 0 for the others)."""
    cdef frt_act_t a
    if isinstance(act, str):
        if act not in ACT_CODES:
            raise ValueError(f"{fn}: unknown activation {act!r}; use one of {sorted(ACT_CODES)}")
        a.kind = ACT_CODES[act]
    elif isinstance(act, (int, np.integer)) and int(act) in ACT_CODES.values():
        a.kind = int(act)
    else:
        raise ValueError(f"{fn}: act must be one of {sorted(ACT_CODES.items(), key=lambda kv: kv[1])} "
                         f"(a name or its code), got {act!r}")
    if not np.isfinite(act_param):
        raise ValueError(f"{fn}: act_param must be a finite number, got {act_param!r}")
    a.param = float(act_param)
    return a


_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)


cdef inline bint _ok(object a, int ndim, bint writeable) noexcept:
    """Fast check for the hot path: a C-contiguous ndarray with ndim dims (dtype checked by
    the caller). Anything else falls through to the slow path, which explains the problem."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef inline bint _f32(object a, int ndim, bint writeable) noexcept:
    return _ok(a, ndim, writeable) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT


cdef inline int64_t _dim(object a, int i) noexcept:
    return cnp.PyArray_DIM(<cnp.ndarray>a, i)


cdef inline void* _data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int _wtype(object W, object qtype) noexcept:
    """The storage code of weights W given `qtype`, or -1 when they do not go together
    (W float16/float32 with qtype None or its own name; W uint8 with a quantized qtype)."""
    if not cnp.PyArray_Check(W):
        return -1
    cdef int npy = cnp.PyArray_TYPE(<cnp.ndarray>W)
    cdef int t
    if qtype is None:
        return FRT_T_F16 if npy == cnp.NPY_FLOAT16 else FRT_T_F32 if npy == cnp.NPY_FLOAT else -1
    t = STORAGE_CODES.get(qtype, -1) if isinstance(qtype, str) else -1
    if t == FRT_T_F16:
        return t if npy == cnp.NPY_FLOAT16 else -1
    if t == FRT_T_F32:
        return t if npy == cnp.NPY_FLOAT else -1
    return t if (t >= 0 and npy == cnp.NPY_UINT8) else -1


cdef inline int64_t _row_len(int t, int64_t k) noexcept:
    """Array row length (elements for float types, bytes for quantized) of k weights; -1 if
    k is not a whole number of blocks."""
    if t == FRT_T_F16 or t == FRT_T_F32:
        return k
    if k % FRT_QK:
        return -1
    return k // FRT_QK * frt_type_unit_bytes(t)


cdef inline int _down_type(int t, object down_qtype) noexcept:
    """The down parts' storage code: a quantized type with quantized rows, else -1."""
    cdef int td = STORAGE_CODES.get(down_qtype, -1) if isinstance(down_qtype, str) else -1
    if t == FRT_T_F16 or t == FRT_T_F32 or td == FRT_T_F16 or td == FRT_T_F32:
        return t if td == t else -1
    return td


cdef int _explain_type(str fn, str name, W, qtype) except -1:
    """Raise the ValueError saying why W and qtype do not go together."""
    if qtype is not None and (not isinstance(qtype, str) or qtype not in STORAGE_CODES):
        raise ValueError(f"{fn}: unknown qtype {qtype!r}; use None (float16/float32 weights) "
                         f"or one of {sorted(STORAGE_CODES)}")
    if qtype is None or qtype in ("float16", "float32"):
        if isinstance(W, np.ndarray) and W.dtype == _U8:
            raise ValueError(f"{fn}: {name} is uint8 (quantized blocks) but qtype is {qtype!r}; "
                             f"pass qtype= one of {list(QUANT_TYPES)}")
        dt = (_F16, _F32) if qtype is None else (np.dtype(qtype),)
        _need(fn, name, W, dt, 2)
    else:
        _need(fn, name, W, (_U8,), 2)
    return 0


cdef _check_row_len(str fn, str name, W, str qtype_name, int t, int64_t k, int n_parts):
    cdef int64_t rl = _row_len(t, k)
    if rl < 0:
        raise ValueError(f"{fn}: {qtype_name} weights need len(x) a multiple of {BLOCK_ELEMS}, "
                         f"got {k}")
    if W.shape[1] != n_parts * rl:
        if t == FRT_T_F16 or t == FRT_T_F32:
            raise ValueError(f"{fn}: x has length {k} but must have {name}.shape[1] = {W.shape[1]}")
        raise ValueError(f"{fn}: {name} has {W.shape[1]} bytes per row but {n_parts} {qtype_name} "
                         f"part(s) of len(x) = {k} weights need {n_parts * rl}")


# ---------------------------------------------------------------- Python wrappers

def gemv(W, x, out, int n_threads=0, qtype=None):
    """out (n,) float32 = W (n, k) @ x (k,); float32 accumulation.

    W: (n, k) float16|float32, or (n, row_bytes(qtype, k)) uint8 blocks, C-contiguous  # IN
    x: (k,) float32 (k % 32 == 0 for quantized W)                                       # IN
    out: (n,) float32, overwritten                                                     # OUT
    qtype: None (float W) or "q8_0" | "q4_0" | "q4_1"
    Returns out.
    """
    cdef int t = _wtype(W, qtype)
    cdef int rc = 0
    cdef int64_t n, k
    cdef const void* wp
    cdef const float* xp
    cdef float* op
    if t >= 0 and _ok(W, 2, False) and _f32(x, 1, False) and _f32(out, 1, True):
        n = _dim(W, 0)
        k = _dim(x, 0)
        if n > 0 and k > 0 and _dim(out, 0) == n and _dim(W, 1) == _row_len(t, k):  # hot path
            wp, xp, op = _data(W), <const float*>_data(x), <float*>_data(out)
            with nogil:
                rc = frt_gemv_par(wp, t, xp, op, n, k, n_threads)
            if rc != 0:
                raise MemoryError("gemv: could not allocate the quantized copy of x")
            return out
    # slow path: say what is wrong, or handle empty shapes
    if t < 0:
        _explain_type("gemv", "W", W, qtype)
    _need("gemv", "W", W, (W.dtype,), 2)
    _need("gemv", "x", x, (_F32,), 1)
    _need("gemv", "out", out, (_F32,), 1, writeable=True)
    n = W.shape[0]
    k = x.shape[0]
    _check_row_len("gemv", "W", W, qtype or str(W.dtype), t, k, 1)
    _need_len("gemv", "out", out, n, "W.shape[0]")
    if n > 0:
        out[...] = 0.0              # k == 0: empty sums
    return out


ctypedef struct _waiter:            # the loader's frt_waiter (flash_io.h): a wait function and its argument
    void (*wait)(void* ctx) noexcept nogil
    void* ctx


def ffn_ready_rows(int64_t n, int64_t d, gated, int64_t n_ready):
    """How many of n rows ffn_rows(..., n_ready=, wait=) computes before it waits, when rows
    [0, n_ready) are ready: the kernel's row chunks that lie wholly inside them (the chunking
    depends on the shape only; small problems are not split, and then wait comes first)."""
    return frt_ffn_ready_rows(n, d, bool(gated), n_ready)


def ffn_rows(rows, x, out, gated, act, up_bias=None, h_out=None, int n_threads=0, qtype=None,
             down_qtype=None, int64_t n_ready=-1, wait=None, act_param=0.0):
    """The FFN over n bundle rows: out (d,) = sum_i h_i * down_i.

    rows: (n, n_parts * d) float16|float32, or uint8 (n, (n_parts - 1) * row_bytes(qtype, d)
          + row_bytes(down_qtype, d)); parts gate, up, down (gated) or up, down, each d weights  # IN
    x: (d,) float32 (d % 32 == 0 for quantized rows)                                    # IN
    out: (d,) float32, overwritten                                                     # OUT
    gated: bool; act: a name of ACT_CODES or its code: "silu", "relu", "gelu" (exact erf),
      "gelu_tanh", "fatrelu" (v > act_param ? v : 0), "drelu"
      gated:     h_i = act(gate_i . x) * (up_i . x)   (drelu: relu(gate_i . x) * relu(up_i . x))
      otherwise: h_i = act(up_i . x + up_bias[i])
    up_bias: (n,) float32 or None (not gated only)                                      # IN
    h_out: (n,) float32 or None, receives h                                             # OUT
    qtype: None (float rows) or "q8_0" | "q4_0" | "q4_1"
    down_qtype: the down parts' quantized type when it differs from qtype (None: qtype)
    n_ready, wait: rows [n_ready, n) are still being read (Loader.submit_rows): the kernel
      computes what lies wholly in [0, n_ready) (ffn_ready_rows), calls wait (the capsule of
      Loader.waiter(), without the GIL) and then the rest. The result is bit for bit the one
      without them. wait=None: every row is ready.
    Returns out.
    """
    cdef bint g = bool(gated)
    cdef _waiter* wt = NULL
    if wait is not None:
        wt = <_waiter*>PyCapsule_GetPointer(wait, b"flashrt.frt_waiter")
    cdef frt_act_t a = _act("ffn_rows", act, act_param)
    cdef int n_parts = 3 if g else 2
    cdef int t = _wtype(rows, qtype)
    cdef int td = t if down_qtype is None else _down_type(t, down_qtype)
    cdef int rc = 0
    cdef int64_t n, d, rl, rld
    cdef const void* wp
    cdef const float* xp
    cdef float* op
    cdef const float* bptr = NULL
    cdef float* hptr = NULL
    if t >= 0 and td >= 0 and _ok(rows, 2, False) and _f32(x, 1, False) and _f32(out, 1, True):
        n = _dim(rows, 0)
        d = _dim(x, 0)
        rl = _row_len(t, d)
        rld = _row_len(td, d)
        if (n > 0 and d > 0 and _dim(out, 0) == d and rl >= 0 and rld >= 0
                and _dim(rows, 1) == (n_parts - 1) * rl + rld
                and (up_bias is None or (not g and _f32(up_bias, 1, False) and _dim(up_bias, 0) == n))
                and (h_out is None or (_f32(h_out, 1, True) and _dim(h_out, 0) == n))):  # hot path
            if up_bias is not None:
                bptr = <const float*>_data(up_bias)
            if h_out is not None:
                hptr = <float*>_data(h_out)
            wp, xp, op = _data(rows), <const float*>_data(x), <float*>_data(out)
            with nogil:
                if wt == NULL:
                    rc = frt_ffn_rows_par(wp, t, td, n, d, g, a, xp, bptr, hptr, op, n_threads)
                else:
                    rc = frt_ffn_rows_wait(wp, t, td, n, d, g, a, xp, bptr, hptr, op, n_threads,
                                           n_ready if n_ready >= 0 else n, wt.wait, wt.ctx)
            if rc != 0:
                raise MemoryError("ffn_rows: could not allocate the kernel's scratch memory")
            return out
    # slow path: say what is wrong, or handle empty shapes
    if t < 0:
        _explain_type("ffn_rows", "rows", rows, qtype)
    if td < 0:
        raise ValueError(f"ffn_rows: down_qtype {down_qtype!r} needs quantized rows and one of "
                         f"{list(QUANT_TYPES)} (qtype is {qtype!r})")
    _need("ffn_rows", "rows", rows, (rows.dtype,), 2)
    _need("ffn_rows", "x", x, (_F32,), 1)
    _need("ffn_rows", "out", out, (_F32,), 1, writeable=True)
    n = rows.shape[0]
    d = x.shape[0]
    if t in (FRT_T_F16, FRT_T_F32) and rows.shape[1] != n_parts * d:
        raise ValueError(f"ffn_rows: rows has {rows.shape[1]} columns but a "
                         f"{'gated' if g else 'non-gated'} bundle of dim {d} (= len(x)) "
                         f"needs n_parts * d = {n_parts} * {d} = {n_parts * d}")
    if td == t:
        _check_row_len("ffn_rows", "rows", rows, qtype or str(rows.dtype), t, d, n_parts)
    elif d % BLOCK_ELEMS or rows.shape[1] != (n_parts - 1) * _row_len(t, d) + _row_len(td, d):
        raise ValueError(f"ffn_rows: rows has {rows.shape[1]} bytes per row but {n_parts - 1} {qtype} "
                         f"part(s) and a {down_qtype} down part of len(x) = {d} weights need "
                         f"{(n_parts - 1) * _row_len(t, d) + _row_len(td, d) if d % BLOCK_ELEMS == 0 else '?'}")
    _need_len("ffn_rows", "out", out, d, "len(x)")
    if up_bias is not None:
        if g:
            raise ValueError("ffn_rows: up_bias is only supported for non-gated FFNs")
        _need("ffn_rows", "up_bias", up_bias, (_F32,), 1)
        _need_len("ffn_rows", "up_bias", up_bias, n, "rows.shape[0]")
    if h_out is not None:
        _need("ffn_rows", "h_out", h_out, (_F32,), 1, writeable=True)
        _need_len("ffn_rows", "h_out", h_out, n, "rows.shape[0]")
    out[...] = 0.0                  # n == 0 (no rows) or d == 0 (out is empty)
    return out


def to_f32(src, out, qtype=None, int n_threads=0):
    """out = float32(src) for C-contiguous buffers of any shape.

    src: float16|float32, or uint8 blocks of `qtype` (bit-exact with gguf.quants.dequantize)  # IN
    out: float32 with src.size (float) or src.size / block_bytes * 32 (quantized) elements   # OUT
    Returns out.
    """
    cdef int t = _wtype(src, qtype)
    cdef int64_t n, ub
    if t < 0:
        if qtype is not None and (not isinstance(qtype, str) or qtype not in STORAGE_CODES):
            raise ValueError(f"to_f32: unknown qtype {qtype!r}; use one of {sorted(STORAGE_CODES)}")
        raise ValueError(f"to_f32: src must be a {'float16 or float32' if qtype is None else qtype} "
                         f"array{' (uint8 blocks)' if qtype in BLOCK_BYTES else ''}, got {_describe(src)}")
    if not src.flags.c_contiguous:
        raise ValueError(f"to_f32: src must be C-contiguous, got {_describe(src)}")
    if not isinstance(out, np.ndarray) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError(f"to_f32: out must be a C-contiguous float32 array, got {_describe(out)}")
    if not out.flags.writeable:
        raise ValueError("to_f32: out must be writeable (it receives the result)")
    n = src.size
    if t != FRT_T_F16 and t != FRT_T_F32:
        ub = frt_type_unit_bytes(t)
        if n % ub:
            raise ValueError(f"to_f32: src has {n} bytes, not a whole number of {qtype} blocks "
                             f"({ub} bytes each)")
        n = n // ub * FRT_QK
    if out.size != n:
        raise ValueError(f"to_f32: src holds {n} elements but out has {out.size}")
    if n == 0:
        return out
    cdef const void* sp = _data(src)
    cdef float* op = <float*>_data(out)
    with nogil:
        frt_to_f32_par(sp, t, op, n, n_threads)
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
    cdef const uint16_t* sp = <const uint16_t*>_data(src)
    cdef float* op = <float*>_data(out)
    with nogil:
        frt_f16_to_f32_par(sp, op, n, n_threads)
    return out


def quantize_activation(x):
    """x (k,) float32, k % 32 == 0 -> (q (k,) int8, d (k/32,) float32, s (k/32,) float32):
    the per-block int8 copy of x the quantized kernels use (d = amax / 127, 0 when amax < 1e-30;
    q = rint(x / d) ties to even; s = d * sum(q)). Exposed for tests and the twins' check."""
    _need("quantize_activation", "x", x, (_F32,), 1)
    cdef int64_t k = x.shape[0]
    if k % FRT_QK:
        raise ValueError(f"quantize_activation: len(x) must be a multiple of {BLOCK_ELEMS}, got {k}")
    q = np.empty(k, np.int8)
    d = np.empty(k // FRT_QK, np.float32)
    s = np.empty(k // FRT_QK, np.float32)
    cdef const float* xp = <const float*>_data(x)
    cdef int8_t* qp = <int8_t*>_data(q)
    cdef float* dp = <float*>_data(d)
    cdef float* sp = <float*>_data(s)
    if k:
        with nogil:
            frt_quantize_x(xp, k, qp, dp, sp)
    return q, d, s


def activation_inplace(a, act, int n_threads=0, act_param=0.0):
    """a = act(a) elementwise for a C-contiguous float32 array of any shape (the activations
    of ffn_rows; "drelu" is relu here: the caller applies it to both gate and up).

    a: float32, C-contiguous      # IN/OUT
    Returns a.
    """
    cdef frt_act_t code = _act("activation_inplace", act, act_param)
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

# ---------------------------------------------------------------- one decode step (step.h)
# The fused forms of models/base.py's rms_norm, Rope.apply_ and attention for the shapes a
# decode step has; base.py calls them and keeps its NumPy code as the definition (the twin).

def rms_norm(x, w, float eps, out):
    """out (T, d) float32 = x (T, d) float32 RMS-normed and scaled by w (d,) float32; out may be x."""
    if not (_f32(x, 2, False) and _f32(w, 1, False) and _f32(out, 2, True)):
        _need("rms_norm", "x", x, (_F32,), 2)
        _need("rms_norm", "w", w, (_F32,), 1)
        _need("rms_norm", "out", out, (_F32,), 2, writeable=True)
    cdef int64_t T = _dim(x, 0), d = _dim(x, 1)
    if _dim(w, 0) != d or _dim(out, 0) != T or _dim(out, 1) != d:
        raise ValueError(f"rms_norm: x {x.shape}, w {w.shape} and out {out.shape} do not match")
    cdef const float* xp = <const float*>_data(x)
    cdef const float* wp = <const float*>_data(w)
    cdef float* op = <float*>_data(out)
    with nogil:
        frt_rms_norm(xp, wp, eps, op, T, d)
    return out


def rope_(x, cos, sin):
    """Rotate x (T, H, hd) float32 in place (rotate_half pairing) by cos, sin (T, hd/2) float32."""
    if not (_f32(x, 3, True) and _f32(cos, 2, False) and _f32(sin, 2, False)):
        _need("rope_", "x", x, (_F32,), 3, writeable=True)
        _need("rope_", "cos", cos, (_F32,), 2)
        _need("rope_", "sin", sin, (_F32,), 2)
    cdef int64_t T = _dim(x, 0), H = _dim(x, 1), hd = _dim(x, 2)
    if hd % 2 or cos.shape != (T, hd // 2) or sin.shape != (T, hd // 2):
        raise ValueError(f"rope_: x {x.shape} needs cos and sin of shape ({T}, {hd // 2}), "
                         f"got {cos.shape} and {sin.shape}")
    cdef float* xp = <float*>_data(x)
    cdef const float* cp = <const float*>_data(cos)
    cdef const float* sp = <const float*>_data(sin)
    with nogil:
        frt_rope(xp, cp, sp, T, H, hd)
    return x


def attend_one(q, keys, values, float scale, int64_t first, out):
    """Attention of one query at the last cached position: q (n_heads, hd) over keys, values
    (S, n_kv, hd) float32 from position `first` on (a sliding window's left edge, else 0);
    out (n_heads * hd,) float32. Query head h reads kv head h // (n_heads // n_kv)."""
    if not (_f32(q, 2, False) and _f32(keys, 3, False) and _f32(values, 3, False) and _f32(out, 1, True)):
        _need("attend_one", "q", q, (_F32,), 2)
        _need("attend_one", "keys", keys, (_F32,), 3)
        _need("attend_one", "values", values, (_F32,), 3)
        _need("attend_one", "out", out, (_F32,), 1, writeable=True)
    cdef int64_t H = _dim(q, 0), hd = _dim(q, 1), S = _dim(keys, 0), n_kv = _dim(keys, 1)
    if (keys.shape != values.shape or _dim(keys, 2) != hd or n_kv < 1 or H % n_kv
            or _dim(out, 0) != H * hd):
        raise ValueError(f"attend_one: q {q.shape}, keys {keys.shape}, values {values.shape} and out "
                         f"{out.shape} do not match (n_heads a multiple of n_kv, out n_heads * hd)")
    if not 0 <= first < S:
        raise ValueError(f"attend_one: first {first} must be in [0, {S})")
    cdef const float* qp = <const float*>_data(q)
    cdef const float* kp = <const float*>_data(keys)
    cdef const float* vp = <const float*>_data(values)
    cdef float* op = <float*>_data(out)
    cdef int rc
    with nogil:
        rc = frt_attend_one(qp, kp, vp, S, first, H, n_kv, hd, scale, op)
    if rc != 0:
        raise MemoryError(f"attend_one: no memory for {S} attention scores")
    return out


cdef const float* _vec(str name, a, int64_t n, bint writeable, bint optional) except? NULL:
    """The data of a C-contiguous float32 (n,) array (NULL for None when optional), else ValueError."""
    if a is None and optional:
        return NULL
    if not (_f32(a, 1, writeable) and _dim(a, 0) == n):
        raise ValueError(f"attn_step: {name} must be a C-contiguous{' writeable' if writeable else ''} "
                         f"float32 array of shape ({n},), got {_describe(a)}")
    return <const float*>_data(a)


cdef const void* _mat(str name, W, qtype, int64_t n, int64_t k, int* t) except? NULL:
    """The data of weights W (n, k) stored as qtype (see gemv), its storage code in t."""
    t[0] = _wtype(W, qtype)
    if t[0] < 0:
        _explain_type("attn_step", name, W, qtype)
    if not (_ok(W, 2, False) and _dim(W, 0) == n and _dim(W, 1) == _row_len(t[0], k)):
        raise ValueError(f"attn_step: {name} must be a C-contiguous ({n}, {k}) matrix of "
                         f"{qtype or W.dtype} weights, got {_describe(W)}")
    return _data(W)


def attn_step(x, add, in_w, post_w, float eps, Wqkv, qkv_qtype, bqkv, Wo, o_qtype, bo,
              int64_t n_heads, cos_row, sin_row, K, V, int64_t pos, int64_t first, float scale,
              qkv, att, o, xn, int n_threads=0):
    """The attention half of one decode step of a llama-like layer at position pos (step.h
    frt_attn_step): x += add; xn = rms_norm(x, in_w); q, k, v = Wqkv @ xn + bqkv; RoPE;
    K[pos], V[pos] = k, v; x += Wo @ attention(q, K[first:pos+1], V[first:pos+1]) + bo;
    xn = rms_norm(x, post_w). Bit for bit the separate rms_norm, gemv, rope_, attend_one and
    NumPy adds.

    x: (d,) float32, the residual stream                                          # IN/OUT
    add: (d,) float32 or None, added to x first (the previous FFN's output)       # IN
    in_w, post_w: (d,) float32 norm weights; eps their epsilon                   # IN
    Wqkv: ((n_heads + 2 n_kv) hd, d) weights as gemv takes them, qkv_qtype        # IN
    bqkv: ((n_heads + 2 n_kv) hd,) float32 or None                               # IN
    Wo: (d, n_heads hd) weights, o_qtype; bo: (d,) float32 or None                # IN
    cos_row, sin_row: (hd / 2,) float32, the rotary tables' row for pos           # IN
    K, V: (max_seq, n_kv, hd) float32, the layer's cache; row pos is written      # IN/OUT
    first: the attention window's left edge (0: all); scale: the score scale
    qkv ((n_heads + 2 n_kv) hd,), att (n_heads hd,), o (d,): scratch              # OUT
    xn: (d,) float32, receives rms_norm(x, post_w)                               # OUT
    Returns xn.
    """
    if not (_f32(K, 3, True) and _f32(V, 3, True) and K.shape == V.shape):
        raise ValueError(f"attn_step: K and V must be C-contiguous writeable float32 arrays "
                         f"(max_seq, n_kv, hd) of one shape, got {_describe(K)} and {_describe(V)}")
    cdef int64_t S = _dim(K, 0), n_kv = _dim(K, 1), hd = _dim(K, 2)
    if n_kv < 1 or n_heads % n_kv or hd % 2:
        raise ValueError(f"attn_step: n_heads {n_heads} must be a multiple of n_kv {n_kv} and hd {hd} even")
    if not (0 <= first <= pos < S):
        raise ValueError(f"attn_step: need 0 <= first ({first}) <= pos ({pos}) < max_seq ({S})")
    if not _f32(x, 1, True):
        raise ValueError(f"attn_step: x must be a C-contiguous writeable float32 (d,) array, got {_describe(x)}")
    cdef int64_t d = _dim(x, 0), nq = n_heads * hd, n_qkv = nq + 2 * n_kv * hd
    cdef int t_qkv, t_o
    cdef float* xp = <float*>_data(x)
    cdef const float* ap = _vec("add", add, d, False, True)
    cdef const float* iw = _vec("in_w", in_w, d, False, False)
    cdef const float* pw = _vec("post_w", post_w, d, False, False)
    cdef const void* wqkv = _mat("Wqkv", Wqkv, qkv_qtype, n_qkv, d, &t_qkv)
    cdef const float* bq = _vec("bqkv", bqkv, n_qkv, False, True)
    cdef const void* wo = _mat("Wo", Wo, o_qtype, d, nq, &t_o)
    cdef const float* bop = _vec("bo", bo, d, False, True)
    cdef const float* cp = _vec("cos_row", cos_row, hd // 2, False, False)
    cdef const float* sp = _vec("sin_row", sin_row, hd // 2, False, False)
    cdef float* qp = <float*>_vec("qkv", qkv, n_qkv, True, False)
    cdef float* attp = <float*>_vec("att", att, nq, True, False)
    cdef float* op = <float*>_vec("o", o, d, True, False)
    cdef float* xnp = <float*>_vec("xn", xn, d, True, False)
    cdef float* kp = <float*>_data(K)
    cdef float* vp = <float*>_data(V)
    cdef int rc
    with nogil:
        rc = frt_attn_step(xp, ap, iw, pw, eps, wqkv, t_qkv, bq, wo, t_o, bop, d, n_heads, n_kv, hd,
                           cp, sp, kp, vp, pos, first, scale, qp, attp, op, xnp, n_threads)
    if rc != 0:
        raise MemoryError("attn_step: could not allocate the kernels' scratch memory")
    return xn


def cpu_features():
    """Which CPU features exist and which kernel path is active.

    Returns {"path": "avx2" | "scalar", "avx2": bool, "fma": bool, "f16c": bool,
             "avx512f": bool, "avx2_available": bool, "forced_scalar_by_env": bool,
             "default_threads": int (the kernel pool's size when a caller passes none)}
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


def _set_prefetch(int ahead):
    """Set how many loop iterations ahead gemv/ffn_rows prefetch their rows (0: off); returns
    the old value. For bench/bench_kernels.py --only prefetch and the tests."""
    global FRT_PF_AHEAD
    old = FRT_PF_AHEAD
    FRT_PF_AHEAD = ahead
    return old


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
