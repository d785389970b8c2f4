"""Perplexity with predictor-selected FFN neurons vs dense and vs the oracle selection.

    python bench/bench_predictor_quality.py MODEL_DIR --text held_out.txt \
        [--tokens 4096] [--ctx 512] [--keep 0.5 0.6] [--window 1 4] [--skip-tokens N]

MODEL_DIR must hold predictors.npz (`flashrt calibrate`). For every keep fraction and
window it runs flashrt's own NumPy forward pass (teacher-forced, chunks of `ctx`) with an
FFN that keeps, per token, only the neurons the selection names:
  oracle    : the top keep fraction of |h| (the true outputs: the best any predictor can do)
  predictor : the stored predictors' top keep fraction by score, the per-layer keep
              fractions rescaled so their mean is `keep`
and, with window k > 1, also every neuron selected for any of the previous k - 1 tokens
(the flash runtime computes all neurons its sliding-window cache holds). It prints the
perplexity, its change vs dense, the selected fraction and the computed fraction.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashrt.ffn_dense import DenseFFN  # noqa: E402
from flashrt.format.reader import ModelFiles  # noqa: E402
from flashrt.linear import linear  # noqa: E402
from flashrt.models import build_model  # noqa: E402
from flashrt.predictor import PredictorSet, topk_mask  # noqa: E402
from flashrt.tokenizer import Tokenizer  # noqa: E402


def window_union(mask, k):
    """mask (T, n) bool -> each row OR the k - 1 rows before it (within the chunk)."""
    out = mask.copy()
    for s in range(1, k):
        out[s:] |= mask[:-s]
    return out


class SelectedFFN:
    """Dense FFN whose dropped neurons' contributions are subtracted: y = sum over kept of h_i down_i."""

    def __init__(self, dense, mode, keep, pset=None, window=1):
        self.dense, self.mode, self.window, self.pset = dense, mode, window, pset
        L = dense.n_layers
        if mode == "predictor":
            f = np.array(pset.keep_fractions(), dtype=np.float64)
            self.keep = np.clip(f * (keep / f.mean()), 0.01, 1.0)
        else:
            self.keep = np.full(L, keep)
        d = dense.dim
        P = dense.n_parts
        self.down = [np.ascontiguousarray(B[:, (P - 1) * d:], dtype=np.float32) for B in dense.bundles]  # (n, d)
        self.selected = []
        self.computed = []

    def __call__(self, layer, x):
        T, n = x.shape[0], self.dense.n_neurons(layer)
        h = np.empty((T, n), np.float32)
        y = self.dense(layer, x, h_out=h)
        if self.mode == "dense":
            return y
        s = np.abs(h) if self.mode == "oracle" else self.pset[layer].scores_batch(x)
        sel = topk_mask(s, self.keep[layer])
        comp = window_union(sel, self.window) if self.window > 1 else sel
        self.selected.append(sel.mean())
        self.computed.append(comp.mean())
        y -= np.where(comp, 0.0, h).astype(np.float32) @ self.down[layer]
        return y


def perplexity(files, weights, ffn, ids, ctx):
    model = build_model(files.architecture, files.config, weights, ffn, linear)
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        chunk = ids[i: i + ctx]
        if len(chunk) < 2:
            break
        logits = model.forward(chunk, model.make_cache(len(chunk)))            # (T, vocab)
        logits = logits[:-1].astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--skip-tokens", type=int, default=0, help="start this many tokens into the text")
    ap.add_argument("--from-end", action="store_true", help="take the last --tokens tokens of the text")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.6])
    ap.add_argument("--window", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", default=["oracle", "predictor"])
    args = ap.parse_args(argv)

    files = ModelFiles.open(args.model_dir)
    weights = files.load_resident()
    dense = DenseFFN.from_files(files, weights)
    pset = PredictorSet.load(args.model_dir, dim=files.dim, n_neurons=files.n_neurons, n_layers=files.n_layers)
    tok = Tokenizer.from_dir(files.tokenizer_dir)
    ids = np.array(tok.encode(open(args.text, encoding="utf-8").read()), dtype=np.int64)
    ids = ids[-args.tokens:] if args.from_end else ids[args.skip_tokens: args.skip_tokens + args.tokens]
    print(f"{args.model_dir}: {len(ids)} tokens, ctx {args.ctx}, predictors {pset}")
    t = time.perf_counter()
    base = perplexity(files, weights, SelectedFFN(dense, "dense", 1.0), ids, args.ctx)
    print(f"dense                         ppl {base:8.3f}            ({time.perf_counter() - t:.0f} s)")
    for keep in args.keep:
        for mode in args.modes:
            for w in args.window:
                t = time.perf_counter()
                ffn = SelectedFFN(dense, mode, keep, pset, w)
                p = perplexity(files, weights, ffn, ids, args.ctx)
                print(f"{mode:9s} keep {keep:.2f} window {w}  ppl {p:8.3f} ({100 * (p / base - 1):+6.1f}%)  "
                      f"selected {np.mean(ffn.selected):.3f} computed {np.mean(ffn.computed):.3f}  "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
