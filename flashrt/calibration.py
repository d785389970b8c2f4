"""Calibration's driver: record activations with the dense forward pass, fit each layer's
predictor (flashrt.predictor), store predictors.npz.

    report = calibrate("models/smollm2", texts=None, n_tokens=2048, sparsity=0.5)
    print(report.summary())

With no texts the calibration text is sampled from the model itself (temperature 1).

RecordingFFN wraps the dense FFN and records, during a forward pass, each layer's FFN
input x and every neuron's output h (the calibration data for the predictors):

    rec = RecordingFFN(dense_ffn, token_fraction=0.5, seed=0)
    model.forward(ids, kv)                          # records while computing as usual
    X, H = rec.arrays(layer)                        # (T, d), (T, n) float32

The wrapped FFN must accept `h_out=` (flashrt.ffn.dense.DenseFFN does) and fill it with
the (T, n) per-neuron outputs: gated h = act(gate.x) * (up.x); ReLU h = act(up.x + b).
The same token subset is recorded at every layer of one forward call (drawn at layer 0),
so rows line up across layers. Stored as float16 by default to halve the memory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .api import load_model
from .errors import FlashrtError, ModelFormatError
from .ffn.base import RELU_KINDS
from .ffn.dense import DenseFFN
from .format.reader import ModelFiles
from .predictor.calibrate import (MIN_CALIBRATION_TOKENS, SECOND_DOMAIN, fit_predictors, python_docs_text,
                                  resolve_ranks)
from .predictor.quality import DEFAULT_SHARES, dense_perplexity, measure_quality_curve
from .tokenizer import Tokenizer


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



def measure_ffn_sparsity(model_dir, n_tokens=64, n_threads=None):
    """The share of FFN neurons whose output h is exactly zero, per layer, over n_tokens of
    Python's reference manual (shipped with CPython; token ids 3, 4, ... when the model has
    no tokenizer or the manual is absent), computed with the dense FFN (every layer's bundles
    are read into DRAM). Returns {"tokens", "zero_fraction" (the mean), "per_layer"}."""
    files = ModelFiles.open(model_dir)
    model = load_model(files, lambda spec, w: RecordingFFN(DenseFFN.from_files(files, spec, n_threads),
                                                           max_tokens=n_tokens, dtype=np.float32), n_threads)
    n_tokens = int(min(n_tokens, files.config.get("max_position_embeddings") or n_tokens))
    ids = None
    text = python_docs_text()
    if files.tokenizer_dir is not None and text:
        ids = Tokenizer.from_dir(files.tokenizer_dir).encode(text[20000:20000 + 16 * n_tokens])[:n_tokens]
    if ids is None or len(ids) < n_tokens:
        ids = 3 + np.arange(n_tokens) % max(1, int(files.config["vocab_size"]) - 3)
    ids = np.asarray(ids, dtype=np.int64)
    model.forward(ids, model.make_cache(len(ids)))
    per_layer = [float(np.mean(model.ffn.arrays(l)[1] == 0.0)) for l in range(files.n_layers)]
    return {"tokens": int(len(ids)), "zero_fraction": float(np.mean(per_layer)), "per_layer": per_layer}

def check_writable(model_dir) -> None:
    """Fail now, not after minutes of recording and fitting, when predictors.npz (and the
    manifest that records it) cannot be written into model_dir."""
    probe = Path(model_dir) / f".predictors.npz.probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise FlashrtError(f"{model_dir}: cannot write the predictors there ({e.strerror}); calibrate a "
                           f"copy in a writable directory (flashrt convert ... OUT) or fix its permissions") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def _record_second_domain(model, files, second_text, n_tokens, ctx):
    """(name, X per layer, H per layer, ids) recorded on n_tokens of the second domain's text, or None."""
    if second_text is None or files.tokenizer_dir is None:
        return None
    name, text = (("Python's reference manual", python_docs_text()) if second_text == SECOND_DOMAIN
                  else ("the second text", str(second_text)))
    if not text:
        return None
    n_tokens = max(2, int(n_tokens))
    text = text[:64 * n_tokens]                                  # the head is all it uses (a token is ~4 chars)
    ids = np.array(Tokenizer.from_dir(files.tokenizer_dir).encode(text)[:n_tokens], np.int64)
    rec = model.ffn
    rec.max_tokens = ids.size
    for i in range(0, ids.size, ctx):
        model.forward(ids[i:i + ctx], model.make_cache(len(ids[i:i + ctx])))
    out = (name, *zip(*(rec.arrays(l, dtype=rec.dtype) for l in range(files.n_layers))), ids)
    rec.clear()
    return out


