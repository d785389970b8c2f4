"""Perplexity of flash mode with predictor-selected FFN neurons, vs dense and vs the oracle selection.

    python bench/bench_predictor_quality.py MODEL_DIR --text held_out.txt [--tail-chars 60000] \
        [--tokens 4096] [--ctx 512] [--keep 0.5 0.6] [--window 5] [--prior-weight 0 0.25] \
        [--modes predictor oracle] [--out bench/results/predictor_quality] [--plot]

Every row runs flashrt's real flash path: `flashrt.Generator(MODEL_DIR, mode="flash",
select=..., sparsity=1 - keep, window=...)` scored by `flashrt.perplexity.perplexity`,
which feeds the held-out tokens one at a time through the decode path (selector, sliding
window cache, loader, kernel over the cached rows). MODEL_DIR must hold predictors.npz
(`flashrt calibrate`).

  oracle    : per token the top `keep` fraction of neurons by true |h| (the best any
              predictor can do at that fraction)
  predictor : the stored predictors' top `keep` fraction by score; with --prior-weight a > 0
              the scores of cached neurons are blended with their |h| at the previous token
              (the temporal prior, flashrt.predictor.lowrank.blend_prior)

Columns: selected = neurons the selector named per token and layer, computed = neurons the
kernel ran over (the window's union in the cache), read = neurons read from flash per token,
all as fractions of the FFN. With --plot it also draws perplexity vs fraction selected
(matplotlib, bench-only) to OUT.png.

Held-out text: --tail-chars N scores the last N characters of --text (calibrate on the rest);
--text python-docs scores Python's reference manual (pydoc_data, shipped with CPython), from
token --skip-tokens on. --scoring picks the predictor scoring (product, gate-first; default:
what the Generator's policy picks, see flashrt/policy.py); --memory-budget runs under a
budget and adds decode tokens/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flashrt  # noqa: E402
from common import md_table, perplexity_plot  # noqa: E402
from flashrt.perplexity import perplexity  # noqa: E402
from flashrt.predictor import PredictorSet  # noqa: E402
from flashrt.predictor.calibrate import python_docs_text  # noqa: E402


def with_prior_weight(model_dir: Path, weight: float, tmp: Path) -> Path:
    """A model directory that links MODEL_DIR's files and holds its predictors with `weight` set."""
    if weight == 0.0:
        pset = PredictorSet.load(model_dir)
        if all(p.prior_weight == 0.0 for p in pset):
            return model_dir
    out = tmp / f"prior-{weight:g}"
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "predictors.npz" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    pset = PredictorSet.load(model_dir)
    pset.set_prior_weight(weight)
    pset.save(out)
    return out


def run(model_dir, text, tokens, ctx, scoring=None, **kw) -> dict:
    t = time.perf_counter()
    if scoring is not None:
        kw["scoring"] = scoring
    with flashrt.Generator(model_dir, threads=1, progress=False, **kw) as g:
        r = perplexity(g, text, context=ctx, max_tokens=tokens, progress=False)
    r["seconds"] = time.perf_counter() - t
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", required=True, help="text file; the held-out part is scored")
    ap.add_argument("--tail-chars", type=int, default=0, help="score only the last N characters (0: all)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.6], help="fractions selected per token")
    ap.add_argument("--window", type=int, nargs="+", default=[5])
    ap.add_argument("--prior-weight", type=float, nargs="+", default=[0.0], help="predictor rows only")
    ap.add_argument("--modes", nargs="+", default=["predictor", "oracle"])
    ap.add_argument("--scoring", nargs="+", default=[None], help="predictor rows: product, gate-first")
    ap.add_argument("--skip-tokens", type=int, default=0)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.md (and OUT.png with --plot)")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)

    if args.text == "python-docs":
        text = python_docs_text()
    else:
        text = Path(args.text).read_text(encoding="utf-8")
    if args.tail_chars:
        text = text[-args.tail_chars:]
    if args.skip_tokens:
        from flashrt.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(args.model_dir)
        text = tok.decode(tok.encode(text)[args.skip_tokens:args.skip_tokens + args.tokens + 1])
    base = run(args.model_dir, text, args.tokens, args.ctx, mode="dense")["perplexity"]
    head = (f"{args.model_dir.name}: {args.tokens} held-out tokens ({Path(args.text).name}"
            f"{f', last {args.tail_chars} chars' if args.tail_chars else ''}), ctx {args.ctx}; "
            f"dense perplexity {base:.3f}")
    print(head, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            for mode in args.modes:
                for w in args.window:
                    for a, sc in ([(a, sc) for a in args.prior_weight for sc in args.scoring] if mode == "predictor"
                                  else [(0.0, None)]):
                        md = with_prior_weight(args.model_dir, a, Path(tmp)) if mode == "predictor" else args.model_dir
                        r = run(md, text, args.tokens, args.ctx, mode="flash", select=mode,
                                sparsity=round(1.0 - keep, 6), window=w, scoring=sc,
                                memory_budget=args.memory_budget)
                        label = mode if sc is None else sc
                        row = dict(mode=label, keep=keep, window=w, prior=a, ppl=r["perplexity"],
                                   delta=100.0 * (r["perplexity"] / base - 1.0),
                                   selected=r["neurons_selected_per_token"],
                                   computed=r["neurons_computed_per_token"],
                                   read=r["neurons_read_per_token"], seconds=r["seconds"])
                        rows.append(row)
                        print(f"{mode:9s} keep {keep:.2f} window {w} prior {a:<5g} ppl {row['ppl']:8.3f} "
                              f"({row['delta']:+6.1f}%)  selected {row['selected']:.3f} computed "
                              f"{row['computed']:.3f} read {row['read']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table = md_table(["selection", "kept/token", "window", "prior", "perplexity", "vs dense", "selected",
                          "computed", "read"],
                         [(r["mode"], f"{r['keep']:.2f}", r["window"], f"{r['prior']:g}", f"{r['ppl']:.2f}",
                           f"{r['delta']:+.1f}%", f"{r['selected']:.3f}", f"{r['computed']:.3f}", f"{r['read']:.3f}")
                          for r in rows])
        args.out.with_suffix(".md").write_text(f"# Predictor quality, flash path\n\n{head}\n\n{table}\n")
        if args.plot:
            groups = sorted({(r["mode"], r["window"], r["prior"]) for r in rows})
            curves = [(f"{m}, window {w}" + (f", prior {a:g}" if a else ""), "o-" if m == "predictor" else "s--", 1.0,
                       [(r["selected"], r["ppl"]) for r in rows if (r["mode"], r["window"], r["prior"]) == (m, w, a)])
                      for m, w, a in groups]
            if not perplexity_plot(curves, base, head, args.out.with_suffix(".png")):
                print("matplotlib is not installed (pip install matplotlib): no plot")


if __name__ == "__main__":
    main()
