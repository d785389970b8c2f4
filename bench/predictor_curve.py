"""Perplexity vs fraction of FFN neurons selected, predictor against oracle: the whole curve, fast.

    python bench/predictor_curve.py MODEL_DIR --text held_out.txt [--tail-chars 60000] \
        [--tokens 4096] [--ctx 512] [--keep 0.3 0.4 0.5 0.6 0.8] [--window 1 5] \
        [--out bench/results/predictor_curve]

A teacher-forced replica of flash mode (flashrt.predictor.quality.CacheReplicaFFN), so that a
20-point curve takes minutes rather than the hour the real decode path would: every context
chunk runs as one batched dense forward pass, and in each layer the FFN output is corrected
to what flash mode computes: the neurons in the cache (the union of the last `window`
selections, capped at --cache-share of the layer with the NeuronCache's LRU eviction) plus
any selected neuron the cache had no room for. Because the model is causal this gives the
same logits as feeding the tokens one at a time; tests/test_bench_quick.py holds it to the
real path on the tiny Llama.

  oracle     : per token the top `keep` fraction of neurons by true |h|
  predictor  : the top `keep` fraction by the stored predictors' score (predictors.npz)
  gate-first : the top `keep` fraction by |silu(gate.x) * u_hat|, the exact gate times the
               stored up estimate (Generator(scoring="gate-first"))

--text python-docs scores Python's reference manual (pydoc_data, shipped with CPython), a
domain calibration does not see; --skip-tokens N starts N tokens in.

Columns: selected, computed (cache + overflow), read (neurons entering the cache per token,
plus the overflow), as fractions of the FFN per token and layer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import md_table, perplexity_plot  # noqa: E402
from flashrt.api import model_args  # noqa: E402
from flashrt.calibration import LayerParts  # noqa: E402
from flashrt.ffn.dense import DenseFFN  # noqa: E402
from flashrt.format.reader import ModelFiles  # noqa: E402
from flashrt.linear import linear  # noqa: E402
from flashrt.models import build_model  # noqa: E402
from flashrt.predictor import PredictorSet  # noqa: E402
from flashrt.predictor.calibrate import python_docs_text, topk_recall  # noqa: E402
from flashrt.predictor.quality import CacheReplicaFFN  # noqa: E402
from flashrt.tokenizer import Tokenizer  # noqa: E402


def scorer_for(mode, pset, dense):
    """The replica's scorer: the stored predictors (product or gate-first), None for the oracle."""
    if mode == "oracle":
        return None
    if mode == "gate-first":
        gates = LayerParts(dense, "gate")                     # (n, d) float32 per layer (dequantized)
        return lambda layer, x, h: pset[layer].scores_batch(x, gate=x @ gates[layer].T)
    return lambda layer, x, h: pset[layer].scores_batch(x)


def rank_summary(pset):
    """'256 x1, 84 x4, 48 x25' in layer order."""
    runs = []
    for p in pset:
        if runs and runs[-1][0] == p.rank:
            runs[-1][1] += 1
        else:
            runs.append([p.rank, 1])
    return ", ".join(f"{r} x{c}" for r, c in runs)


