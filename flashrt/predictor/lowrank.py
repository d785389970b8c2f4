"""Low-rank neuron predictors: which FFN neurons matter for this token, before reading them.

One `LowRankPredictor` per layer, fed the FFN's input x (d,) (after the norm):

    z = A @ x                                  # (r,)   the r * d MACs
    kind "relu"    : s = B @ z + bias          # (n,)   logit of "pre-activation > 0"
    kind "product" : g = B[:, :r_gate] @ z[:r_gate] + bias_gate     # gate estimate
                     u = B[:, r_gate:] @ z[r_gate:] + bias          # up estimate
                     s = |silu(g) * u|         # estimated output magnitude |h|

Both cost r * (d + n) MACs per token: the product kind splits its rank between the
gate and the up estimates, so a gated predictor costs what a single low-rank does.
Gated FFNs are scored by the product because a neuron's contribution is
|silu(gate.x) * (up.x)|: thresholding the gate alone loses far more (SmolLM2-135M, oracle
sets at 50% kept: +42% perplexity by |silu(gate.x)|, +4.5% by the product).

Selection is top-k by score with a per-layer `keep_fraction` (a fixed fraction of the
layer's neurons, highest score first), or, with keep_fraction None, every neuron whose
score exceeds `threshold` (ReLU models: the fire/no-fire decision).

Temporal prior (product kind, flash decode): the kernel has just computed the true h of
every neuron the cache holds, so for those neurons the last |h| is known for free. With
`prior_weight` a > 0 the score of a neuron whose last |h| is known becomes
(1 - a) * s + a * |h_last| (both estimate |h|); the others keep s. `prior` is an (n,)
array holding |h_last|, negative where unknown.
"""
from __future__ import annotations

import numpy as np

from flashrt.linear import linear as _linear

KINDS = ("relu", "product")


def linear(W, X, bias=None):
    """X (T, k) float32 @ W.T (+ bias) for a factor W (m, k) float16|float32: one thread for one
    token (the factors are a few hundred KB; waking a second thread costs more than it saves)."""
    return _linear(W, X, bias, n_threads=1 if X.shape[0] == 1 else None)


def silu(z):
    """silu(z) = z * sigmoid(z), float32, overflow-safe."""
    return z / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def predictor_macs(kind, rank, dim, n_neurons):
    """Multiply-accumulates per token of a rank-`rank` predictor (both kinds: r * (d + n))."""
    del kind  # same cost for both kinds
    return int(rank) * (int(dim) + int(n_neurons))


def ffn_macs(gated, dim, n_neurons):
    """Multiply-accumulates per token of the dense FFN (gate, up, down or up, down)."""
    return (3 if gated else 2) * int(dim) * int(n_neurons)


def default_rank(gated, dim, n_neurons, budget=0.05, multiple=4):
    """The largest rank (a multiple of `multiple`) whose cost is under `budget` of the dense FFN."""
    r = int(budget * ffn_macs(gated, dim, n_neurons) / (dim + n_neurons))
    r -= r % multiple
    if predictor_macs("product" if gated else "relu", r, dim, n_neurons) >= budget * ffn_macs(gated, dim, n_neurons):
        r -= multiple
    return max(multiple, r)


# Gated models: rank multipliers for the first layer and the next ~L/7 layers, relative to the
# rest. Measured on SmolLM2 (bench/results/predictor_quality.md): the first FFN writes most of
# the early residual stream (its input is the bare embedding, rms 0.15 against 2-35 later), so
# its misses cost the most; rank 240/80/48 beats a uniform 60 at the same total cost.
FIRST_LAYER_RANK_FACTOR = 5.0
EARLY_LAYER_RANK_FACTOR = 5.0 / 3.0


