"""What a neuron cache of a given size costs in quality: the replica of flash mode and the curve.

    ffn = CacheReplicaFFN(dense, down, scorer, keep=0.5, window=5, capacity=768)
    model = build_model(..., ffn, ...)        # a batched, teacher-forced forward pass
    ... perplexity over held-out chunks ...  # ffn.computed_fraction, ffn.read_fraction

A teacher-forced replica of flash decode: each chunk of tokens runs as one batched dense
forward pass, and in each layer the FFN output is corrected to what flash mode computes
token by token. The replica follows flashrt's NeuronCache exactly: neurons whose last
selection is `window` tokens old leave; the token's selection (most important first) is
admitted up to the capacity, evicting the least recently selected neurons not selected now
(ties: lower id first); selected neurons beyond the capacity are computed too (the flash
FFN streams them through). Computed = the cache after admission plus that overflow. Since
the model is causal this gives the logits of feeding the tokens one at a time.

`QualityCurve` is what calibration stores: per cache share (cached neurons / neurons per
layer) the perplexity ratio to dense on held-out tokens, with the computed and read
fractions, at the predictor's keep fraction and window. The Generator reads it to warn
when its budget falls where the predictor loses more than WARN_RATIO.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .lowrank import n_keep

WARN_RATIO = 1.10      # a budget measured above +10% perplexity warns
GOOD_RATIO = 1.05      # ... naming the budget that reaches +5%
DEFAULT_SHARES = (0.5, 0.7, 0.9, 1.0)   # each point is one teacher-forced pass over the held-out tokens


class CacheReplicaFFN:
    """Dense FFN whose output keeps only what flash mode, with this cache, would compute.

    dense(layer, x (T, d), h_out=(T, n)) -> (T, d): the dense FFN, filling h_out with h.
    down: per layer (n, d) float32, the down projection as rows (h @ down = the output).
    scorer(layer, x (T, d), h (T, n)) -> (T, n) scores (higher: selected first), or None
    with mode "oracle" (scores = |h|).
    keep: fraction of neurons selected per token; window: tokens a selection stays;
    capacity: cache rows per layer (None: every neuron).
    """

    def __init__(self, dense, down, scorer, keep, window, capacity=None, mode="predictor"):
        if mode not in ("predictor", "oracle", "dense"):
            raise ValueError(f"CacheReplicaFFN: mode must be predictor, oracle or dense, got {mode!r}")
        self.dense, self.down, self.scorer = dense, down, scorer
        self.keep, self.window, self.capacity, self.mode = float(keep), int(window), capacity, mode
        self.n_cells = self.n_computed = self.n_read = 0   # token-neuron cells over all calls

    def n_neurons(self, layer):
        return self.dense.n_neurons(layer)

    @property
    def computed_fraction(self):
        return self.n_computed / max(1, self.n_cells)

    @property
    def read_fraction(self):
        return self.n_read / max(1, self.n_cells)

    def __call__(self, layer, x):                               # x (T, d) -> (T, d)
        T, n = x.shape[0], self.dense.n_neurons(layer)
        h = np.empty((T, n), np.float32)                        # (T, n) hidden activations
        y = self.dense(layer, x, h_out=h)
        if self.mode == "dense":
            return y
        scores = np.abs(h) if self.mode == "oracle" else self.scorer(layer, x, h)   # (T, n)
        computed, n_read = replay_cache(scores, n_keep(n, self.keep), self.window,
                                        n if self.capacity is None else int(self.capacity))
        # statistics skip the chunk's last token: its logits score nothing
        self.n_cells += (T - 1) * n
        self.n_computed += int(computed[:-1].sum())
        self.n_read += n_read
        y -= np.where(computed, 0.0, h).astype(np.float32) @ self.down[layer]   # drop what was not computed
        return y


def replay_cache(scores, k, window, capacity):
    """(T, n) scores -> ((T, n) bool computed, neurons read over tokens 0..T-2).

    Token t selects its top k by score; the cache of `capacity` rows evolves as NeuronCache's
    admit() does (see the module docstring)."""
    T, n = scores.shape
    C = max(1, min(int(capacity), n))
    never = np.iinfo(np.int64).min // 2
    last = np.full(n, never, np.int64)                          # step each cached neuron was last selected
    computed = np.zeros((T, n), bool)
    sel = np.zeros(n, bool)
    n_read = 0
    for t in range(T):
        last[last <= t - window] = never                        # (1) the window
        cached = last != never
        if k >= n:
            order = np.argsort(-scores[t], kind="stable")
        else:
            idx = np.argpartition(-scores[t], k - 1)[:k]
            order = idx[np.argsort(-scores[t][idx], kind="stable")]
        admit, over = order[:C], order[C:]
        sel[:] = False
        sel[admit] = True
        new = int((sel & ~cached).sum())
        excess = int((cached & ~sel).sum()) + admit.size - C
        if excess > 0:                                          # (3) LRU among the not selected
            cand = np.flatnonzero(cached & ~sel)
            last[cand[np.lexsort((cand, last[cand]))[:excess]]] = never
        last[admit] = t                                         # (2) + (4)
        computed[t] = last != never
        computed[t, over] = True                                # the overflow is streamed and computed
        if t < T - 1:
            n_read += new + over.size
    return computed, n_read


@dataclasses.dataclass
class QualityCurve:
    """Perplexity ratio to dense per cache share, measured on held-out tokens.

    points: [{"cache_share", "ratio", "computed", "read"}, ...] in increasing cache share.
    """

    keep: float
    window: int
    n_tokens: int
    points: list
    source: str = ""

    def to_dict(self):
        return {"keep": self.keep, "window": self.window, "n_tokens": self.n_tokens, "source": self.source,
                "points": [dict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or not isinstance(d.get("points"), list) or not d["points"]:
            return None
        pts = sorted(({k: float(v) for k, v in p.items()} for p in d["points"]), key=lambda p: p["cache_share"])
        return cls(float(d["keep"]), int(d["window"]), int(d["n_tokens"]), pts, str(d.get("source", "")))

    def ratio_at(self, share):
        """The perplexity ratio at a cache share (linear between points; below the first point: the
        first point's ratio, a lower bound; above the last: the last's)."""
        xs = [p["cache_share"] for p in self.points]
        ys = [p["ratio"] for p in self.points]
        return float(np.interp(share, xs, ys))

    def value_at(self, share, key):
        """A point's field ("ratio", "computed", "read") at a cache share, as ratio_at interpolates."""
        xs = [p["cache_share"] for p in self.points]
        return float(np.interp(share, xs, [p[key] for p in self.points]))

    def share_for(self, ratio):
        """The smallest measured cache share at which the ratio, and every larger share's, is <= ratio
        (None when no point reaches it)."""
        best = None
        for p in reversed(self.points):
            if p["ratio"] > ratio:
                break
            best = p["cache_share"]
        return best

    def summary(self, budgets=None):
        """The curve as a small table; budgets: the memory budget (bytes) of each point, a column."""
        src = f", {self.source}" if self.source else ""
        lines = [f"quality vs neuron cache ({self.n_tokens} held-out tokens{src}; "
                 f"{self.keep:.0%} selected, window {self.window}):",
                 "  cache share  perplexity  computed  read/token" + ("     budget" if budgets else "")]
        for i, p in enumerate(self.points):
            lines.append(f"  {p['cache_share']:11.2f}  {100 * (p['ratio'] - 1):+9.1f}%  {p['computed']:8.3f}  "
                         f"{p['read']:10.3f}" + (f"  {budgets[i] / 1e6:6.1f} MB" if budgets else ""))
        return "\n".join(lines)


