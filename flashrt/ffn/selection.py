"""Which FFN neurons a token needs: the selection policies of flash mode.

Every selector answers `select(layer, x (d,) float32, prior=None) -> int64 ids`, most
important first (the cache keeps the head of the list when the selection does not fit),
and has `close()`. `prior` is the last |h| of the cached neurons (-1 for the others); the
flash FFN passes it only to a selector whose `uses_prior` is True.
  all        every neuron: exact, the slowest flash run
  oracle     the true active set from the real weights (a test/benchmark tool: it reads
             each layer's whole FFN through the loader and the page cache every token, so
             it ignores the memory budget)
  predictor  the low-rank predictors fitted by `flashrt calibrate`; GateFirstSelector scores
             them with the exact gate (gate rows held in DRAM) times the low-rank up estimate
"""
from __future__ import annotations

import os

import numpy as np

from .._core import kernels, loader
from .base import ACT_CODES


class AllSelector:
    name = "all"
    uses_prior = False

    def __init__(self, n_neurons: int):
        self._ids = np.arange(n_neurons, dtype=np.int64)  # (n_neurons,)

    def select(self, layer: int, x: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        return self._ids

    def close(self) -> None:
        pass


# activation codes whose outputs are (almost) never exactly zero: silu, gelu, gelu_tanh
SMOOTH_ACTS = (ACT_CODES["silu"], ACT_CODES["gelu"], ACT_CODES["gelu_tanh"])


class OracleSelector:
    """The neurons whose true output is non-zero (ReLU-type activations, gated or not) or
    among the largest |h| (smooth FFNs: gated, or ungated with a GELU/SiLU as Phi-2's).

    keep_fraction: smooth FFNs only -- the share of neurons kept per token, by |h|.
    act_param: the activation's parameter (FATReLU's threshold); relu_sparse: neurons are
    exactly zero where the activation cuts them (FFNSpec.relu_sparse), so the set is exact.
    """

    name = "oracle"
    uses_prior = False

    def __init__(self, files, gated: bool, act: int, up_bias, keep_fraction: float | None, n_threads: int,
                 act_param: float = 0.0, relu_sparse: bool = False):
        self.gated, self.act, self.up_bias = gated, act, up_bias
        self.act_param, self.relu_sparse = act_param, relu_sparse
        self.keep_fraction = keep_fraction
        self.n_threads = n_threads
        self.qtype = files.qtype
        self.down_qtype = files.down_qtype if files.down_qtype != files.qtype else None
        n, row_elems = files.n_neurons, files.ffn_row_bytes // files.dtype.itemsize
        # read, not memory-mapped: a truncated ffn.bin is a FlashIOError, not a SIGBUS
        self._loader = loader.Loader(str(files.ffn_path), n_threads=4, direct=False)
        self._offsets = [files.ffn_layer_offset(l) for l in range(files.n_layers)]
        self._rows = np.empty((n, row_elems), files.dtype)  # (n_neurons, row_elems) one layer
        self._h = np.empty(n, np.float32)
        self._y = np.empty(files.dim, np.float32)

    def true_outputs(self, layer: int, x: np.ndarray) -> np.ndarray:
        """h (n_neurons,) float32: every neuron's output for input x."""
        bias = None if self.up_bias is None else self.up_bias[layer]
        self._loader.read_range(self._offsets[layer], self._rows)
        kernels.ffn_rows(self._rows, x, self._y, self.gated, self.act, bias, self._h, self.n_threads,
                         qtype=self.qtype, down_qtype=self.down_qtype, act_param=self.act_param)
        return self._h

    def close(self) -> None:
        """Close ffn.bin and stop the reader threads now, not at garbage collection."""
        self._loader.close()

    def select(self, layer: int, x: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        mag = np.abs(self.true_outputs(layer, x))
        if self.keep_fraction is None or self.relu_sparse or not (self.gated or self.act in SMOOTH_ACTS):
            ids = np.flatnonzero(mag > 0)
            return ids[np.argsort(-mag[ids], kind="stable")]
        k = max(1, int(round(self.keep_fraction * mag.size)))
        top = np.argpartition(-mag, k - 1)[:k]
        return top[np.argsort(-mag[top], kind="stable")].astype(np.int64)


class PredictorSelector:
    """The fitted low-rank predictors (see flashrt.predictor).

    uses_prior: some layer has a temporal prior (prior_weight > 0); FlashFFN then passes
    `prior` (n_neurons,) float32 = the |h| the kernel computed for each cached neuron at
    the previous token, -1 for neurons not cached.
    """

    name = "predictor"

    def __init__(self, predictors, keep_fraction: float | None):
        self.predictors = predictors
        self.keep_fraction = keep_fraction
        self.uses_prior = any(getattr(p, "prior_weight", 0.0) > 0.0 for p in predictors)

    def select(self, layer: int, x: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        ids = self.predictors[layer].select(x, keep_fraction=self.keep_fraction, prior=prior)
        return np.asarray(ids, dtype=np.int64)

    def close(self) -> None:
        pass


class GateFirstSelector(PredictorSelector):
    """Predictor selection scored as |silu(gate.x) * u_hat| with the exact gate.

    gates: per layer (n_neurons, d) float16|float32, or (n_neurons, row_bytes(qtype, d)) uint8
    blocks of `qtype`, C-contiguous: the gate rows as stored (in DRAM), run by the GEMV kernel
    (quantized rows: integer dot products, as the flash FFN computes the gate).
    The up estimate is the predictor's separate up estimate when calibration stored one.
    """

    def __init__(self, predictors, gates, keep_fraction: float | None, n_threads: int, qtype: str | None = None):
        super().__init__(predictors, keep_fraction)
        self.gates = gates
        self.qtype = qtype
        self.n_threads = n_threads
        self._g = np.empty(gates[0].shape[0], np.float32)  # (n_neurons,) gate.x of the current layer

    @staticmethod
    def read_gates(files):
        """Every layer's gate rows copied out of the bundle file: the first part of each row,
        (n, d) float or (n, gate row bytes) uint8 blocks. Read, not memory-mapped (a truncated
        file is a ModelFormatError, not a SIGBUS), and dropped from the page cache after."""
        width = gate_row_width(files)
        out = []
        with open(files.ffn_path, "rb") as f:
            for l in range(files.n_layers):
                out.append(np.ascontiguousarray(files.read_ffn_layer(l)[:, :width]))
                os.posix_fadvise(f.fileno(), files.ffn_layer_offset(l), files.ffn_layer_bytes,
                                 os.POSIX_FADV_DONTNEED)
        return out

    def select(self, layer: int, x: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        kernels.gemv(self.gates[layer], x, self._g, self.n_threads, self.qtype)
        ids = self.predictors[layer].select(x, keep_fraction=self.keep_fraction, prior=prior, gate=self._g)
        return np.asarray(ids, dtype=np.int64)

    def close(self) -> None:
        self.gates = []


def gate_row_width(files) -> int:
    """Elements (float bundles) or bytes (quantized) of a gate row as stored."""
    if files.qtype is None:
        return files.dim
    return files.dim // kernels.BLOCK_ELEMS * kernels.BLOCK_BYTES[files.qtype]
