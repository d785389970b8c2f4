"""Storage types: float32, float16, and the block-quantized q8_0, q4_0, q4_1.

A quantized matrix of n rows of k weights is a uint8 array (n, row_bytes) of ggml's blocks
(32 weights per block with a float16 scale, see flashrt/_core/quant.h), wrapped in a
`QMatrix` that knows its type and logical shape. `flashrt.linear`, the embedding lookup and
the FFN kernels take it wherever they take a float16 matrix. Quantizing uses gguf's NumPy
port of ggml's reference quantizers, so blocks flashrt writes are the blocks llama.cpp would
write; dequantizing uses the compiled kernel (bit-exact with gguf.quants.dequantize).
"""
from __future__ import annotations

import numpy as np

from ._core import kernels

FLOAT_TYPES = ("float32", "float16")
QUANT_TYPES = kernels.QUANT_TYPES              # ("q8_0", "q4_0", "q4_1")
STORAGE_TYPES = FLOAT_TYPES + QUANT_TYPES
BLOCK_ELEMS = kernels.BLOCK_ELEMS              # 32
BLOCK_BYTES = kernels.BLOCK_BYTES              # bytes per block of 32

# GGUF tensor type name -> the storage type holding it without loss (bit for bit), if any
GGUF_EXACT = {"F32": "float32", "F16": "float16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
# GGUF tensor type name -> the storage type a GGUF of that type converts to by default
GGUF_DEFAULT = dict(GGUF_EXACT, BF16="float32", Q5_0="q8_0", Q5_1="q8_0", Q4_K="q4_1",
                    Q5_K="q8_0", Q6_K="q8_0")


def is_quantized(storage: str) -> bool:
    return storage in BLOCK_BYTES


def check_storage(storage: str) -> str:
    if storage not in STORAGE_TYPES:
        raise ValueError(f"unknown storage type {storage!r}; use one of {list(STORAGE_TYPES)}")
    return storage


def row_bytes(storage: str, k: int) -> int:
    """Bytes of one row of k weights (k % 32 == 0 for quantized types)."""
    return kernels.row_bytes(check_storage(storage), int(k))


def fits(storage: str, k: int) -> bool:
    """Can rows of k weights be stored as `storage`?"""
    return not is_quantized(storage) or k % BLOCK_ELEMS == 0


def _gguf_type(storage):
    from gguf import GGMLQuantizationType as G  # start-up cost: gguf takes ~0.4 s to import

    return {"q8_0": G.Q8_0, "q4_0": G.Q4_0, "q4_1": G.Q4_1}[storage]


def quantize(values, storage: str) -> np.ndarray:
    """float values (..., k) -> uint8 blocks (..., row_bytes(storage, k)), ggml's reference
    quantizer (gguf.quants.quantize)."""
    from gguf.quants import quantize as gguf_quantize  # start-up cost, as above

    values = np.ascontiguousarray(values, dtype=np.float32)
    k = values.shape[-1]
    rb = row_bytes(storage, k)
    if values.size == 0:
        return np.zeros(values.shape[:-1] + (rb,), np.uint8)
    if not np.isfinite(values).all():
        raise ValueError("cannot quantize NaN or infinite values")
    out = gguf_quantize(values.reshape(-1, k), _gguf_type(storage))
    return np.ascontiguousarray(out).reshape(values.shape[:-1] + (rb,))


def dequantize(blocks, storage: str, k: int | None = None) -> np.ndarray:
    """uint8 blocks (..., row_bytes) -> float32 (..., k) with the compiled kernel."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    bb = BLOCK_BYTES[storage]
    n_k = blocks.shape[-1] // bb * BLOCK_ELEMS
    if k is not None and n_k != k:
        raise ValueError(f"{blocks.shape[-1]} bytes per row hold {n_k} {storage} weights, not {k}")
    out = np.empty(blocks.shape[:-1] + (n_k,), np.float32)
    kernels.to_f32(blocks, out, storage)
    return out


class QMatrix:
    """A (n, k) matrix stored as quantized rows: `data` (n, row_bytes) uint8, `qtype`.

    Indexing rows (`m[ids]`, `m[a:b]`, `m[i]`) returns them dequantized to float32, so an
    embedding lookup works unchanged; `flashrt.linear` multiplies by it without dequantizing
    the whole matrix.
    """

    __slots__ = ("data", "qtype", "shape")
    ndim = 2

    def __init__(self, data, qtype: str, k: int | None = None):
        if not is_quantized(qtype):
            raise ValueError(f"QMatrix needs a quantized type ({list(QUANT_TYPES)}), got {qtype!r}")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or not data.flags.c_contiguous:
            raise ValueError(f"QMatrix data must be a C-contiguous 2-D uint8 array, got "
                             f"{data.dtype} {data.shape}")
        bb = BLOCK_BYTES[qtype]
        if data.shape[1] % bb:
            raise ValueError(f"{data.shape[1]} bytes per row is not a whole number of {qtype} "
                             f"blocks ({bb} bytes)")
        n_k = data.shape[1] // bb * BLOCK_ELEMS
        if k is not None and k != n_k:
            raise ValueError(f"{data.shape[1]} bytes per row hold {n_k} {qtype} weights, not {k}")
        self.data = data
        self.qtype = qtype
        self.shape = (data.shape[0], n_k)

    @classmethod
    def from_float(cls, values, qtype: str) -> "QMatrix":
        values = np.asarray(values)
        return cls(quantize(values, qtype), qtype, values.shape[1])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def dtype(self):
        """The storage type's name (not a NumPy dtype: the rows are blocks, not elements)."""
        return self.qtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        rows = self.data[idx]
        return dequantize(rows, self.qtype)

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (n, k)."""
        return dequantize(self.data, self.qtype)

    def __repr__(self):
        return f"QMatrix({self.qtype}, shape={self.shape}, {self.nbytes} bytes)"


def storage_of(W) -> str:
    """The storage type of a weight matrix: a QMatrix's qtype or a float array's dtype name."""
    if isinstance(W, QMatrix):
        return W.qtype
    return np.dtype(W.dtype).name
