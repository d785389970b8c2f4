"""Fitting low-rank predictors on recorded activations (NumPy, vectorised minibatch Adam).

    pred, history = fit_layer(X, target, W_init, rank)

ReLU FFNs (kind "relu"): `target` is the recorded h (T, n); a neuron fires when it is
non-zero. W_init is the projection whose ReLU decides (the up projection and bias_init its
bias; the gate for gated FFNs with a ReLU-type gate: relu, FATReLU, dReLU): the predictor
starts as a data-aware truncated SVD of it (so its score starts as an estimate of the
pre-activation) and is fitted with a class-balanced logistic loss (per neuron, positives
and negatives weigh the same in total).

Gated FFNs (kind "product"): `target` is the recorded h = silu(gate.x) * (up.x) (T, n);
W_init = (gate (n, d), up (n, d)). The rank is split between a low-rank gate estimate
and a low-rank up estimate, each started from the data-aware truncated SVD of its
projection, then fitted together to reproduce h (mean squared error, normalised):
the squared error weighs large outputs most, which is the mass a missed neuron costs.

"Data-aware" SVD: the rank-r W_r minimising ||X W^T - X W_r^T|| over the recorded
inputs X (the SVD of W C^(1/2), C = X^T X / T), which beats the plain SVD of W by a
wide margin on SmolLM2 (its FFN inputs are far from isotropic).
"""
from __future__ import annotations

import time

import numpy as np

from .lowrank import LowRankPredictor, silu


def input_sqrt_cov(X):
    """C^(1/2) (d, d) float64 of the inputs' second moment C = X.T @ X / T (X (T, d))."""
    X = np.asarray(X, dtype=np.float32)
    C = (X.T @ X).astype(np.float64) / max(1, X.shape[0])            # (d, d)
    ev, V = np.linalg.eigh(C)
    return (V * np.sqrt(np.clip(ev, 0.0, None))) @ V.T


def data_aware_lowrank(X, W, rank, sqrt_cov=None):
    """Rank-`rank` factors (A (r, d), B (n, r)) with X @ A.T @ B.T ~ X @ W.T in least squares.

    X (T, d) float32 inputs, W (n, d). B has orthonormal columns; A = B.T @ W.
    sqrt_cov: input_sqrt_cov(X) when already computed (one per layer serves gate and up).
    """
    W = np.asarray(W, dtype=np.float32)
    n, d = W.shape
    r = int(min(rank, n, d))
    S = input_sqrt_cov(X) if sqrt_cov is None else sqrt_cov         # (d, d) C^(1/2)
    M = W.astype(np.float64) @ S                                      # (n, d)
    ev2, V2 = np.linalg.eigh(M.T @ M)                                 # right singular vectors of M
    order = np.argsort(ev2)[::-1][:r]
    sig = np.sqrt(np.clip(ev2[order], 1e-30, None))
    U = (M @ V2[:, order]) / sig                                      # (n, r) left singular vectors
    B = U.astype(np.float32)
    A = (U.T @ W.astype(np.float64)).astype(np.float32)               # (r, d)
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


class Adam:
    """Adam over a list of float32 arrays, updated in place."""

    def __init__(self, params, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads, lr=None):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr = self.lr if lr is None else lr
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * np.square(g)
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _lr_at(lr, step, n_steps):
    """Cosine decay to 10% of lr."""
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * min(1.0, step / max(1, n_steps)))))