def perplexity(files, weights, ffn, ids, ctx):
    model = build_model(files.architecture, files.config, weights, ffn,
                        lambda W, x, bias=None: linear(W, x, bias, n_threads=1))
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        chunk = ids[i:i + ctx]
        if len(chunk) < 2:
            break
        logits = model.forward(chunk, model.make_cache(len(chunk)))[:-1].astype(np.float64)   # (c-1, vocab)
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tail-chars", type=int, default=0, help="score only the last N characters (0: all)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.8])
    ap.add_argument("--window", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--modes", nargs="+", default=["predictor", "oracle"],
                    choices=["predictor", "gate-first", "oracle"])
    ap.add_argument("--cache-share", type=float, nargs="+", default=[1.0],
                    help="neuron cache per layer as a share of its neurons (the budget's effect)")
    ap.add_argument("--skip-tokens", type=int, default=0)
    ap.add_argument("--recall", type=float, default=None, metavar="KEEP",
                    help="also report each layer's top-k recall at this fraction kept (on the dense pass)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png (with matplotlib)")
    args = ap.parse_args(argv)

    files = ModelFiles.open(args.model_dir)
    weights = files.load_resident()
    family, margs = model_args(files)
    dense = DenseFFN.from_files(files, family.ffn_spec(margs, weights), n_threads=1)
    down = LayerParts(dense, "down")                          # (n, d) float32 per layer (dequantized)
    pset = PredictorSet.load(args.model_dir) if set(args.modes) - {"oracle"} else None
    text = python_docs_text() if args.text == "python-docs" else Path(args.text).read_text(encoding="utf-8")
    if args.tail_chars:
        text = text[-args.tail_chars:]
    ids = np.array(Tokenizer.from_dir(files.tokenizer_dir).encode(text), dtype=np.int64)
    ids = ids[args.skip_tokens:args.skip_tokens + args.tokens]
    base_ffn = CacheReplicaFFN(dense, down, None, 1.0, 1, mode="dense")
    recall = None
    if args.recall and pset is not None:
        base_ffn = RecallFFN(base_ffn, {m: scorer_for(m, pset, dense) for m in args.modes if m != "oracle"},
                             args.recall)
        recall = base_ffn.recall
    base = perplexity(files, weights, base_ffn, ids, args.ctx)
    head = (f"{args.model_dir.name}: {len(ids)} held-out tokens ({Path(args.text).name}"
            f"{f', from token {args.skip_tokens}' if args.skip_tokens else ''}"
            f"{f', last {args.tail_chars} chars' if args.tail_chars else ''}), ctx {args.ctx}; "
            f"dense perplexity {base:.3f}" + (f"; predictor ranks {rank_summary(pset)}" if pset else ""))
    print(head, flush=True)
    rows = []
    n = dense.n_neurons(0)
    for share in args.cache_share:
        for keep in args.keep:
            for mode in args.modes:
                for w in args.window:
                    t = time.perf_counter()
                    ffn = CacheReplicaFFN(dense, down, scorer_for(mode, pset, dense), keep, w,
                                          capacity=max(1, int(round(share * n))),
                                          mode="oracle" if mode == "oracle" else "predictor")
                    p = perplexity(files, weights, ffn, ids, args.ctx)
                    row = dict(mode=mode, keep=keep, window=w, cache_share=share, ppl=p,
                               delta=100.0 * (p / base - 1.0), computed=ffn.computed_fraction,
                               read=ffn.read_fraction)
                    rows.append(row)
                    print(f"{mode:10s} cache {share:.2f} keep {keep:.2f} window {w}  ppl {p:8.3f} "
                          f"({row['delta']:+6.1f}%)  computed {row['computed']:.3f} read {row['read']:.3f}  "
                          f"({time.perf_counter() - t:.0f} s)", flush=True)
    if recall:
        print(recall_table(recall, args.recall), flush=True)
    if args.out is not None:
        write(args.out, head, base, rows, recall and recall_table(recall, args.recall))


class RecallFFN:
    """The dense replica, also summing per layer and scorer the top-k recall (the share of each
    token's true top `keep` by |h| that the scorer's top `keep` finds), weighted by tokens."""

    def __init__(self, inner, scorers, keep):
        self.inner, self.scorers, self.keep = inner, scorers, keep
        self.recall = {m: {} for m in scorers}               # mode -> layer -> [sum, tokens]

    def n_neurons(self, layer):
        return self.inner.n_neurons(layer)

    def __call__(self, layer, x):
        h = np.empty((x.shape[0], self.inner.n_neurons(layer)), np.float32)
        y = self.inner.dense(layer, x, h_out=h)
        for m, scorer in self.scorers.items():
            acc = self.recall[m].setdefault(layer, [0.0, 0])
            acc[0] += topk_recall(scorer(layer, x, h), h, self.keep) * x.shape[0]
            acc[1] += x.shape[0]
        return y


def recall_table(recall, keep):
    modes = list(recall)
    layers = sorted(next(iter(recall.values())))
    rows = [[l] + [f"{recall[m][l][0] / recall[m][l][1]:.3f}" for m in modes] for l in layers]
    rows.append(["min"] + [f"{min(recall[m][l][0] / recall[m][l][1] for l in layers):.3f}" for m in modes])
    return f"Top-k recall at {keep:.0%} kept, per layer:\n\n" + md_table(["layer"] + modes, rows)


def write(out, head, base, rows, recall=None):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"head": head, "dense": base, "rows": rows}, indent=1))
    table = md_table(["selection", "cache share", "selected/token", "window", "perplexity", "vs dense", "computed",
                      "read"],
                     [(r["mode"], f"{r.get('cache_share', 1.0):.2f}", f"{r['keep']:.2f}", r["window"],
                       f"{r['ppl']:.2f}", f"{r['delta']:+.1f}%", f"{r['computed']:.3f}", f"{r['read']:.3f}")
                      for r in sorted(rows, key=lambda r: (-r.get("cache_share", 1.0), r["keep"], r["mode"],
                                                           r["window"]))])
    out.with_suffix(".md").write_text(
        f"# Perplexity vs neurons selected (teacher-forced replica of flash mode)\n\n{head}\n\n{table}\n"
        + (f"\n{recall}\n" if recall else ""))
    full = [r for r in rows if r.get("cache_share", 1.0) == 1.0]
    groups = sorted({(r["mode"], r["window"]) for r in full}, key=lambda g: (-g[1], g[0]))
    curves = [(f"{m}, window {w}", "s--" if m == "oracle" else ("o-" if m == "predictor" else "^-"),
               1.0 if w > 1 else 0.5,
               [(r["keep"], r["ppl"]) for r in full if (r["mode"], r["window"]) == (m, w)]) for m, w in groups]
    if not perplexity_plot(curves, base, head, out.with_suffix(".png"), targets=[(0.5, 1.06), (0.6, 1.03)]):
        print(f"matplotlib is not installed: wrote {out.with_suffix('.md')} without the plot")


if __name__ == "__main__":
    main()
