"""Pieces shared by the forward passes: the linear interface, norms, softmax, the
rotary tables, and attention over the KV cache. NumPy, float32. (Reading a config: config.py.)

rms_norm, Rope.apply_ and attention run the fused kernels of flashrt/_core/step.h for the
float32 shapes of a decode step (NumPy's per-call cost over 30 small layers was a quarter of
a token); their NumPy code here (rms_norm_numpy, Rope.apply_numpy_, attention_numpy) is the
definition, the oracle in tests/_core/test_step_kernels.py and the path for everything else.
"""

import math
from typing import Callable

import numpy as np

from flashrt._core import kernels
from flashrt.errors import GenerationError, ModelFormatError, UnsupportedModelError


# linear(W (out, in) float16|float32, x (T, in) float32, bias (out,) float32 | None) -> (T, out) float32
Linear = Callable[..., np.ndarray]


def numpy_linear(W, x, bias=None):
    """The plain NumPy `linear`: x @ W.T (+ bias). Slow for float16 W; the oracle for flashrt.linear."""
    y = x @ W.T.astype(np.float32, copy=False)
    if bias is not None:
        y += bias
    return y


def _f32c(a):
    return a.dtype == np.float32 and a.flags.c_contiguous


def rms_norm(x, weight, eps):
    """x (T, d) float32, weight (d,) -> (T, d) float32 (HF: x * rsqrt(mean(x^2) + eps) * w)."""
    if x.ndim == 2 and _f32c(x) and weight.ndim == 1 and _f32c(weight):
        return kernels.rms_norm(x, weight, eps, np.empty_like(x))
    return rms_norm_numpy(x, weight, eps)


def rms_norm_numpy(x, weight, eps):
    """rms_norm in NumPy (any shape and dtype NumPy broadcasts)."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    ms += eps
    return (x / np.sqrt(ms)) * weight


def layer_norm(x, weight, bias, eps):
    """x (T, d) float32 -> (T, d) float32 (biased variance, as torch.nn.LayerNorm)."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=-1, keepdims=True)
    var += eps
    xc /= np.sqrt(var)
    if weight is not None:
        xc *= weight
    if bias is not None:
        xc += bias
    return xc


def softmax_(x):
    """Softmax over the last axis, in place (float32). Returns x."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def silu(x):
    return x / (1.0 + np.exp(-x))


def weight_getter(weights, checkpoint):
    """get(name, float32=False, optional=False) over a {HF name: array} dict: the array (as
    float32 for norms and biases), None for an absent optional one, else ModelFormatError
    naming the tensor and `checkpoint` (e.g. "a llama checkpoint")."""

    def get(name, float32=False, optional=False):
        if name not in weights:
            if optional:
                return None
            raise ModelFormatError(f"weights are missing {name!r} ({checkpoint} has it)")
        a = weights[name]
        return np.asarray(a, dtype=np.float32) if float32 else a

    return get


def fused_qkv(args, layer_prefix, fused, parts, kinds=("weight",)):
    """{fused name: [(part name, rows), ...]} for a q/k/v matrix stored as one (a family's
    fused(args)): per layer `layer_prefix.format(i)` + `fused`.kind holds the q heads, then k,
    then v, as row blocks of `parts` (q, k, v names) + .kind, for each kind ("weight", "bias")."""
    q_dim = args.num_attention_heads * args.head_dim
    kv_dim = args.num_key_value_heads * args.head_dim
    out = {}
    for i in range(args.num_hidden_layers):
        a = layer_prefix.format(i)
        for kind in kinds:
            out[f"{a}{fused}.{kind}"] = [(f"{a}{part}.{kind}", rows)
                                         for part, rows in zip(parts, (q_dim, kv_dim, kv_dim))]
    return out


# --------------------------------------------------------------------------- fused decode matrices

# A decode step multiplies q, k and v by the same normed x: over row blocks of one matrix that
# is one GEMV call instead of three. Worth it where a call's fixed cost is felt next to the
# bytes it streams (SmolLM2: 0.3 MB of q4_1 q/k/v per layer); above this many bytes per layer
# the three stay apart and no copy is made.
FUSE_MAX_BYTES = 16 << 20


def _rows_bytes(W):
    data = W if isinstance(W, np.ndarray) else getattr(W, "data", None)  # a QMatrix: its quantized rows
    return data.nbytes if isinstance(data, np.ndarray) else 0


def fuse_rows(mats, biases=None):
    """One matrix whose row blocks are `mats` (the same dtype or quantized type and in_features,
    each C-contiguous), and views of its blocks to use in place of mats (so the separate
    arrays can be freed); the biases (each None or (rows,) float32) concatenated the same way,
    zeros where one is None, or None when all are. None when they cannot be fused (different
    storage, or more than FUSE_MAX_BYTES together). Row i of the fused product is row i of
    the block's own product, bit for bit (the GEMV computes every row alone).
    Returns (fused, views, fused_bias) or None."""
    from flashrt.quant import QMatrix

    if sum(_rows_bytes(W) for W in mats) > FUSE_MAX_BYTES:
        return None
    first = mats[0]
    if isinstance(first, QMatrix):
        if not all(isinstance(W, QMatrix) and W.qtype == first.qtype and W.shape[1] == first.shape[1] for W in mats):
            return None
        data = np.concatenate([W.data for W in mats], axis=0)
        fused = QMatrix(data, first.qtype, first.shape[1])
        make = lambda a, b: QMatrix(data[a:b], first.qtype, first.shape[1])  # noqa: E731
    else:
        if not all(isinstance(W, np.ndarray) and W.ndim == 2 and W.dtype == first.dtype
                   and W.shape[1] == first.shape[1] and W.flags.c_contiguous for W in mats):
            return None
        fused = np.concatenate(mats, axis=0)
        make = lambda a, b: fused[a:b]  # noqa: E731
    views, a = [], 0
    for W in mats:
        views.append(make(a, a + W.shape[0]))
        a += W.shape[0]
    bias = None
    if biases is not None and any(b is not None for b in biases):
        bias = np.concatenate([np.zeros(W.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
                               for W, b in zip(mats, biases)])
    return fused, views, bias


# --------------------------------------------------------------------------- rotary embeddings

def rope_inv_freq(head_dim, theta, scaling=None):
    """Inverse frequencies (head_dim/2,) float64, as HF's rope init for rope_type
    "default", "linear" and "llama3"; other types raise UnsupportedModelError."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported (flashrt knows default, linear, llama3)"
    )