def _quality_curves(model, dense, pset, report, held, keep, window, ctx, shares, what):
    """Measure and store the quality curves (product and gate-first scoring) on the held-out ids."""
    down, gates = LayerParts(dense, "down"), LayerParts(dense, "gate")   # (n, d) float32 per layer
    recorder = model.ffn

    def make_forward(ffn):
        def forward(chunk):
            model.ffn = ffn
            try:
                return model.forward(chunk, model.make_cache(len(chunk)))
            finally:
                model.ffn = recorder
        return forward

    base = dense_perplexity(make_forward, dense, down, held, ctx)          # one dense pass serves both curves
    curve = measure_quality_curve(make_forward, dense, down, lambda l, x, h: pset[l].scores_batch(x), held,
                                  keep, window, ctx, shares, what, base)
    pset.info["quality_curve"] = curve.to_dict()
    report.quality_curve = curve
    if pset.has_up_estimates:
        curve_g = measure_quality_curve(make_forward, dense, down,
                                        lambda l, x, h: pset[l].scores_batch(x, gate=x @ gates[l].T), held,
                                        keep, window, ctx, shares, what + ", gate-first", base)
        pset.info["quality_curve_gate_first"] = curve_g.to_dict()
        report.quality_curve_gate_first = curve_g


class LayerParts:
    """One FFN part of every layer, float32 (n_neurons, d) on access: `parts[l]` (see
    DenseFFN.part_f32; "down" rows are the neurons' down columns). Made per access, the last
    one kept: every layer at once would be a float32 copy of a third of the FFN."""

    def __init__(self, dense, part):
        self.dense, self.part = dense, part
        self._last = (None, None)

    def __len__(self):
        return self.dense.n_layers

    def __getitem__(self, layer):
        if self._last[0] != layer:
            self._last = (layer, self.dense.part_f32(layer, self.part))
        return self._last[1]


class FitWeights:
    """fit_predictors' weights per layer, float32: gated (gate (n, d), up (n, d), down (d, n)),
    ReLU (up (n, d), up_bias, down (d, n)). Float bundles give views; quantized bundles are
    dequantized per access (the bundle rows are blocks of bytes, not weights)."""

    def __init__(self, dense):
        self.dense = dense
        self._parts = {p: LayerParts(dense, p) for p in dense.parts}

    def __len__(self):
        return self.dense.n_layers

    def __getitem__(self, layer):
        dense, d = self.dense, self.dense.dim
        if dense.qtype is None:
            B = dense.bundles[layer]
            if dense.gated:
                return B[:, :d], B[:, d:2 * d], B[:, 2 * d:].T
            return B[:, :d], dense.up_bias[layer], B[:, d:].T
        down = self._parts["down"][layer].T
        if dense.gated:
            return self._parts["gate"][layer], self._parts["up"][layer], down
        return self._parts["up"][layer], dense.up_bias[layer], down


