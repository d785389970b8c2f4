"""Calibration's model-free core: fit each layer's predictor on recorded activations,
allocate per-layer keep fractions under one model-wide target, report their quality.

    pset, report = fit_predictors(X_layers, H_layers, weights, gated, sparsity=0.5)

The driver that records those activations with the dense forward pass and saves
predictors.npz is flashrt.calibration.calibrate (it runs the model; this module never does).

Gated FFNs: a neuron "counts" when |h| = |silu(gate.x) * (up.x)| exceeds the layer's
magnitude threshold, calibrated so that the layer keeps its share of neurons; the
predictor estimates |h| and the runtime keeps the top keep_fraction of neurons by score.
With allocate=True the per-layer keep fractions are allocated greedily by measured FFN
output error (as TEAL does): each step gives one more grid step of neurons to the layer
whose relative output error drops most, until the mean keep fraction reaches
1 - sparsity. It is off by default: on SmolLM2-135M this allocation (error relative to
each FFN's own output) made perplexity worse than a uniform keep fraction (79 vs 54 at
50% kept, no window), because that error says nothing of how much the residual stream,
and so the loss, feels a layer's error.

ReLU FFNs, and gated FFNs whose gate is ReLU-type (relu, FATReLU, dReLU: relu_gate=True):
a neuron fires when its h is non-zero (exactly zero otherwise); the fire / no-fire
predictor (kind "relu", started from the gate for gated FFNs) gets a score threshold set
on held-out tokens to reach `target_recall`, and the report gives recall, precision and
false-positive rate.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from ..errors import FlashrtError
from .fit import fit_layer, fit_up_estimate, input_sqrt_cov
from .lowrank import LowRankPredictor, default_ranks, ffn_macs, n_keep, topk_mask
from .store import PredictorSet

GRID = np.round(np.arange(0.1, 1.0001, 0.05), 4)   # keep fractions the allocator moves between


# -- error curves and allocation ------------------------------------------------------------
def output_error_curve(scores, H, W_down, grid=GRID, max_tokens=1024):
    """Relative squared FFN output error ||(H * ~keep) @ down.T||^2 / ||H @ down.T||^2 per keep fraction.

    keep = each token's top fraction by score. scores (T, n), H (T, n) recorded h,
    W_down (d, n) (HF layout). Uses at most max_tokens tokens. Returns (len(grid),) float64.
    """
    H = np.asarray(H[:max_tokens], np.float32)
    scores = np.asarray(scores[:max_tokens])
    Wd = np.asarray(W_down, np.float32)
    ref = float(np.sum(np.square(H @ Wd.T))) or 1.0
    T, n = H.shape
    order = np.argsort(-scores, axis=1)                                  # (T, n) best first
    position = np.empty((T, n), np.int32)                                # rank of each neuron
    np.put_along_axis(position, order, np.arange(n, dtype=np.int32)[None, :].repeat(T, 0), axis=1)
    out = np.empty(len(grid))
    for j, f in enumerate(grid):
        k = n_keep(n, f)
        E = np.where(position >= k, H, 0.0).astype(np.float32) @ Wd.T    # (T, d) dropped output
        out[j] = float(np.sum(np.square(E))) / ref
    return out


def allocate_keep_fractions(curves, target_keep, grid=GRID, floor=None):
    """Per-layer keep fractions with mean target_keep, minimising the summed error (greedy).

    curves: (L, len(grid)) error per layer and keep fraction (non-increasing in the fraction).
    floor: lowest fraction any layer gets (default: target_keep / 2).
    """
    curves = np.asarray(curves, np.float64)
    L = curves.shape[0]
    grid = np.asarray(grid)
    floor = target_keep / 2 if floor is None else floor
    idx = np.full(L, int(np.searchsorted(grid, floor - 1e-9)))
    idx = np.minimum(idx, len(grid) - 1)
    if grid[idx[0]] >= target_keep:
        return np.full(L, float(target_keep))
    last = None
    while grid[idx].mean() < target_keep - 1e-9:
        gains = np.full(L, -np.inf)
        ok = idx < len(grid) - 1
        gains[ok] = (curves[ok, idx[ok]] - curves[ok, idx[ok] + 1]) / (grid[idx[ok] + 1] - grid[idx[ok]])
        best = int(np.argmax(gains))
        if not np.isfinite(gains[best]):
            break
        idx[best] += 1
        last = best
    f = grid[idx].astype(np.float64)
    if last is not None and f.mean() > target_keep:
        f[last] -= (f.mean() - target_keep) * L          # the last step overshot: take back the excess
    return f


# -- per-layer quality figures ------------------------------------------------------------------
def gated_layer_report(scores, H, keep_fraction, W_down=None):
    """Figures for one gated layer on held-out tokens at its keep fraction.

    The true set: neurons whose |h| exceeds the layer's magnitude threshold (the quantile of
    |h| leaving keep_fraction of all (token, neuron) pairs above it). The predicted set: each
    token's top keep_fraction by score.
    """
    A = np.abs(H)
    thr = float(np.quantile(A, 1.0 - keep_fraction))
    true = A > thr
    pred = topk_mask(scores, keep_fraction)
    oracle = topk_mask(A, keep_fraction)
    tp = float((true & pred).sum())
    rep = {
        "keep_fraction": float(keep_fraction),
        "predicted_fraction": float(pred.mean()),
        "true_fraction": float(true.mean()),
        "mag_threshold": thr,
        "recall": tp / max(1.0, float(true.sum())),
        "precision": tp / max(1.0, float(pred.sum())),
        "topk_recall": float((oracle & pred).sum()) / max(1.0, float(oracle.sum())),
        "mass_captured": float((A * pred).sum() / max(1e-30, A.sum())),
        "oracle_mass_captured": float((A * oracle).sum() / max(1e-30, A.sum())),
    }
    if W_down is not None:
        Wd = np.asarray(W_down, np.float32)
        Y = H @ Wd.T
        ref = float(np.linalg.norm(Y)) or 1.0
        rep["output_rel_err"] = float(np.linalg.norm((H * ~pred) @ Wd.T)) / ref
        rep["oracle_output_rel_err"] = float(np.linalg.norm((H * ~oracle) @ Wd.T)) / ref
    return rep


def relu_threshold_for_recall(scores, fires, target_recall):
    """The largest score threshold t with recall(scores > t) >= target_recall."""
    pos = np.sort(scores[fires])
    if pos.size == 0:
        return 0.0
    k = int(np.floor((1.0 - target_recall) * pos.size))   # positives allowed below t
    k = min(max(k, 0), pos.size - 1)
    return float(np.nextafter(pos[k], -np.inf))


def relu_layer_report(scores, fires, threshold):
    pred = scores > threshold
    tp = float((pred & fires).sum())
    n_neg = float((~fires).sum())
    return {
        "threshold": float(threshold),
        "predicted_fraction": float(pred.mean()),
        "true_fraction": float(fires.mean()),
        "recall": tp / max(1.0, float(fires.sum())),
        "precision": tp / max(1.0, float(pred.sum())),
        "fp_rate": float((pred & ~fires).sum()) / max(1.0, n_neg),
    }


# -- the whole model ----------------------------------------------------------------------------
@dataclasses.dataclass
class CalibrationReport:
    kind: str
    sparsity: float
    n_tokens: int
    n_fit: int
    n_val: int
    ranks: list
    layers: list                      # per-layer dicts (recall, precision, predicted_fraction, ...)
    seconds: float
    predictor_macs: int = 0           # per token, all layers
    ffn_macs: int = 0                 # per token, all layers
    path: str | None = None
    second_domain: str | None = None  # the text of another domain the recall is also reported on
    quality_curve: object = None      # QualityCurve measured after the fit (calibrate), or None
    quality_curve_gate_first: object = None   # the same with gate-first scoring

    def summary(self):
        lines = [f"predictors ({self.kind}), sparsity target {self.sparsity:.2f}, {self.n_fit} fit + "
                 f"{self.n_val} held-out tokens, {self.seconds:.0f} s; cost "
                 f"{100.0 * self.predictor_macs / max(1, self.ffn_macs):.1f}% of the dense FFN MACs"]
        nan = float("nan")
        if self.kind == "product":
            if self.second_domain:
                lines.append(f"top-k recall on held-out tokens and on {self.second_domain} (not fitted on); "
                             "gate-first = exact gate x low-rank up")
            lines.append("layer rank  keep  topk_rec  gate-first | 2nd: topk_rec gate-first |  mass(oracle)  "
                         "out_err(oracle)")
            for i, r in enumerate(self.layers):
                lines.append(f"{i:5d} {self.ranks[i]:4d} {r['keep_fraction']:.3f}  {r['topk_recall']:.3f}     "
                             f"{r.get('gate_first_topk_recall', nan):.3f}      |      "
                             f"{r.get('second_topk_recall', nan):.3f}    "
                             f"{r.get('second_gate_first_topk_recall', nan):.3f}"
                             f"     |  {r['mass_captured']:.3f}({r['oracle_mass_captured']:.3f})  "
                             f"{r.get('output_rel_err', nan):.3f}({r.get('oracle_output_rel_err', nan):.3f})")
        else:
            lines.append("layer rank  recall precision fp_rate  predicted true" +
                         (f" | {self.second_domain}: recall fp_rate" if self.second_domain else ""))
            for i, r in enumerate(self.layers):
                lines.append(f"{i:5d} {self.ranks[i]:4d}  {r['recall']:.3f}  {r['precision']:.3f}    "
                             f"{r['fp_rate']:.3f}    {r['predicted_fraction']:.3f}   {r['true_fraction']:.3f}" +
                             (f" |   {r.get('second_recall', nan):.3f}  {r.get('second_fp_rate', nan):.3f}"
                              if self.second_domain else ""))
        for c in (self.quality_curve, self.quality_curve_gate_first):
            if c is not None:
                lines.append(c.summary())
        if self.path:
            lines.append(f"saved {self.path}")
        return "\n".join(lines)


MIN_CALIBRATION_TOKENS = 8
SECOND_DOMAIN = "python-docs"   # calibrate()'s default second domain: Python's reference manual


def python_docs_text():
    """Python's reference manual as plain text (pydoc_data.topics, shipped with CPython), or ''."""
    try:
        from pydoc_data.topics import topics    # optional: some distributions strip pydoc_data
    except ImportError:
        return ""
    return "\n\n".join(topics[k] for k in sorted(topics))


