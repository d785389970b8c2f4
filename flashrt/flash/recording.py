"""An FFN wrapper that records, during a dense forward pass, each layer's FFN input x and
every neuron's output h (the calibration data for the predictors).

    rec = RecordingFFN(dense_ffn, token_fraction=0.5, seed=0)
    model = build_model(arch, config, weights, rec, linear)
    model.forward(ids, kv)                          # records while computing as usual
    X, H = rec.arrays(layer)                        # (T, d), (T, n) float32

The wrapped FFN must accept `h_out=` (flashrt.ffn_dense.DenseFFN does) and fill it with
the (T, n) per-neuron outputs: gated h = silu(gate.x) * (up.x); ReLU h = act(up.x + b).
The same token subset is recorded at every layer of one forward call (drawn at layer 0),
so rows line up across layers. Stored as float16 by default to halve the memory.
"""
from __future__ import annotations

import numpy as np


class RecordingFFN:
    """FFN(layer, x (T, d)) -> (T, d), recording (x, h) of a subset of tokens per layer."""

    def __init__(self, inner, token_fraction=1.0, max_tokens=None, dtype=np.float16, seed=0):
        if not 0.0 < token_fraction <= 1.0:
            raise ValueError(f"RecordingFFN: token_fraction must be in (0, 1], got {token_fraction}")
        self.inner = inner
        self.token_fraction = float(token_fraction)
        self.max_tokens = max_tokens
        self.dtype = np.dtype(dtype)
        self.enabled = True
        self._rng = np.random.default_rng(seed)
        self._x = {}          # layer -> list of (t, d) arrays
        self._h = {}          # layer -> list of (t, n) arrays
        self._rows = None     # token rows chosen for the current forward call
        self._counts = {}     # layer -> tokens recorded

    def n_recorded(self, layer=0):
        return self._counts.get(layer, 0)

    def n_neurons(self, layer):
        return self.inner.n_neurons(layer)

    def __call__(self, layer, x):
        T = x.shape[0]
        if not self.enabled:
            return self.inner(layer, x)
        h = np.empty((T, self.inner.n_neurons(layer)), np.float32)   # (T, n)
        y = self.inner(layer, x, h_out=h)
        if layer == 0 or self._rows is None or self._rows_T != T:
            self._draw_rows(T)
        rows = self._rows
        if self.max_tokens is not None:
            rows = rows[: max(0, self.max_tokens - self.n_recorded(layer))]
        if rows.size:
            self._x.setdefault(layer, []).append(np.asarray(x[rows], dtype=self.dtype))
            self._h.setdefault(layer, []).append(h[rows].astype(self.dtype))
            self._counts[layer] = self.n_recorded(layer) + rows.size
        return y

    def _draw_rows(self, T):
        if self.token_fraction >= 1.0:
            rows = np.arange(T)
        else:
            rows = np.flatnonzero(self._rng.random(T) < self.token_fraction)
        self._rows, self._rows_T = rows, T

    def arrays(self, layer, dtype=np.float32):
        """(X (T, d), H (T, n)) recorded for `layer`, concatenated, as `dtype`."""
        if layer not in self._x:
            raise ValueError(f"RecordingFFN: nothing recorded for layer {layer}")
        X = np.concatenate(self._x[layer]).astype(dtype, copy=False)
        H = np.concatenate(self._h[layer]).astype(dtype, copy=False)
        return X, H

    def layers(self):
        return sorted(self._x)

    def clear(self):
        self._x.clear()
        self._h.clear()
        self._counts.clear()
        self._rows = None

    @property
    def nbytes(self):
        return sum(a.nbytes for v in self._x.values() for a in v) + sum(a.nbytes for v in self._h.values() for a in v)
