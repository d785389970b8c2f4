"""Pure-NumPy twins of `kernels` (same names, same signatures): the oracle in tests.

They compute in float64 and write float32 results into the caller's `out`, so they are an
independent, more accurate check of the compiled float32-accumulating kernels. `n_threads`
is accepted and ignored. Slow by design; never used on a hot path.
"""
import math

import numpy as np

ACT_SILU = 0
ACT_RELU = 1
ACT_GELU = 2
ACT_CODES = {"silu": ACT_SILU, "relu": ACT_RELU, "gelu": ACT_GELU}

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
    if isinstance(act, (int, np.integer)) and int(act) in (ACT_SILU, ACT_RELU, ACT_GELU):
        return int(act)
    raise ValueError(f"{fn}: act must be 0 (silu), 1 (relu), 2 (gelu) or its name, got {act!r}")


def activation(v, act):
    """act(v) in float64: silu, relu or exact (erf) gelu. v: any float array."""
    v = np.asarray(v, dtype=np.float64)
    code = _act_code("activation", act)
    if code == ACT_RELU:
        return np.maximum(v, 0.0)
    if code == ACT_GELU:
        return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)).astype(np.float64))
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-v))


def gemv(W, x, out, n_threads=0):
    """out (n,) float32 = W (n, k) @ x (k,), computed in float64."""
    _need("gemv", "W", W, (np.float16, np.float32), 2)
    _need("gemv", "x", x, (np.float32,), 1)
    _need("gemv", "out", out, (np.float32,), 1, writeable=True)
    n, k = W.shape
    if x.shape[0] != k or out.shape[0] != n:
        raise ValueError(f"gemv: shapes W {W.shape}, x {x.shape}, out {out.shape} do not match")
    out[...] = W.astype(np.float64) @ x.astype(np.float64)
    return out


def ffn_rows(rows, x, out, gated, act, up_bias=None, h_out=None, n_threads=0):
    """out (d,) = sum_i h_i * down_i over bundle rows (n, n_parts * d), in float64."""
    gated = bool(gated)
    code = _act_code("ffn_rows", act)
    _need("ffn_rows", "rows", rows, (np.float16, np.float32), 2)
    _need("ffn_rows", "x", x, (np.float32,), 1)
    _need("ffn_rows", "out", out, (np.float32,), 1, writeable=True)
    n, d = rows.shape[0], x.shape[0]
    n_parts = 3 if gated else 2
    if rows.shape[1] != n_parts * d or out.shape[0] != d:
        raise ValueError(f"ffn_rows: rows {rows.shape}, x {x.shape}, out {out.shape} "
                         f"do not match a {n_parts}-part bundle")
    R = rows.astype(np.float64)
    x64 = x.astype(np.float64)
    if gated:
        if up_bias is not None:
            raise ValueError("ffn_rows: up_bias is only supported for non-gated FFNs")
        h = activation(R[:, :d] @ x64, code) * (R[:, d:2 * d] @ x64)
    else:
        u = R[:, :d] @ x64
        if up_bias is not None:
            _need("ffn_rows", "up_bias", up_bias, (np.float32,), 1)
            if up_bias.shape[0] != n:
                raise ValueError("ffn_rows: up_bias must have length rows.shape[0]")
            u = u + up_bias.astype(np.float64)
        h = activation(u, code)
    if h_out is not None:
        _need("ffn_rows", "h_out", h_out, (np.float32,), 1, writeable=True)
        if h_out.shape[0] != n:
            raise ValueError("ffn_rows: h_out must have length rows.shape[0]")
        h_out[...] = h
    out[...] = h @ R[:, (n_parts - 1) * d:]
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


def activation_inplace(a, act, n_threads=0):
    """a = act(a) elementwise (float64 math) for a C-contiguous float32 array."""
    code = _act_code("activation_inplace", act)
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError("activation_inplace: a must be a C-contiguous float32 array")
    a[...] = activation(a, code)
    return a


def cpu_features():
    """The twin runs no SIMD code."""
    return {"path": "numpy", "avx2": False, "fma": False, "f16c": False, "avx512f": False,
            "avx2_available": False, "forced_scalar_by_env": False, "omp_max_threads": 1}


def set_path(path):
    """Accepted for API parity; the twin has a single path."""
    if path not in ("avx2", "scalar", "auto"):
        raise ValueError(f"set_path: path must be 'avx2', 'scalar' or 'auto', got {path!r}")
    return "numpy"
