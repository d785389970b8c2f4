"""The FFN with every layer's bundle matrix in DRAM (dense mode, and the flash path's oracle).

A layer's bundle matrix is (n_neurons, n_parts * d): row i = [gate_i,] up_i, down_i
(see flashrt/ffn/layout.py). One token runs the fused `ffn_rows` kernel over all
rows; many tokens (prefill) run BLAS over row blocks converted to float32.
Bundles are float16/float32 arrays, or uint8 rows of quantized blocks (`qtype` q8_0 | q4_0 |
q4_1: each part of a row is d weights in blocks of 32, see flashrt/quant.py).
"""
import numpy as np

from flashrt._core import kernels
from flashrt.ffn.base import StatelessFFN
from flashrt.linear import scratch
from flashrt.quant import BLOCK_BYTES, BLOCK_ELEMS
from flashrt.threads import default_threads

__all__ = ["DenseFFN", "ffn_blocks", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh", "fatrelu", "drelu")  # kernels.ACT_CODES
SCRATCH_ELEMS = 1 << 19          # float32 elements per converted block of bundle rows
MIN_BLOCK_ROWS = 32
MAX_BLOCK_ROWS = 1024


def _is_gated(gated):
    """`gated` is a bool or the parts tuple (("gate", "up", "down") or ("up", "down"))."""
    if isinstance(gated, (bool, np.bool_)):
        return bool(gated)
    parts = tuple(gated)
    if parts == ("gate", "up", "down"):
        return True
    if parts == ("up", "down"):
        return False
    raise ValueError(f"DenseFFN: parts must be ('gate', 'up', 'down') or ('up', 'down'), got {parts!r}")


def _describe(a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    return f"{a.dtype} array of shape {a.shape}" + ("" if a.flags.c_contiguous else " (non-contiguous)")


class DenseFFN(StatelessFFN):
    """FFN over all neurons of every layer, bundles resident in DRAM.

    bundles: list over layers of (n_neurons, n_parts * d) float16|float32 C-contiguous, or
             (n_neurons, n_parts * row_bytes(qtype, d)) uint8 for a quantized qtype
    gated: bool, or the parts tuple ("gate", "up", "down") / ("up", "down")
    act: "silu" | "relu" | "gelu" (exact erf gelu) | "gelu_tanh" | "fatrelu" (v > act_param ? v : 0)
         | "drelu". Gated: h = act(gate.x) * (up.x) (drelu: relu(gate.x) * relu(up.x));
         otherwise h = act(up.x + up_bias).
    up_bias: list over layers of (n_neurons,) float32 (or None entries), or None
    down_bias: list over layers of (d,) float32 (or None entries), or None; added once
    n_threads: kernel threads (None: flashrt.threads.default_threads() at each call)
    qtype: None (float bundles) or "q8_0" | "q4_0" | "q4_1"
    down_qtype: the down parts' quantized type when it differs from qtype (None: qtype)

    `ffn(layer, x (T, d) float32) -> (T, d) float32`: the FFN without residual or norm.
    """

    def __init__(self, bundles, gated, act, up_bias=None, down_bias=None, n_threads=None,
                 qtype=None, down_qtype=None, act_param=0.0):
        self.gated = _is_gated(gated)
        if act not in ACTIVATIONS:
            raise ValueError(f"DenseFFN: act must be one of {ACTIVATIONS}, got {act!r}")
        self.act, self.act_param = act, float(act_param)
        self.n_parts = 3 if self.gated else 2
        bundles = list(bundles)
        if not bundles:
            raise ValueError("DenseFFN: bundles is empty (one (n, n_parts * d) matrix per layer)")
        first = bundles[0]
        if qtype is not None and qtype not in BLOCK_BYTES:
            raise ValueError(f"DenseFFN: qtype must be None or one of {sorted(BLOCK_BYTES)}, got {qtype!r}")
        dtypes = (np.float16, np.float32) if qtype is None else (np.uint8,)
        if down_qtype is not None and (qtype is None or down_qtype not in BLOCK_BYTES):
            raise ValueError(f"DenseFFN: down_qtype needs quantized bundles, got {down_qtype!r} with qtype {qtype!r}")
        self.down_qtype = down_qtype or qtype
        # bytes (or elements) per 32 weights of a row's parts
        unit = (self.n_parts if qtype is None
                else (self.n_parts - 1) * BLOCK_BYTES[qtype] + BLOCK_BYTES[self.down_qtype])
        for l, B in enumerate(bundles):
            if (not isinstance(B, np.ndarray) or B.ndim != 2 or B.dtype not in dtypes
                    or not B.flags.c_contiguous):
                raise ValueError(f"DenseFFN: bundles[{l}] must be a C-contiguous 2-D "
                                 f"{' or '.join(np.dtype(t).name for t in dtypes)} array"
                                 f"{'' if qtype is None else f' of {qtype} blocks'}, got {_describe(B)}")
            if B.shape[1] % unit != 0 or B.shape[1] == 0:
                raise ValueError(f"DenseFFN: bundles[{l}] has {B.shape[1]} columns, not a multiple "
                                 f"of n_parts = {self.n_parts}"
                                 f"{'' if qtype is None else f' x {qtype} blocks'}")
            if B.shape[1] != first.shape[1] or B.dtype != first.dtype:
                raise ValueError(f"DenseFFN: bundles[{l}] is {_describe(B)} but bundles[0] is "
                                 f"{_describe(first)}; every layer needs the same dim and dtype")
        self.bundles = bundles                       # list of (n_neurons, n_parts * d)
        self.n_layers = len(bundles)
        self.qtype = qtype
        self.dim = (first.shape[1] // self.n_parts if qtype is None
                    else first.shape[1] // unit * BLOCK_ELEMS)
        self.dtype = first.dtype
        self.up_bias = self._check_biases("up_bias", up_bias, lambda l: bundles[l].shape[0])
        self.down_bias = self._check_biases("down_bias", down_bias, lambda l: self.dim)
        if self.gated and any(b is not None for b in self.up_bias):
            raise ValueError("DenseFFN: up_bias is only supported for non-gated (up, down) FFNs")
        self.n_threads = n_threads

    def _check_biases(self, name, biases, length):
        if biases is None:
            return [None] * self.n_layers
        biases = list(biases)
        if len(biases) != self.n_layers:
            raise ValueError(f"DenseFFN: {name} has {len(biases)} entries for {self.n_layers} layers")
        for l, b in enumerate(biases):
            if b is None:
                continue
            if not isinstance(b, np.ndarray) or b.dtype != np.float32 or b.shape != (length(l),):
                raise ValueError(f"DenseFFN: {name}[{l}] must be a float32 array of shape "
                                 f"({length(l)},), got {_describe(b)}")
            if not b.flags.c_contiguous:
                biases[l] = np.ascontiguousarray(b)
        return biases

    def n_neurons(self, layer):
        return self.bundles[layer].shape[0]

    def __call__(self, layer, x, h_out=None):
        """FFN of `layer` for x (T, d) float32 -> (T, d) float32.

        h_out: optional (T, n_neurons) float32 receiving each neuron's h (for stats/calibration).
        """
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"DenseFFN: layer {layer} out of range [0, {self.n_layers})")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"DenseFFN: x must be a float32 array (T, {self.dim}), got {_describe(x)}")
        B = self.bundles[layer]
        T, n = x.shape[0], B.shape[0]
        if h_out is not None and (not isinstance(h_out, np.ndarray) or h_out.dtype != np.float32
                                  or h_out.shape != (T, n) or not h_out.flags.c_contiguous):
            raise ValueError(f"DenseFFN: h_out must be a C-contiguous float32 array ({T}, {n}), "
                             f"got {_describe(h_out)}")
        n_threads = default_threads() if self.n_threads is None else self.n_threads
        x = np.ascontiguousarray(x)
        y = np.empty((T, self.dim), dtype=np.float32)
        if T == 1:
            kernels.ffn_rows(B, x[0], y[0], self.gated, self.act, self.up_bias[layer],
                             None if h_out is None else h_out[0], n_threads, self.qtype,
                             self.down_qtype if self.down_qtype != self.qtype else None,
                             act_param=self.act_param)
        elif T > 1:
            self._blocks(layer, x, y, h_out, n_threads)
        if self.down_bias[layer] is not None:
            y += self.down_bias[layer]
        return y

    @property
    def parts(self):
        return ("gate", "up", "down") if self.gated else ("up", "down")

    def part_bytes(self, part):
        """(start, stop) of `part` in a bundle row, in elements (float) or bytes (quantized)."""
        k = self.parts.index(part)
        if self.qtype is None:
            return k * self.dim, (k + 1) * self.dim
        rb = self.dim // BLOCK_ELEMS * BLOCK_BYTES[self.qtype]
        stop = k * rb + (rb if part != "down" else self.dim // BLOCK_ELEMS * BLOCK_BYTES[self.down_qtype])
        return k * rb, stop

    def part_f32(self, layer, part, n_threads=None):
        """One part of every neuron of `layer` as float32 (n_neurons, d): "gate" and "up" rows,
        "down" columns (row i = neuron i's down column). Quantized parts are dequantized
        (bit-exact with gguf.quants.dequantize); float parts are copied."""
        B = self.bundles[layer]
        a, b = self.part_bytes(part)
        if self.qtype is None:
            return np.ascontiguousarray(B[:, a:b], dtype=np.float32)
        out = np.empty((B.shape[0], self.dim), np.float32)
        kernels.to_f32(np.ascontiguousarray(B[:, a:b]), out, self.down_qtype if part == "down" else self.qtype,
                       default_threads() if n_threads is None else n_threads)
        return out

    def _blocks(self, layer, x, y, h_out, n_threads):
        ffn_blocks(self.bundles[layer], x, y, self.gated, self.act, self.up_bias[layer], h_out,
                   n_threads, self.qtype, self.down_qtype, self.act_param)

    @classmethod
    def from_files(cls, files, spec, n_threads=None):
        """Every layer's bundle matrix read into DRAM from an opened model directory;
        spec: the family's FFNSpec (models/<family>.py: ffn_spec)."""
        bundles = [files.read_ffn_layer(l) for l in range(files.n_layers)]
        return cls(bundles, spec.gated, spec.act, spec.up_bias, spec.down_bias, n_threads=n_threads,
                   qtype=files.qtype, down_qtype=files.down_qtype, act_param=spec.act_param)


def ffn_blocks(B, x, y, gated, act, up_bias=None, h_out=None, n_threads=None, qtype=None,
               down_qtype=None, act_param=0.0):
    """y (T, d) = FFN of the rows of B (n, n_parts * d) for x (T, d), with float32 BLAS over
    row blocks (float16 or quantized (qtype) blocks converted into a reused scratch).
    Overwrites y; h_out (T, n) optionally receives each neuron's h. Shared by dense prefill
    and the flash stream."""
    n_threads = default_threads() if n_threads is None else n_threads
    P = 3 if gated else 2
    d = x.shape[1]
    n = B.shape[0]
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, SCRATCH_ELEMS // (P * d)))
    buf = scratch(rows * P * d) if B.dtype != np.float32 else None
    if down_qtype is not None and down_qtype != qtype:           # per-part conversions
        buf2 = np.empty(rows * (P - 1) * d, np.float32)
        buf3 = np.empty(rows * d, np.float32)
    y[...] = 0.0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if buf is None:
            blk = B[r0:r1]                                           # (b, P * d) float32
        else:
            blk = buf[: (r1 - r0) * P * d].reshape(r1 - r0, P * d)   # (b, P * d) float32
            if down_qtype is None or down_qtype == qtype:
                kernels.to_f32(B[r0:r1], blk, qtype, n_threads)
            else:                                                    # the down parts differ
                cut = (P - 1) * (d // 32) * BLOCK_BYTES[qtype]
                kernels.to_f32(np.ascontiguousarray(B[r0:r1, :cut]), buf2[: (r1 - r0) * (P - 1) * d], qtype, n_threads)
                kernels.to_f32(np.ascontiguousarray(B[r0:r1, cut:]), buf3[: (r1 - r0) * d], down_qtype, n_threads)
                blk[:, :(P - 1) * d] = buf2[: (r1 - r0) * (P - 1) * d].reshape(r1 - r0, -1)
                blk[:, (P - 1) * d:] = buf3[: (r1 - r0) * d].reshape(r1 - r0, d)
        if gated:
            h = np.matmul(x, blk[:, :d].T)                           # (T, b) gate . x
            kernels.activation_inplace(h, act, n_threads, act_param)
            u = np.matmul(x, blk[:, d:2 * d].T)                      # (T, b) up . x
            if act == "drelu":
                kernels.activation_inplace(u, "relu", n_threads)
            h *= u
        else:
            h = np.matmul(x, blk[:, :d].T)                           # (T, b) up . x
            if up_bias is not None:
                h += up_bias[r0:r1]
            kernels.activation_inplace(h, act, n_threads, act_param)
        if h_out is not None:
            h_out[:, r0:r1] = h
        y += np.matmul(h, blk[:, (P - 1) * d:])                      # (T, d)