def default_ranks(gated, n_layers, dim, n_neurons, budget=0.05, multiple=4):
    """Per-layer ranks whose total cost is under `budget` of the dense FFN over all layers.

    ReLU models: the uniform default_rank. Gated models: front-loaded, layer 0 gets
    FIRST_LAYER_RANK_FACTOR x the base rank, layers 1..L//7 get EARLY_LAYER_RANK_FACTOR x,
    the rest the base rank; no rank exceeds min(d, n).
    """
    L = int(n_layers)
    if not gated or L < 4:
        return [default_rank(gated, dim, n_neurons, budget, multiple)] * L
    n_early = max(1, L // 7)
    factors = np.ones(L)
    factors[0] = FIRST_LAYER_RANK_FACTOR
    factors[1: 1 + n_early] = EARLY_LAYER_RANK_FACTOR
    total = budget * L * ffn_macs(gated, dim, n_neurons) / (dim + n_neurons)   # rank units available
    cap = min(int(dim), int(n_neurons))
    base = total / factors.sum()
    while True:
        ranks = [min(cap, max(multiple, int(base * f) - int(base * f) % multiple)) for f in factors]
        if sum(predictor_macs("product", r, dim, n_neurons) for r in ranks) < budget * L * ffn_macs(
                gated, dim, n_neurons) or base <= multiple:
            return ranks
        base -= 1.0


class LowRankPredictor:
    """The predictor of one layer.

    A: (r, d) float32|float16        shared first factor (rows [:r_gate] feed the gate estimate)
    B: (n, r) float32|float16        second factor
    bias: (n,) float32               relu: logit bias; product: bias of the up estimate
    bias_gate: (n,) float32 | None   product only: bias of the gate estimate
    r_gate: int                      product only: how many of the r ranks estimate the gate
    keep_fraction: float | None      default top-k fraction for select()
    threshold: float                 score threshold for select() when keep_fraction is None
    prior_weight: float              weight a in [0, 1) of the temporal prior in select() (0: off)
    up: (A_u (r_u, d), B_u (n, r_u), bias_u (n,)) | None
                                     product only: a separate low-rank estimate of up.x for
                                     gate-first scoring (without it, the product's own up half)
    """

    def __init__(self, kind, A, B, bias=None, bias_gate=None, r_gate=0, keep_fraction=None, threshold=0.0,
                 prior_weight=0.0, up=None):
        if kind not in KINDS:
            raise ValueError(f"LowRankPredictor: kind must be one of {KINDS}, got {kind!r}")
        A = np.ascontiguousarray(A)
        B = np.ascontiguousarray(B)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LowRankPredictor: need A (r, d) and B (n, r), got A {A.shape} and B {B.shape}")
        if A.dtype not in (np.float16, np.float32) or B.dtype not in (np.float16, np.float32):
            raise ValueError(f"LowRankPredictor: A and B must be float16 or float32, got {A.dtype}, {B.dtype}")
        n, r = B.shape
        self.kind = kind
        # The factors are held once, as stored (float16 after calibration), and scored by
        # flashrt.linear (the gemv kernel for one token, float32 BLAS over converted row
        # blocks for many): no float32 working copies.
        self.A = A                                   # (r, d) float32|float16
        self.bias = np.zeros(n, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)  # (n,)
        if self.bias.shape != (n,):
            raise ValueError(f"LowRankPredictor: bias must be ({n},), got {self.bias.shape}")
        if kind == "product":
            if not 0 < r_gate < r:
                raise ValueError(f"LowRankPredictor: product kind needs 0 < r_gate < r = {r}, got {r_gate}")
            self.bias_gate = (np.zeros(n, np.float32) if bias_gate is None
                              else np.ascontiguousarray(bias_gate, np.float32))  # (n,)
            if self.bias_gate.shape != (n,):
                raise ValueError(f"LowRankPredictor: bias_gate must be ({n},), got {self.bias_gate.shape}")
            self.r_gate = int(r_gate)
            self._Bg = np.ascontiguousarray(B[:, : self.r_gate])   # (n, r_gate): the gate estimate
            self._Bu = np.ascontiguousarray(B[:, self.r_gate:])    # (n, r - r_gate): the up estimate
            self._B = None
        else:
            self.bias_gate = None
            self.r_gate = 0
            self._B = B                                            # (n, r)
        self.keep_fraction = None if keep_fraction is None else float(keep_fraction)
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"LowRankPredictor: keep_fraction must be in (0, 1], got {keep_fraction}")
        self.threshold = float(threshold)
        self.prior_weight = float(prior_weight)
        if not 0.0 <= self.prior_weight < 1.0:
            raise ValueError(f"LowRankPredictor: prior_weight must be in [0, 1), got {prior_weight}")
        self.up = None
        if up is not None:
            if kind != "product":
                raise ValueError("LowRankPredictor: a separate up estimate is for the product kind only")
            Au, Bu, bu = (np.ascontiguousarray(a) for a in up)
            if Au.ndim != 2 or Bu.ndim != 2 or Au.shape[0] != Bu.shape[1] or Au.shape[1] != A.shape[1] \
                    or Bu.shape[0] != n or bu.shape != (n,):
                raise ValueError(f"LowRankPredictor: up estimate must be A_u (r_u, {A.shape[1]}), B_u ({n}, r_u), "
                                 f"bias ({n},); got {Au.shape}, {Bu.shape}, {bu.shape}")
            if Au.dtype not in (np.float16, np.float32) or Bu.dtype not in (np.float16, np.float32):
                raise ValueError(f"LowRankPredictor: the up estimate must be float16 or float32, got {Au.dtype}, {Bu.dtype}")
            self.up = (Au, Bu, bu.astype(np.float32, copy=False))

    @property
    def B(self):
        """(n, r) the second factor (product: the gate columns, then the up columns; built on demand)."""
        return self._B if self._B is not None else np.concatenate([self._Bg, self._Bu], axis=1)

    @property
    def nbytes(self):
        """DRAM this predictor holds: the factors as stored, the biases, the separate up estimate."""
        arrays = [self.A, self._B, self.bias, self.bias_gate]
        if self.kind == "product":
            arrays += [self._Bg, self._Bu]
        if self.up is not None:
            arrays += list(self.up)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def rank(self):
        return self.A.shape[0]

    @property
    def dim(self):
        return self.A.shape[1]

    @property
    def n_neurons(self):
        return self.bias.shape[0]

    @property
    def macs(self):
        return predictor_macs(self.kind, self.rank, self.dim, self.n_neurons)

    def scores_batch(self, X, gate=None):
        """X (T, d) float32 -> (T, n) float32 scores (higher = more likely needed).

        gate (T, n) float32, product kind only: the exact gate pre-activations gate.x; the
        score is then |silu(gate.x) * u_hat| ("gate-first": only the up estimate is low-rank).
        """
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "relu":
            return linear(self._B, linear(self.A, X), self.bias)
        if gate is not None:
            if self.up is not None:
                u = linear(self.up[1], linear(self.up[0], X), self.up[2])        # (T, n) up estimate
            else:
                u = linear(self._Bu, linear(self.A[self.r_gate:], X), self.bias)  # (T, n) up estimate
            return np.abs(silu(np.asarray(gate, np.float32)) * u)
        Z = linear(self.A, X)                                       # (T, r)
        g = linear(self._Bg, Z[:, : self.r_gate], self.bias_gate)   # (T, n)
        u = linear(self._Bu, Z[:, self.r_gate:], self.bias)         # (T, n)
        return np.abs(silu(g) * u)

    def gate_first_macs(self):
        """MACs per token of gate-first scoring: the exact gate (n * d) plus the up estimate."""
        ru = self.rank - self.r_gate if self.up is None else self.up[0].shape[0]
        return self.n_neurons * self.dim + ru * (self.dim + self.n_neurons)

    def scores(self, x, gate=None):
        """x (d,) float32 -> (n,) float32 scores (gate (n,): see scores_batch)."""
        g = None if gate is None else np.asarray(gate, np.float32).reshape(1, -1)
        return self.scores_batch(np.asarray(x, dtype=np.float32).reshape(1, -1), gate=g)[0]

    def select(self, x, keep_fraction=None, prior=None, gate=None):
        """Neuron ids (int64) to compute for x (d,), highest score first.

        keep_fraction (or the predictor's own): the top ceil(f * n) neurons by score.
        Neither set: every neuron with score > threshold.
        prior: (n,) float32 last known |h| per neuron, < 0 where unknown; blended into the
        scores with weight prior_weight (see blend_prior).
        gate: (n,) float32 exact gate.x (product kind): gate-first scoring.
        """
        s = self.scores(x, gate=gate)
        if prior is not None and self.prior_weight > 0.0:
            s = blend_prior(s, prior, self.prior_weight)
        f = self.keep_fraction if keep_fraction is None else keep_fraction
        return select_from_scores(s, f, self.threshold)

    def __repr__(self):
        f = "None" if self.keep_fraction is None else f"{self.keep_fraction:.3f}"
        return (f"LowRankPredictor(kind={self.kind!r}, rank={self.rank}, d={self.dim}, n={self.n_neurons}, "
                f"keep_fraction={f}, threshold={self.threshold:.4g}, prior_weight={self.prior_weight:.3g})")


