"""Pure-NumPy twins of `kernels` (same names, same signatures): the oracle in tests.

They compute in float64 and write float32 results into the caller's `out`, so they are an
independent, more accurate check of the compiled float32-accumulating kernels. `n_threads`
is accepted and ignored. Slow by design; never used on a hot path.

Quantized weights (uint8 arrays of ggml-layout blocks, `qtype` "q8_0" | "q4_0" | "q4_1") are
dequantized here with NumPy code written from the block definitions (tests check it against
gguf.quants.dequantize), and x is quantized per block of 32 exactly as the compiled kernels
do (same float32 operations, so the bytes are identical): the quantized GEMV is defined as
dequant(W) @ dequant(quant(x)) in float64.
"""
import math

import numpy as np

ACT_SILU = 0
ACT_RELU = 1
ACT_GELU = 2          # exact (erf)
ACT_GELU_TANH = 3     # tanh approximation (HF gelu_pytorch_tanh)
ACT_FATRELU = 4       # v > act_param ? v : 0
ACT_DRELU = 5         # gated: relu(gate . x) * relu(up . x); not gated: relu
ACT_CODES = {"silu": ACT_SILU, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH,
             "fatrelu": ACT_FATRELU, "drelu": ACT_DRELU}

STORAGE_CODES = {"float32": 0, "float16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}
QUANT_TYPES = ("q8_0", "q4_0", "q4_1")
BLOCK_ELEMS = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}

_erf = np.frompyfunc(math.erf, 1, 1)


def _need(fn, name, a, dtypes, ndim, writeable=False):
    if (not isinstance(a, np.ndarray) or a.dtype not in dtypes or a.ndim != ndim
            or not a.flags.c_contiguous):
        want = " or ".join(str(np.dtype(t)) for t in dtypes)
        raise ValueError(f"{fn}: {name} must be a C-contiguous {ndim}-D {want} array")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{fn}: {name} must be writeable (it receives the result)")


def _act_code(fn, act):
    if isinstance(act, str):
        if act not in ACT_CODES:
            raise ValueError(f"{fn}: unknown activation {act!r}; use one of {sorted(ACT_CODES)}")
        return ACT_CODES[act]
    if isinstance(act, (int, np.integer)) and int(act) in ACT_CODES.values():
        return int(act)
    raise ValueError(f"{fn}: act must be one of {sorted(ACT_CODES.items(), key=lambda kv: kv[1])} "
                     f"(a name or its code), got {act!r}")


def _act_param(fn, act_param):
    if not np.isfinite(act_param):
        raise ValueError(f"{fn}: act_param must be a finite number, got {act_param!r}")
    return float(np.float32(act_param))


def activation(v, act, act_param=0.0):
    """act(v) in float64 for one input (drelu: relu; see glu for the gated form). v: any float array.
    silu v / (1 + e^-v); relu max(v, 0); gelu (erf) v/2 (1 + erf(v / sqrt 2)); gelu_tanh
    v/2 (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))); fatrelu v where v > act_param, else 0."""
    v = np.asarray(v, dtype=np.float64)
    code = _act_code("activation", act)
    if code in (ACT_RELU, ACT_DRELU):
        return np.where(v > 0.0, v, 0.0)
    if code == ACT_FATRELU:
        return np.where(v > act_param, v, 0.0)
    if code == ACT_GELU:
        return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)).astype(np.float64))
    if code == ACT_GELU_TANH:
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-v))


def glu(g, u, act, act_param=0.0):
    """A gated neuron's h in float64: act(g) * u, or for drelu relu(g) * relu(u)."""
    code = _act_code("glu", act)
    u = np.asarray(u, dtype=np.float64)
    if code == ACT_DRELU:
        return activation(g, ACT_RELU) * np.where(u > 0.0, u, 0.0)
    return activation(g, code, act_param) * u


def row_bytes(qtype, k):
    """Bytes of one row of k weights stored as `qtype`."""
    if qtype not in STORAGE_CODES:
        raise ValueError(f"unknown storage type {qtype!r}; use one of {sorted(STORAGE_CODES)}")
    if qtype in BLOCK_BYTES:
        if k % BLOCK_ELEMS:
            raise ValueError(f"{qtype} rows need a multiple of {BLOCK_ELEMS} weights, got {k}")
        return k // BLOCK_ELEMS * BLOCK_BYTES[qtype]
    return k * (4 if qtype == "float32" else 2)