def chunk_perplexity(forward, ids, ctx):
    """Perplexity of ids scored in independent chunks of ctx tokens; forward(chunk) -> (c, vocab) logits."""
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        chunk = ids[i:i + ctx]
        if len(chunk) < 2:
            break
        logits = np.asarray(forward(chunk), np.float64)[:-1]                 # (c - 1, vocab)
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return float(np.exp(nll / max(1, count)))


def dense_perplexity(make_forward, dense, down, ids, ctx=512):
    """Perplexity of ids with the dense FFN, through the same replica and chunks as the curve."""
    ffn = CacheReplicaFFN(dense, down, None, 1.0, 1, mode="dense")
    return chunk_perplexity(make_forward(ffn), np.asarray(ids, np.int64), ctx)


def measure_quality_curve(make_forward, dense, down, scorer, ids, keep, window, ctx=512, shares=DEFAULT_SHARES,
                          source="", base=None):
    """QualityCurve of a scorer: the replica's perplexity ratio to dense at each cache share.

    make_forward(ffn) -> forward(chunk ids) -> logits: the model built around an FFN.
    dense, down, scorer: see CacheReplicaFFN. ids: held-out token ids (int64).
    base: the dense perplexity of ids when already measured (dense_perplexity).
    """
    ids = np.asarray(ids, np.int64)
    n = dense.n_neurons(0)
    if base is None:
        base = dense_perplexity(make_forward, dense, down, ids, ctx)
    points = []
    for share in shares:
        ffn = CacheReplicaFFN(dense, down, scorer, keep, window, capacity=max(1, int(round(share * n))))
        p = chunk_perplexity(make_forward(ffn), ids, ctx)
        points.append({"cache_share": float(share), "ratio": p / base, "computed": ffn.computed_fraction,
                       "read": ffn.read_fraction})
    return QualityCurve(float(keep), int(window), int(ids.size), points, source)