def blend_prior(s, prior, weight):
    """s (n,) scores, prior (n,) last known |h| (< 0: unknown) -> (n,) float32 scores:
    (1 - weight) * s + weight * prior where the prior is known, s elsewhere."""
    known = prior >= 0.0
    return np.where(known, (1.0 - weight) * s + weight * prior, s).astype(np.float32, copy=False)


def n_keep(n, keep_fraction):
    """How many of n neurons a keep fraction selects (at least 1)."""
    return max(1, min(n, int(np.ceil(keep_fraction * n - 1e-9))))


def select_from_scores(s, keep_fraction, threshold=0.0):
    """s (n,) -> int64 ids in decreasing score order (top-k by fraction, or s > threshold)."""
    n = s.shape[0]
    if keep_fraction is None:
        ids = np.flatnonzero(s > threshold)
        return ids[np.argsort(-s[ids], kind="stable")].astype(np.int64)
    k = n_keep(n, keep_fraction)
    if k >= n:
        return np.argsort(-s, kind="stable").astype(np.int64)
    ids = np.argpartition(-s, k - 1)[:k]
    return ids[np.argsort(-s[ids], kind="stable")].astype(np.int64)


def topk_mask(S, keep_fraction):
    """S (T, n) scores -> (T, n) bool mask of each row's top ceil(f * n)."""
    T, n = S.shape
    k = n_keep(n, keep_fraction)
    m = np.zeros((T, n), bool)
    if k >= n:
        m[:] = True
        return m
    idx = np.argpartition(-S, k - 1, axis=1)[:, :k]
    np.put_along_axis(m, idx, True, axis=1)
    return m