def dequantize(src, qtype):
    """uint8 blocks of `qtype` (any shape, last axis a whole number of blocks) -> float32
    values, shape (..., n_blocks_per_row * 32)."""
    src = np.ascontiguousarray(src, dtype=np.uint8)
    bb = BLOCK_BYTES[qtype]
    if src.shape[-1] % bb:
        raise ValueError(f"dequantize: {src.shape[-1]} bytes per row is not a whole number of "
                         f"{qtype} blocks ({bb} bytes)")
    lead = src.shape[:-1]
    blk = src.reshape(-1, bb)                                     # (n_blocks, bb)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)    # (n_blocks, 1)
    if qtype == "q8_0":
        vals = blk[:, 2:].view(np.int8).astype(np.float32) * d
    else:
        qs = blk[:, 2:] if qtype == "q4_0" else blk[:, 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1)            # element order: lo, then hi
        if qtype == "q4_0":
            vals = (q.astype(np.int8) - 8).astype(np.float32) * d
        else:
            m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
            vals = (d * q.astype(np.float32)) + m
    return vals.reshape(lead + (src.shape[-1] // bb * BLOCK_ELEMS,))


def quantize_activation(x):
    """x (k,) float32 -> (q int8 (k,), d float32 (k/32,), s float32 (k/32,)), byte for byte
    what the compiled kernels compute: d = amax / 127 (0 when amax < 1e-30), q = rint(x * (1 / d)),
    s = d * sum(q)."""
    _need("quantize_activation", "x", x, (np.float32,), 1)
    k = x.shape[0]
    if k % BLOCK_ELEMS:
        raise ValueError(f"quantize_activation: len(x) must be a multiple of {BLOCK_ELEMS}, got {k}")
    xb = x.reshape(-1, BLOCK_ELEMS)
    amax = np.abs(xb).max(axis=1, initial=np.float32(0))
    d = np.where(amax >= np.float32(1e-30), amax / np.float32(127), np.float32(0))   # float32
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int8)
    s = d * q.astype(np.int32).sum(axis=1).astype(np.float32)
    return q.reshape(-1), d.astype(np.float32), s.astype(np.float32)


def _quantized_x(x):
    q, d, _ = quantize_activation(x)
    return (q.reshape(-1, BLOCK_ELEMS).astype(np.float64) * d.astype(np.float64)[:, None]).reshape(-1)


def _weights(W, qtype, fn, name):
    """W as float64 (n, k) and the storage check."""
    if qtype is None:
        _need(fn, name, W, (np.float16, np.float32), 2)
        return W.astype(np.float64)
    if qtype in ("float16", "float32"):
        _need(fn, name, W, (np.dtype(qtype),), 2)
        return W.astype(np.float64)
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"{fn}: unknown qtype {qtype!r}")
    _need(fn, name, W, (np.uint8,), 2)
    return dequantize(W, qtype).astype(np.float64)


def gemv(W, x, out, n_threads=0, qtype=None):
    """out (n,) float32 = W (n, k) @ x (k,), computed in float64 (quantized W: against the
    per-block quantized x, as the kernel)."""
    Wd = _weights(W, qtype, "gemv", "W")
    _need("gemv", "x", x, (np.float32,), 1)
    _need("gemv", "out", out, (np.float32,), 1, writeable=True)
    n, k = Wd.shape
    if x.shape[0] != k or out.shape[0] != n:
        raise ValueError(f"gemv: shapes W {W.shape}, x {x.shape}, out {out.shape} do not match")
    x64 = x.astype(np.float64) if qtype in (None, "float16", "float32") else _quantized_x(x)
    out[...] = Wd @ x64
    return out


def ffn_ready_rows(n, d, gated, n_ready):
    """The twin does not split its rows: it waits first, then computes them all."""
    return n if n_ready >= n else 0


