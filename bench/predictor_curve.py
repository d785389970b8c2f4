"""Perplexity vs fraction of FFN neurons selected, predictor against oracle: the whole curve, fast.

    python bench/predictor_curve.py MODEL_DIR --text held_out.txt [--tail-chars 60000] \
        [--tokens 4096] [--ctx 512] [--keep 0.3 0.4 0.5 0.6 0.8] [--window 1 5] \
        [--out bench/results/predictor_curve]

A teacher-forced replica of flash mode, so that a 20-point curve takes minutes rather than
the hour the real decode path would: every context chunk runs as one batched dense forward
pass, and in each layer the FFN output is corrected to what flash mode computes, that is
with only the neurons in the window (the union of the last `window` selections, all of them
computed, as in flashrt.ffn.flash) contributing. Because the model is causal this gives the
same logits as feeding the tokens one at a time; bench_predictor_quality.py runs the real
path and agrees to 4 digits on the rows both measure (see bench/results/predictor_quality.md).

  oracle    : per token the top `keep` fraction of neurons by true |h|
  predictor : the top `keep` fraction by the stored predictors' score (predictors.npz)

Columns: selected, computed (the window's union), read (neurons entering the window per
token), as fractions of the FFN per token and layer.
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
from flashrt.ffn.dense import DenseFFN  # noqa: E402
from flashrt.format.reader import ModelFiles  # noqa: E402
from flashrt.linear import linear  # noqa: E402
from flashrt.models import build_model  # noqa: E402
from flashrt.predictor import PredictorSet  # noqa: E402
from flashrt.predictor.lowrank import n_keep  # noqa: E402
from flashrt.tokenizer import Tokenizer  # noqa: E402


class WindowedFFN:
    """Dense FFN whose output keeps only the neurons flash mode would have computed."""

    def __init__(self, dense, down, mode, keep, window, pset=None):
        self.dense, self.down, self.mode, self.keep, self.window, self.pset = dense, down, mode, keep, window, pset
        self.n_cells = self.n_computed = self.n_read = 0            # over all calls: token-neuron cells

    def __call__(self, layer, x):                                  # x (T, d) -> (T, d)
        T, n = x.shape[0], self.dense.n_neurons(layer)
        h = np.empty((T, n), np.float32)                           # (T, n) the FFN's hidden activations
        y = self.dense(layer, x, h_out=h)
        if self.mode == "dense":
            return y
        scores = np.abs(h) if self.mode == "oracle" else self.pset[layer].scores_batch(x)   # (T, n)
        k = n_keep(n, self.keep)
        last = np.full(n, -10 ** 9)                                # token at which each neuron was last selected
        computed = np.zeros((T, n), bool)
        n_read = 0
        for t in range(T):
            last[np.argpartition(-scores[t], k - 1)[:k]] = t
            computed[t] = last > t - self.window
            if t < T - 1:     # stats skip the chunk's last token: its logits score nothing, decode never feeds it
                n_read += int((computed[t] & ~computed[t - 1]).sum()) if t else int(computed[t].sum())
        self.n_cells += (T - 1) * n
        self.n_computed += int(computed[:-1].sum())
        self.n_read += n_read
        y -= np.where(computed, 0.0, h).astype(np.float32) @ self.down[layer]   # drop what was not computed
        return y


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
    ap.add_argument("--modes", nargs="+", default=["predictor", "oracle"])
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png (with matplotlib)")
    args = ap.parse_args(argv)

    files = ModelFiles.open(args.model_dir)
    weights = files.load_resident()
    family, margs = model_args(files)
    dense = DenseFFN.from_files(files, family.ffn_spec(margs, weights), n_threads=1)
    d = dense.dim
    down = [np.ascontiguousarray(b[:, 2 * d:], dtype=np.float32) for b in dense.bundles]   # (n, d) per layer
    pset = PredictorSet.load(args.model_dir) if "predictor" in args.modes else None
    text = Path(args.text).read_text(encoding="utf-8")
    if args.tail_chars:
        text = text[-args.tail_chars:]
    ids = np.array(Tokenizer.from_dir(files.tokenizer_dir).encode(text), dtype=np.int64)[:args.tokens]
    base = perplexity(files, weights, WindowedFFN(dense, down, "dense", 1.0, 1), ids, args.ctx)
    head = (f"{args.model_dir.name}: {len(ids)} held-out tokens ({Path(args.text).name}"
            f"{f', last {args.tail_chars} chars' if args.tail_chars else ''}), ctx {args.ctx}; "
            f"dense perplexity {base:.3f}" + (f"; predictor ranks {rank_summary(pset)}" if pset else ""))
    print(head, flush=True)
    rows = []
    for keep in args.keep:
        for mode in args.modes:
            for w in args.window:
                t = time.perf_counter()
                ffn = WindowedFFN(dense, down, mode, keep, w, pset)
                p = perplexity(files, weights, ffn, ids, args.ctx)
                row = dict(mode=mode, keep=keep, window=w, ppl=p, delta=100.0 * (p / base - 1.0),
                           computed=ffn.n_computed / ffn.n_cells, read=ffn.n_read / ffn.n_cells)
                rows.append(row)
                print(f"{mode:9s} keep {keep:.2f} window {w}  ppl {p:8.3f} ({row['delta']:+6.1f}%)  computed "
                      f"{row['computed']:.3f} read {row['read']:.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.out is not None:
        write(args.out, head, base, rows)


def write(out, head, base, rows):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"head": head, "dense": base, "rows": rows}, indent=1))
    table = md_table(["selection", "selected/token", "window", "perplexity", "vs dense", "computed", "read"],
                     [(r["mode"], f"{r['keep']:.2f}", r["window"], f"{r['ppl']:.2f}", f"{r['delta']:+.1f}%",
                       f"{r['computed']:.3f}", f"{r['read']:.3f}")
                      for r in sorted(rows, key=lambda r: (r["keep"], r["mode"], r["window"]))])
    out.with_suffix(".md").write_text(
        f"# Perplexity vs neurons selected (teacher-forced replica of flash mode)\n\n{head}\n\n{table}\n")
    groups = sorted({(r["mode"], r["window"]) for r in rows}, key=lambda g: (-g[1], g[0]))
    curves = [(f"{m}, window {w}", "o-" if m == "predictor" else "s--", 1.0 if w > 1 else 0.5,
               [(r["keep"], r["ppl"]) for r in rows if (r["mode"], r["window"]) == (m, w)]) for m, w in groups]
    if not perplexity_plot(curves, base, head, out.with_suffix(".png"), targets=[(0.5, 1.06), (0.6, 1.03)]):
        print(f"matplotlib is not installed: wrote {out.with_suffix('.md')} without the plot")


if __name__ == "__main__":
    main()
