"""Logits -> next token: repetition penalty, greedy or temperature, top-k, top-p, min-p, seeded.

The order (as llama.cpp's default chain): the repetition penalty on the raw logits, then
greedy argmax at temperature 0 (top-k, top-p and min-p change nothing there: the argmax
survives every one of them), else temperature, top-k, top-p, min-p, and a draw.

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
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one
    repeat_penalty: float = 1.0  # llama.cpp's: a seen token's logit / penalty if > 0, else * penalty
    repeat_last_n: int = 64  # how many of the latest tokens (prompt included) the penalty looks at

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
        m = None if self.min_p is None else _as_float(self.min_p)
        if self.min_p is not None and (m is None or math.isnan(m) or not 0.0 <= m <= 1.0):
            raise GenerationError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        object.__setattr__(self, "min_p", m)
        r = _as_float(self.repeat_penalty)
        if r is None or math.isnan(r) or math.isinf(r) or r <= 0:
            raise GenerationError(f"repeat_penalty must be a finite number > 0 (1 = off), got {self.repeat_penalty!r}")
        object.__setattr__(self, "repeat_penalty", r)
        n = self.repeat_last_n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise GenerationError(f"repeat_last_n must be an integer >= 0, got {n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def ignored_at_greedy(self) -> list[str]:
        """The truncation settings that cannot change a greedy pick (named for a warning)."""
        if not self.greedy:
            return []
        return [name for name, v in (("top_k", self.top_k), ("top_p", self.top_p), ("min_p", self.min_p))
                if v is not None]


def _as_float(v):
    """v as a float, or None when it is not a real number (bools, strings, ints too big for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def penalize(logits: np.ndarray, history, penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's repetition penalty: each distinct token among the last `last_n` of `history`
    gets its logit divided by `penalty` when positive, multiplied when negative. A new array."""
    if penalty == 1.0 or last_n == 0 or history is None or len(history) == 0:
        return logits
    seen = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
    out = np.array(logits, dtype=np.float32, copy=True)
    z = out[seen]
    out[seen] = np.where(z > 0, z / penalty, z * penalty)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities (float64) of one row of logits."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, dict]:
    """(log-probability of `token`, {id: log-probability} of the k most likely ids, best first)
    under the model's own distribution (the raw logits, temperature 1, as OpenAI reports them)."""
    lp = log_softmax(logits)
    k = min(int(k), lp.size)
    best = np.argpartition(-lp, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
    best = best[np.argsort(-lp[best], kind="stable")]
    return float(lp[token]), {int(i): float(lp[i]) for i in best}


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history=None) -> int:
    """Pick the next token id from one row of logits (vocab,) float32. `history` (the ids so
    far, prompt included) feeds the repetition penalty."""
    logits = penalize(logits, history, params.repeat_penalty, params.repeat_last_n)
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
    if params.min_p is not None and params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)  # the argmax always stays
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