def ffn_rows(rows, x, out, gated, act, up_bias=None, h_out=None, n_threads=0, qtype=None,
             down_qtype=None, n_ready=-1, wait=None, act_param=0.0):
    """out (d,) = sum_i h_i * down_i over bundle rows (n, n_parts * d), in float64 (quantized
    rows: gate/up dot products against the per-block quantized x, as the kernel; the down
    parts may be another quantized type, down_qtype). wait (a callable here): called first."""
    if wait is not None:
        wait()
    gated = bool(gated)
    code = _act_code("ffn_rows", act)
    act_param = _act_param("ffn_rows", act_param)
    _need("ffn_rows", "x", x, (np.float32,), 1)
    _need("ffn_rows", "out", out, (np.float32,), 1, writeable=True)
    n, d = rows.shape[0] if isinstance(rows, np.ndarray) else -1, x.shape[0]
    n_parts = 3 if gated else 2
    quant = qtype not in (None, "float16", "float32")
    if down_qtype is not None and (not quant or down_qtype not in BLOCK_BYTES):
        raise ValueError(f"ffn_rows: down_qtype {down_qtype!r} needs quantized rows")
    if quant:
        dq = down_qtype or qtype
        _need("ffn_rows", "rows", rows, (np.uint8,), 2)
        if (qtype not in BLOCK_BYTES or d % BLOCK_ELEMS
                or rows.shape[1] != (n_parts - 1) * row_bytes(qtype, d) + row_bytes(dq, d)):
            raise ValueError(f"ffn_rows: rows {rows.shape} do not hold {n_parts} {qtype} parts of {d}")
        cut = (n_parts - 1) * row_bytes(qtype, d)
        R = np.concatenate([
            dequantize(rows[:, :cut].reshape(n, n_parts - 1, row_bytes(qtype, d)), qtype).reshape(
                n, (n_parts - 1) * d),
            dequantize(rows[:, cut:], dq)], axis=1).astype(np.float64)
    else:
        R = _weights(rows, qtype, "ffn_rows", "rows")
    if R.shape[1] != n_parts * d or out.shape[0] != d:
        raise ValueError(f"ffn_rows: rows {rows.shape}, x {x.shape}, out {out.shape} "
                         f"do not match a {n_parts}-part bundle")
    x64 = _quantized_x(x) if quant else x.astype(np.float64)
    if gated:
        if up_bias is not None:
            raise ValueError("ffn_rows: up_bias is only supported for non-gated FFNs")
        h = glu(R[:, :d] @ x64, R[:, d:2 * d] @ x64, code, act_param)
    else:
        u = R[:, :d] @ x64
        if up_bias is not None:
            _need("ffn_rows", "up_bias", up_bias, (np.float32,), 1)
            if up_bias.shape[0] != n:
                raise ValueError("ffn_rows: up_bias must have length rows.shape[0]")
            u = u + up_bias.astype(np.float64)
        h = activation(u, code, act_param)
    if h_out is not None:
        _need("ffn_rows", "h_out", h_out, (np.float32,), 1, writeable=True)
        if h_out.shape[0] != n:
            raise ValueError("ffn_rows: h_out must have length rows.shape[0]")
        h_out[...] = h
    out[...] = h @ R[:, (n_parts - 1) * d:]
    return out


def to_f32(src, out, qtype=None, n_threads=0):
    """out = float32(src): float16/float32 arrays, or uint8 blocks of a quantized qtype."""
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("to_f32: out must be a C-contiguous float32 array")
    if qtype in BLOCK_BYTES:
        if not isinstance(src, np.ndarray) or src.dtype != np.uint8 or not src.flags.c_contiguous:
            raise ValueError(f"to_f32: src must be a C-contiguous uint8 array of {qtype} blocks")
        vals = dequantize(src.reshape(-1), qtype)
    else:
        want = (np.float16, np.float32) if qtype is None else (np.dtype(qtype),)
        if not isinstance(src, np.ndarray) or src.dtype not in want or not src.flags.c_contiguous:
            raise ValueError(f"to_f32: src must be a C-contiguous {want} array")
        vals = src.reshape(-1).astype(np.float32)
    if vals.size != out.size:
        raise ValueError(f"to_f32: src holds {vals.size} elements but out has {out.size}")
    out.reshape(-1)[...] = vals
    return out


def f16_to_f32(src, out, n_threads=0):
    """out = float32(src) for C-contiguous buffers with the same number of elements."""
    if not isinstance(src, np.ndarray) or src.dtype != np.float16 or not src.flags.c_contiguous:
        raise ValueError("f16_to_f32: src must be a C-contiguous float16 array")
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("f16_to_f32: out must be a C-contiguous float32 array")
    if src.size != out.size:
        raise ValueError(f"f16_to_f32: src has {src.size} elements but out has {out.size}")
    out.reshape(-1)[...] = src.reshape(-1).astype(np.float32)
    return out


def activation_inplace(a, act, n_threads=0, act_param=0.0):
    """a = act(a) elementwise (float64 math) for a C-contiguous float32 array (drelu: relu)."""
    code = _act_code("activation_inplace", act)
    act_param = _act_param("activation_inplace", act_param)
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError("activation_inplace: a must be a C-contiguous float32 array")
    a[...] = activation(a, code, act_param)
    return a


def rms_norm(x, w, eps, out):
    """out (T, d) = x * w / sqrt(mean(x^2) + eps) per row, in float64 (step.h's twin)."""
    _need("rms_norm", "x", x, (np.float32,), 2)
    _need("rms_norm", "w", w, (np.float32,), 1)
    _need("rms_norm", "out", out, (np.float32,), 2, writeable=True)
    if w.shape[0] != x.shape[1] or out.shape != x.shape:
        raise ValueError(f"rms_norm: x {x.shape}, w {w.shape} and out {out.shape} do not match")
    x64 = x.astype(np.float64)
    out[...] = x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + eps) * w
    return out


