"""Logits -> next token: greedy, temperature, top-k, top-p, seeded.

All randomness comes from one `numpy.random.Generator` owned by the caller,
so a seed makes a whole generation reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set with cumulative probability >= p

    def __post_init__(self):
        t = _as_float(self.temperature)
        if t is None or math.isnan(t) or t < 0 or math.isinf(t):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", t)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))
                                       or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        p = None if self.top_p is None else _as_float(self.top_p)
        if self.top_p is not None and (p is None or math.isnan(p) or not 0.0 < p <= 1.0):
            raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        object.__setattr__(self, "top_p", p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _as_float(v):
    """v as a float, or None when it is not a real number (bools, strings, ints too big for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from one row of logits (vocab,) float32."""
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    z -= z.max()  # <= 0 before scaling: a tiny temperature gives -inf (greedy), never inf - inf
    with np.errstate(over="ignore"):
        z /= params.temperature
    if params.top_k is not None and params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z)
    probs /= probs.sum()
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(cumulative, params.top_p) + 1)  # smallest prefix reaching p
        kept = order[:n_keep]
        mask = np.zeros_like(probs)
        mask[kept] = probs[kept]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