def _second_domain(second_text):
    """(name, text) of the second domain: SECOND_DOMAIN, or the caller's text."""
    if second_text == SECOND_DOMAIN:
        return "Python's reference manual", python_docs_text()
    return "the second text", str(second_text)


def resolve_ranks(rank, gated, n_layers, dim, n_neurons):
    """Per-layer ranks from `rank` (None: default_ranks; an int; a per-layer list), checked:
    a product predictor needs rank >= 2 (gate and up share it), and no rank exceeds min(d, n)."""
    if rank is None:
        return default_ranks(gated, n_layers, dim, n_neurons)
    ranks = list(rank) if isinstance(rank, (list, tuple, np.ndarray)) else [rank] * n_layers
    if len(ranks) != n_layers:
        raise FlashrtError(f"{len(ranks)} predictor ranks given for a model with {n_layers} layers")
    lo, hi = (2 if gated else 1), min(int(dim), int(n_neurons))
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not lo <= r <= hi:
            raise FlashrtError(f"predictor rank must be an integer from {lo} to {hi} (min of the model's width "
                               f"{dim} and FFN size {n_neurons}), got {r!r}")
    return [int(r) for r in ranks]


def fit_predictors(X_layers, H_layers, weights, gated, sparsity=0.5, rank=None, val_fraction=0.2,
                   target_recall=0.95, epochs=8, allocate=False, dtype=np.float32, progress=False, seed=0,
                   meta=None, prior_weight=0.0, second=None, up_estimates=True, relu_gate=False):
    """Fit, allocate and report on recorded activations (the model-free core of `calibrate`).

    X_layers: per layer (T, d) FFN inputs; H_layers: per layer (T, n) recorded h.
    weights: per layer (gate (n, d), up (n, d), down (d, n)) if gated else (up (n, d), up_bias|None, down (d, n)).
    rank: int, per-layer list, or None (default_ranks: under 5% of the dense FFN MACs in total,
    front-loaded for gated models).
    prior_weight: weight of the temporal prior in flash decode (LowRankPredictor.prior_weight; 0: off).
    second: (name, X_layers, H_layers) of a second domain the fit never sees; the report gives
    the top-k recall there too (gated) or recall and false-positive rate (ReLU).
    up_estimates: gated models also get the separate up estimate of gate-first scoring (the
    data-aware SVD of up at the layer's rank, fit_up_estimate epochs=0: fitting it to the
    calibration text did not transfer better to other text).
    relu_gate: a gated FFN whose neurons are exactly zero where a ReLU-type gate cuts them
    (FFNSpec.relu_sparse): fire / no-fire predictors (kind "relu") started from the gate,
    thresholded for target_recall, as for ReLU FFNs; `sparsity` does not apply.
    Returns (PredictorSet, CalibrationReport).
    """
    product = gated and not relu_gate
    t0 = time.perf_counter()
    L = len(X_layers)
    d = X_layers[0].shape[1]
    n = H_layers[0].shape[1]
    ranks = resolve_ranks(rank, gated, L, d, n)
    T = X_layers[0].shape[0]
    n_val = max(1, int(round(T * val_fraction))) if T > 1 else 0
    n_fit = T - n_val
    preds, val_scores = [], []
    bar = tqdm(total=L, desc="fit predictors", unit="layer", disable=not progress)
    for l in range(L):
        X = np.asarray(X_layers[l], np.float32)
        H = np.asarray(H_layers[l], np.float32)
        if product:
            Wg, Wu, _ = weights[l]
            S = input_sqrt_cov(X[:n_fit])                          # shared by the gate, up and up-estimate fits
            p, _hist = fit_layer(X[:n_fit], H[:n_fit], (Wg, Wu), ranks[l], kind="product", epochs=epochs,
                                 seed=seed + l, sqrt_cov=S)
            if up_estimates:
                p = LowRankPredictor(p.kind, p.A, p.B, p.bias, p.bias_gate, p.r_gate,
                                     up=fit_up_estimate(X[:n_fit], H[:n_fit], Wg, Wu, ranks[l], epochs=0, sqrt_cov=S))
        else:
            Wu, bu, _ = weights[l]        # gated: (gate, up, down); the gate decides
            p, _hist = fit_layer(X[:n_fit], H[:n_fit], Wu, ranks[l], kind="relu", bias_init=None if gated else bu,
                                 epochs=epochs, seed=seed + l)
        preds.append(p)
        val_scores.append(p.scores_batch(X[n_fit:]))
        bar.update(1)
    bar.close()
    # held-out tokens: the first half sets keep fractions / thresholds, the second half is reported
    n_cal = max(1, n_val // 2) if n_val >= 2 else n_val
    cal, rep_ = slice(0, n_cal), slice(n_cal if n_val >= 2 else 0, n_val)
    H_val = [np.asarray(H_layers[l][n_fit:], np.float32) for l in range(L)]
    layers = []
    if product:
        target_keep = 1.0 - sparsity
        if allocate and L > 1:
            curves = np.stack([output_error_curve(val_scores[l][cal], H_val[l][cal], weights[l][2])
                               for l in range(L)])
            keep = allocate_keep_fractions(curves, target_keep)
        else:
            keep = np.full(L, target_keep)
        for l in range(L):
            s = val_scores[l]
            preds[l].keep_fraction = float(keep[l])
            preds[l].threshold = float(np.quantile(s[cal], 1.0 - keep[l]))
            rep = gated_layer_report(s[rep_], H_val[l][rep_], keep[l], weights[l][2])
            rep["score_threshold"] = preds[l].threshold
            Xr = np.asarray(X_layers[l][n_fit:], np.float32)[rep_]
            if preds[l].up is not None:
                rep["gate_first_topk_recall"] = topk_recall(preds[l].scores_batch(Xr, gate=Xr @ np.asarray(
                    weights[l][0], np.float32).T), H_val[l][rep_], keep[l])
            if second is not None:
                X2 = np.asarray(second[1][l], np.float32)
                H2 = np.asarray(second[2][l], np.float32)
                rep["second_topk_recall"] = topk_recall(preds[l].scores_batch(X2), H2, keep[l])
                if preds[l].up is not None:
                    rep["second_gate_first_topk_recall"] = topk_recall(
                        preds[l].scores_batch(X2, gate=X2 @ np.asarray(weights[l][0], np.float32).T), H2, keep[l])
            layers.append(rep)
    else:
        for l in range(L):
            fires = H_val[l] != 0
            t = relu_threshold_for_recall(val_scores[l][cal], fires[cal], target_recall)
            preds[l].threshold = t
            preds[l].keep_fraction = None
            rep = relu_layer_report(val_scores[l][rep_], fires[rep_], t)
            if second is not None:
                X2 = np.asarray(second[1][l], np.float32)
                r2 = relu_layer_report(preds[l].scores_batch(X2), np.asarray(second[2][l], np.float32) != 0, t)
                rep["second_recall"], rep["second_fp_rate"] = r2["recall"], r2["fp_rate"]
            layers.append(rep)
    if dtype != np.float32:
        preds = [_cast(p, dtype) for p in preds]
    kind = "product" if product else "relu"
    info = {"sparsity": float(sparsity), "n_tokens": int(T), "n_fit": int(n_fit), "n_val": int(n_val),
            "epochs": int(epochs), "target_recall": float(target_recall), "layers": layers}
    if second is not None:
        info["second_domain"] = str(second[0])
    if meta:
        info.update(meta)
    pset = PredictorSet(preds, info=info)
    pset.set_prior_weight(prior_weight)
    report = CalibrationReport(kind, float(sparsity), int(T), n_fit, n_val, ranks, layers,
                               time.perf_counter() - t0, second_domain=None if second is None else str(second[0]),
                               predictor_macs=sum(p.macs for p in preds), ffn_macs=L * ffn_macs(gated, d, n))
    return pset, report


def _cast(p, dtype):
    up = None if p.up is None else (p.up[0].astype(dtype), p.up[1].astype(dtype), p.up[2])
    return LowRankPredictor(p.kind, p.A.astype(dtype), p.B.astype(dtype), p.bias, p.bias_gate, p.r_gate,
                            p.keep_fraction, p.threshold, up=up)


def topk_recall(scores, H, keep_fraction):
    """Share of each token's true top keep_fraction (by |h|) that the scores' top keep_fraction finds."""
    oracle = topk_mask(np.abs(H), keep_fraction)
    return float((oracle & topk_mask(scores, keep_fraction)).sum()) / max(1.0, float(oracle.sum()))