def rope_(x, cos, sin):
    """Rotate x (T, H, hd) in place by cos, sin (T, hd/2) (rotate_half pairing), float32 as step.h."""
    _need("rope_", "x", x, (np.float32,), 3, writeable=True)
    _need("rope_", "cos", cos, (np.float32,), 2)
    _need("rope_", "sin", sin, (np.float32,), 2)
    T, H, hd = x.shape
    if hd % 2 or cos.shape != (T, hd // 2) or sin.shape != (T, hd // 2):
        raise ValueError(f"rope_: x {x.shape} needs cos and sin of shape ({T}, {hd // 2}), "
                         f"got {cos.shape} and {sin.shape}")
    half = hd // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half].copy(), x[..., half:].copy()
    x[..., :half] = x1 * c - x2 * s
    x[..., half:] = x2 * c + x1 * s
    return x


def attend_one(q, keys, values, scale, first, out):
    """One query (n_heads, hd) over keys/values[first:] (S, n_kv, hd), softmax in float64."""
    _need("attend_one", "q", q, (np.float32,), 2)
    _need("attend_one", "keys", keys, (np.float32,), 3)
    _need("attend_one", "values", values, (np.float32,), 3)
    _need("attend_one", "out", out, (np.float32,), 1, writeable=True)
    H, hd = q.shape
    S, n_kv = keys.shape[:2]
    if keys.shape != values.shape or keys.shape[2] != hd or H % n_kv or out.shape[0] != H * hd:
        raise ValueError(f"attend_one: q {q.shape}, keys {keys.shape}, values {values.shape} and out "
                         f"{out.shape} do not match (n_heads a multiple of n_kv, out n_heads * hd)")
    if not 0 <= first < S:
        raise ValueError(f"attend_one: first {first} must be in [0, {S})")
    group = H // n_kv
    o = out.reshape(H, hd)
    for h in range(H):
        k = keys[first:, h // group].astype(np.float64)
        v = values[first:, h // group].astype(np.float64)
        z = k @ q[h].astype(np.float64) * scale
        p = np.exp(z - z.max())
        o[h] = (p / p.sum()) @ v
    return out


def attn_step(x, add, in_w, post_w, eps, Wqkv, qkv_qtype, bqkv, Wo, o_qtype, bo, n_heads,
              cos_row, sin_row, K, V, pos, first, scale, qkv, att, o, xn, n_threads=0):
    """The attention half of one decode step (step.h frt_attn_step), composed of the twins:
    x += add; xn = rms_norm(x); qkv = Wqkv xn + bqkv; RoPE; K[pos], V[pos] = k, v;
    x += Wo attention(q) + bo; xn = rms_norm(x, post_w). Returns xn."""
    n_kv, hd = K.shape[1], K.shape[2]
    nq, nk = n_heads * hd, n_kv * hd
    if add is not None:
        x += add
    rms_norm(x[None], in_w, eps, xn[None])
    gemv(Wqkv, xn, qkv, n_threads, qkv_qtype)
    if bqkv is not None:
        qkv += bqkv
    rope_(qkv[:nq].reshape(1, n_heads, hd), cos_row[None], sin_row[None])
    rope_(qkv[nq:nq + nk].reshape(1, n_kv, hd), cos_row[None], sin_row[None])
    K[pos] = qkv[nq:nq + nk].reshape(n_kv, hd)
    V[pos] = qkv[nq + nk:].reshape(n_kv, hd)
    attend_one(qkv[:nq].reshape(n_heads, hd), K[:pos + 1], V[:pos + 1], scale, first, att)
    gemv(Wo, att, o, n_threads, o_qtype)
    if bo is not None:
        o += bo
    x += o
    rms_norm(x[None], post_w, eps, xn[None])
    return xn


def _set_prefetch(ahead):
    """Accepted for API parity; the twin does not prefetch."""
    return 0


def cpu_features():
    """The twin runs no SIMD code."""
    return {"path": "numpy", "avx2": False, "fma": False, "f16c": False, "avx512f": False,
            "avx2_available": False, "forced_scalar_by_env": False, "omp_max_threads": 1}


def set_path(path):
    """Accepted for API parity; the twin has a single path."""
    if path not in ("avx2", "scalar", "auto"):
        raise ValueError(f"set_path: path must be 'avx2', 'scalar' or 'auto', got {path!r}")
    return "numpy"