def fit_layer(X, target, W_init, rank, kind=None, bias_init=None, r_gate=None, epochs=8, batch=256,
              lr=2e-3, seed=0, dtype=np.float32, verbose=False, sqrt_cov=None):
    """Fit one layer's predictor. Returns (LowRankPredictor, history: list of mean loss per epoch).

    X (T, d) float32 FFN inputs; target (T, n) recorded per-neuron outputs h.
    W_init: up (n, d) for kind "relu"; (gate (n, d), up (n, d)) for kind "product".
    kind: inferred from W_init when None (a pair -> "product").
    rank: total rank r (product: r_gate = r // 2 for the gate unless given).
    epochs=0 returns the data-aware SVD initialisation unfitted.
    sqrt_cov: input_sqrt_cov(X), when the caller has it.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    Y = np.asarray(target, dtype=np.float32)
    if kind is None:
        kind = "product" if isinstance(W_init, (tuple, list)) else "relu"
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"fit_layer: need X (T, d) and target (T, n), got {X.shape} and {Y.shape}")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    if kind == "relu":
        pred, history = _fit_relu(X, Y, W_init, int(rank), bias_init, epochs, batch, lr, rng, verbose, sqrt_cov)
    elif kind == "product":
        Wg, Wu = W_init
        rg = int(rank) // 2 if r_gate is None else int(r_gate)
        pred, history = _fit_product(X, Y, Wg, Wu, rg, int(rank) - rg, epochs, batch, lr, rng, verbose, sqrt_cov)
    else:
        raise ValueError(f"fit_layer: kind must be 'relu' or 'product', got {kind!r}")
    if dtype != np.float32:
        pred = LowRankPredictor(pred.kind, pred.A.astype(dtype), pred.B.astype(dtype), pred.bias,
                                pred.bias_gate, pred.r_gate, pred.keep_fraction, pred.threshold)
    if verbose:
        print(f"fit_layer {kind} r={rank}: {time.perf_counter() - t0:.1f} s, loss {history}")
    return pred, history


def _minibatch_adam(params, loss_and_grads, T, epochs, batch, lr, rng, verbose, name):
    """Adam over shuffled minibatches of T rows, cosine-decayed lr; updates params in place.

    loss_and_grads(row ids) -> (mean loss over the batch, gradients in params' order).
    Returns the mean loss per epoch.
    """
    opt = Adam(params, lr)
    n_steps = epochs * ((T + batch - 1) // batch)
    history = []
    for _ in range(epochs):
        perm = rng.permutation(T)
        total = 0.0
        for i in range(0, T, batch):
            b = perm[i: i + batch]
            loss, grads = loss_and_grads(b)
            total += loss * len(b)
            opt.step(grads, _lr_at(lr, opt.t, n_steps))
        history.append(total / T)
        if verbose:
            print(f"  {name} epoch {len(history)}: loss {history[-1]:.4f}")
    return history


def _fit_relu(X, H, W, rank, bias_init, epochs, batch, lr, rng, verbose, sqrt_cov=None):
    T, d = X.shape
    n = H.shape[1]
    A, B = data_aware_lowrank(X, W, rank, sqrt_cov)
    c = np.zeros(n, np.float32) if bias_init is None else np.array(bias_init, dtype=np.float32)  # (n,)
    labels = H != 0                                                       # (T, n) fires
    p = labels.mean(axis=0).clip(1.0 / T, 1.0 - 1.0 / T)                  # (n,) firing rate
    w_pos = (0.5 / p).astype(np.float32)                                  # class-balanced weights
    w_neg = (0.5 / (1.0 - p)).astype(np.float32)
    # start as the pre-activation estimate scaled to unit spread (a reasonable logit)
    pre = X[: min(T, 2048)] @ A.T @ B.T + c
    scale = np.float32(1.0 / max(1e-6, float(pre.std())))
    A *= scale
    c *= scale

    def loss_and_grads(b):
        x, y = X[b], labels[b]
        z = x @ A.T                                                       # (m, r)
        s = z @ B.T + c                                                   # (m, n) logits
        q = _sigmoid(s)
        w = np.where(y, w_pos, w_neg)                                     # (m, n)
        loss = float(-(w * np.where(y, np.log(q + 1e-7), np.log(1.0 - q + 1e-7))).mean())
        ds = w * (q - y) / s.size                                         # dL/ds
        return loss, [(ds @ B).T @ x, ds.T @ z, ds.sum(axis=0)]

    history = _minibatch_adam([A, B, c], loss_and_grads, T, epochs, batch, lr, rng, verbose, "relu")
    return LowRankPredictor("relu", A, B, bias=c, threshold=0.0), history


def _fit_product(X, H, Wg, Wu, rg, ru, epochs, batch, lr, rng, verbose, sqrt_cov=None):
    T, d = X.shape
    n = H.shape[1]
    S = input_sqrt_cov(X) if sqrt_cov is None else sqrt_cov
    Ag, Bg = data_aware_lowrank(X, Wg, rg, S)
    Au, Bu = data_aware_lowrank(X, Wu, ru, S)
    bg = np.zeros(n, np.float32)
    bu = np.zeros(n, np.float32)
    inv = np.float32(1.0 / max(1e-30, float(np.mean(np.square(H)))))

    def loss_and_grads(b):
        x, h = X[b], H[b]
        zg = x @ Ag.T                                                     # (m, rg)
        zu = x @ Au.T                                                     # (m, ru)
        g = zg @ Bg.T + bg                                                # (m, n)
        u = zu @ Bu.T + bu                                                # (m, n)
        sg = _sigmoid(g)
        act = g * sg                                                      # silu(g)
        e = act * u - h                                                   # (m, n)
        dh = (2.0 * inv / e.size) * e
        dg = dh * u * (sg * (1.0 + g * (1.0 - sg)))                       # silu'(g)
        du = dh * act
        return (float(np.mean(np.square(e))) * inv,
                [(dg @ Bg).T @ x, dg.T @ zg, dg.sum(axis=0), (du @ Bu).T @ x, du.T @ zu, du.sum(axis=0)])

    history = _minibatch_adam([Ag, Bg, bg, Au, Bu, bu], loss_and_grads, T, epochs, batch, lr, rng, verbose,
                              "product")
    A = np.concatenate([Ag, Au], axis=0)                                  # (rg + ru, d)
    B = np.zeros((n, rg + ru), np.float32)
    B[:, :rg] = Bg
    B[:, rg:] = Bu
    return LowRankPredictor("product", A, B, bias=bu, bias_gate=bg, r_gate=rg), history


def product_loss(pred, X, H):
    """Normalised squared error of a product predictor's h estimate on (X, H) (for tests)."""
    Z = X @ pred.A.T.astype(np.float32)
    B = pred.B.astype(np.float32)
    g = Z[:, : pred.r_gate] @ B[:, : pred.r_gate].T + pred.bias_gate
    u = Z[:, pred.r_gate:] @ B[:, pred.r_gate:].T + pred.bias
    return float(np.mean(np.square(silu(g) * u - H)) / np.mean(np.square(H)))


def fit_up_estimate(X, H, Wg, Wu, rank, epochs=4, batch=256, lr=2e-3, seed=0, verbose=False, sqrt_cov=None):
    """The low-rank up estimate of gate-first scoring: (A_u (r, d), B_u (n, r), bias (n,)), float32.

    Gate-first scoring computes the gate exactly and estimates only up.x, so the estimate is
    fitted (from the data-aware SVD of the up projection) to reproduce h = silu(gate.x) * (up.x)
    with the exact gate: the up error counts in proportion to |silu(gate.x)|, that is where it
    changes which neurons look large. epochs=0: the data-aware SVD alone.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    H = np.asarray(H, dtype=np.float32)
    Au, Bu = data_aware_lowrank(X, Wu, rank, sqrt_cov)
    bu = np.zeros(H.shape[1], np.float32)
    if epochs > 0:
        Wg32 = np.asarray(Wg, np.float32)
        inv = np.float32(1.0 / max(1e-30, float(np.mean(np.square(H)))))

        def loss_and_grads(b):
            x, h = X[b], H[b]
            act = silu(x @ Wg32.T)                                        # (m, n) exact silu(gate.x)
            zu = x @ Au.T                                                 # (m, r)
            e = act * (zu @ Bu.T + bu) - h                                # (m, n)
            du = (2.0 * inv / e.size) * e * act
            return float(np.mean(np.square(e))) * inv, [(du @ Bu).T @ x, du.T @ zu, du.sum(axis=0)]

        _minibatch_adam([Au, Bu, bu], loss_and_grads, X.shape[0], epochs, batch, lr, np.random.default_rng(seed),
                        verbose, "up")
    return Au, Bu, bu