def _sample_token(logits, rng, temperature=1.0):
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def calibrate(model_dir, texts=None, n_tokens=2048, sparsity=0.5, rank=None, progress=True, ctx=512,
              epochs=8, target_recall=0.95, allocate=False, dtype="float16", seed=0, save=True,
              n_threads=None, prior_weight=0.0, second_text=SECOND_DOMAIN, n_second=256, curve_tokens=128,
              curve_shares=DEFAULT_SHARES, window=5):
    """Record activations with the dense forward pass, fit, allocate, save predictors.npz.

    model_dir: a flashrt model directory. texts: list of strings (or one string) to run
    through the model; None samples n_tokens of text from the model itself (temperature 1,
    sequences of `ctx` tokens started from BOS), which records the decode distribution.
    sparsity: model-wide fraction of neurons skipped per token (gated models).
    rank: int, per-layer list, or None (default_ranks: under 5% of the dense FFN MACs in total).
    dtype: storage dtype of the factors ("float16" halves the file; scoring is float32).
    prior_weight: temporal prior weight stored with the predictors (0: off; see lowrank.py).
    second_text: a text of another domain, never fitted on, to report recall on (n_second
    tokens of it); the default is Python's own reference manual (pydoc_data, shipped with
    CPython), None for none.
    curve_tokens, curve_shares, window: the quality curve (gated models): perplexity ratio to
    dense on the first curve_tokens tokens of the second domain (else of the held-out
    calibration tokens) for each neuron-cache share, with the product predictor and with
    gate-first scoring, at 1 - sparsity selected and this window (flashrt.predictor.quality;
    one teacher-forced pass per point; curve_tokens=0 skips it). Stored with the predictors.
    Returns the CalibrationReport (report.summary() prints the per-layer table).
    """
    if not 0.0 <= sparsity < 1.0:
        raise FlashrtError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < MIN_CALIBRATION_TOKENS:
        raise FlashrtError(f"calibration needs at least {MIN_CALIBRATION_TOKENS} tokens, got {n_tokens!r}")
    t0 = time.perf_counter()
    files = ModelFiles.open(model_dir)
    if save:
        check_writable(files.path)
    config = files.config
    L, d = files.n_layers, files.dim
    model = load_model(files, lambda spec, w: RecordingFFN(DenseFFN.from_files(files, spec, n_threads),
                                                           max_tokens=n_tokens), n_threads)
    rec = model.ffn
    dense = rec.inner
    resolve_ranks(rank, dense.gated, L, d, files.n_neurons)   # bad ranks fail before the slow recording
    ctx = int(min(ctx, config.get("max_position_embeddings", ctx)))
    rng = np.random.default_rng(seed)
    if texts is not None:
        if files.tokenizer_dir is None:
            raise ModelFormatError(f"{model_dir}: calibration texts were given but the model has no "
                                   f"tokenizer; pass texts=None to sample calibration text from the model")
        tok = Tokenizer.from_dir(files.tokenizer_dir)
        if isinstance(texts, str):
            texts = [texts]
        ids = np.array([i for t in texts for i in tok.encode(t)], dtype=np.int64)
        if ids.size < MIN_CALIBRATION_TOKENS:
            raise FlashrtError(f"the calibration text holds {ids.size} tokens; calibration needs at least "
                               f"{MIN_CALIBRATION_TOKENS} (more than 1000 are best)")
        chunks = [ids[i: i + ctx] for i in range(0, min(ids.size, n_tokens), ctx)]
        bar = tqdm(total=len(chunks), desc="record", unit="chunk", disable=not progress)
        for c in chunks:
            model.forward(c, model.make_cache(len(c)))
            bar.update(1)
        bar.close()
        source = {"kind": "text", "n_texts": len(texts)}
    else:
        bos = config.get("bos_token_id")
        bos = int(bos[0] if isinstance(bos, list) else bos) if bos is not None else 0
        bar = tqdm(total=n_tokens, desc="sample + record", unit="tok", disable=not progress)
        fed = []
        while rec.n_recorded(0) < n_tokens:
            kv = model.make_cache(ctx)
            tok_id = bos
            for _ in range(min(ctx, n_tokens - rec.n_recorded(0))):
                fed.append(tok_id)
                logits = model.forward(np.array([tok_id]), kv)
                tok_id = _sample_token(logits[-1], rng)
                bar.update(1)
        bar.close()
        source = {"kind": "sampled", "temperature": 1.0}
        ids = np.array(fed, dtype=np.int64)
    t_record = time.perf_counter() - t0
    X_layers, H_layers = [], []
    for l in range(L):
        X, H = rec.arrays(l, dtype=rec.dtype)                  # float16: fitted layer by layer in float32
        X_layers.append(X)
        H_layers.append(H)
    rec.clear()
    second = _record_second_domain(model, files, second_text, n_second, ctx)
    relu_gate = dense.gated and dense.act in RELU_KINDS   # exact zeros: fire / no-fire predictors, as for OPT
    pset, report = fit_predictors(X_layers, H_layers, FitWeights(dense), dense.gated, sparsity=sparsity, rank=rank,
                                  target_recall=target_recall, epochs=epochs, allocate=allocate,
                                  dtype=np.dtype(dtype), progress=progress, seed=seed, prior_weight=prior_weight,
                                  meta={"source": source, "ctx": ctx, "record_seconds": t_record}, second=second,
                                  relu_gate=relu_gate)
    if dense.gated and not relu_gate and curve_tokens:
        # the curve's text: the second domain's (real prose the fit never saw), else the held-out calibration tokens
        held, what = ((second[3], second[0]) if second is not None and second[3].size >= 2 else
                      (ids[:X_layers[0].shape[0]][report.n_fit:], f"held-out {source['kind']} text"))
        held = held[:int(curve_tokens)]
        if held.size >= 2:
            _quality_curves(model, dense, pset, report, held, 1.0 - sparsity, window, ctx, curve_shares, what)
    report.seconds = time.perf_counter() - t0
    if save:
        report.path = str(pset.save(model_dir))
    return report