class Rope:
    """cos/sin tables for positions [0, n) (grown on demand), HF "rotate_half" layout:
    dimension i pairs with i + head_dim/2."""

    def __init__(self, head_dim, theta, scaling=None, n_positions=1024):
        self.head_dim = head_dim
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (head_dim/2,) float64
        self._build(n_positions)

    def _build(self, n_positions):
        angles = np.outer(np.arange(n_positions, dtype=np.float64), self.inv_freq)
        self.cos = np.cos(angles).astype(np.float32)  # (n_positions, head_dim/2) float32
        self.sin = np.sin(angles).astype(np.float32)  # (n_positions, head_dim/2) float32

    def row(self, pos):
        """(cos, sin) (head_dim/2,) float32 for position pos (the tables grown as apply_ does)."""
        if pos + 1 > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], pos + 1))
        return self.cos[pos], self.sin[pos]

    def apply_(self, x, start):
        """Rotate x (T, n_heads, head_dim) float32 in place for positions start..start+T-1."""
        T = x.shape[0]
        if start + T > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], start + T))
        if x.ndim == 3 and _f32c(x) and x.flags.writeable:
            return kernels.rope_(x, self.cos[start:start + T], self.sin[start:start + T])
        return self.apply_numpy_(x, start)

    def apply_numpy_(self, x, start):
        """apply_ in NumPy (the tables must already cover the positions)."""
        T = x.shape[0]
        half = self.head_dim // 2
        c = self.cos[start:start + T, None, :]  # (T, 1, half)
        s = self.sin[start:start + T, None, :]
        x1 = x[..., :half].copy()
        x2 = x[..., half:]
        x[..., :half] = x1 * c - x2 * s
        x[..., half:] = x2 * c + x1 * s
        return x


# --------------------------------------------------------------------------- attention

def attention(q, keys, values, start, scale, sliding_window=None, softcap=None):
    """Causal grouped-query attention of T new queries over the cached keys/values.

    q (T, n_heads, head_dim) float32 for positions start..start+T-1;
    keys, values (start+T, n_kv_heads, head_dim) (the cache views, new tokens included).
    Query head h uses kv head h // (n_heads // n_kv_heads), as HF's repeat_kv.
    sliding_window: a query at p sees keys at (p - window, p] (HF Mistral) or all if None.
    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2), or None.
    Returns (T, n_heads * head_dim) float32.
    """
    T, n_heads, head_dim = q.shape
    S = keys.shape[0]
    if T == 1 and S == start + 1 and softcap is None and _f32c(q) and _f32c(keys) and _f32c(values):  # a decode step
        first = S - sliding_window if sliding_window is not None and S > sliding_window else 0
        out = np.empty(n_heads * head_dim, np.float32)
        return kernels.attend_one(q[0], keys, values, scale, first, out).reshape(1, -1)
    return attention_numpy(q, keys, values, start, scale, sliding_window, softcap)


def attention_numpy(q, keys, values, start, scale, sliding_window=None, softcap=None):
    """attention in NumPy (any T, float16 or float32 caches)."""
    T, n_heads, head_dim = q.shape
    S, n_kv_heads, _ = keys.shape
    group = n_heads // n_kv_heads
    if keys.dtype != np.float32:
        keys = keys.astype(np.float32)
        values = values.astype(np.float32)
    qg = q.reshape(T, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # (n_kv, group, T, hd)
    kt = keys.transpose(1, 2, 0)[:, None]                                   # (n_kv, 1, hd, S)
    scores = np.matmul(qg, kt)                                             # (n_kv, group, T, S)
    if scale != 1.0:
        scores *= np.float32(scale)
    if softcap is not None:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    if T > 1 or (sliding_window is not None and S > sliding_window):
        q_pos = np.arange(start, start + T)[:, None]
        k_pos = np.arange(S)[None, :]
        hidden = k_pos > q_pos
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
        scores[..., hidden] = -np.inf
    softmax_(scores)
    vg = values.transpose(1, 0, 2)[:, None]                                # (n_kv, 1, S, hd)
    out = np.matmul(scores, vg)                                            # (n_kv, group, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, n_heads * head_dim)


def embed(table, ids):
    """Gather rows of an embedding table (vocab, d) float16|float32 -> (T, d) float32 (a new array)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be 1-D (T,), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise GenerationError(
            f"token id out of range [0, {table.shape[0]}): min {ids.min()}, max {ids.max()}"
        )
    return table[ids].astype(np.float32)
