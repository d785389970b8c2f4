"""What flash mode picks at each memory budget, and its decode speed against select="all".

    python bench/bench_budget_policy.py MODEL_DIR --budgets 250MB 300MB 330MB none \
        [--tokens 48] [--repeat 3] [--out bench/results/budget_policy]

For each budget: the Generator's default policy (flashrt/policy.py: predictors with
the scoring the stored quality curve favours where it measured them within +5%, else every
neuron), the cache share, the perplexity ratio the curve expects, whether it warned, and the
decode tokens/s of a greedy generation (median of --repeat runs) next to select="all" at the
same budget, in the same process, alternating. With --forced, also select="predictor" asked for
explicitly (what the policy avoids where it picks "all"), alternating with the other two. With
--ppl-tokens N, also the perplexity of the policy's Generator (and of the forced one) on N tokens
of --text (the decode path, one token at a time) against dense, every run at context --ctx.
The load average is printed before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import flashrt  # noqa: E402
from common import md_table  # noqa: E402
from flashrt.perplexity import perplexity  # noqa: E402
from flashrt.predictor.calibrate import python_docs_text  # noqa: E402

PROMPT = "The history of the lighthouse begins"


def tok_s(model_dir, budget, tokens, threads, text=None, ppl_tokens=0, ctx=None, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with flashrt.Generator(model_dir, mode="flash", memory_budget=budget, threads=threads, progress=False,
                               max_context=ctx, **kw) as g:
            g.generate(PROMPT, max_new_tokens=tokens)
            rate = g.stats.decode_tokens_per_second
            ppl = (perplexity(g, text, context=ctx, max_tokens=ppl_tokens, progress=False)["perplexity"]
                   if ppl_tokens else None)
            pol = getattr(g, "policy", None)
            info = dict(select=g.select, share=g.plan.cache_share,
                        gate_first=bool(pol and pol.gate_first),
                        expected=None if pol is None or pol.expected_ratio is None else pol.expected_ratio)
    info["warned"] = any("perplexity" in str(w.message) for w in caught)
    info["ppl"] = ppl
    return rate, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budgets", nargs="+", default=["none"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default=None, help="with --ppl-tokens: the text scored (python-docs: the manual)")
    ap.add_argument("--skip-tokens", type=int, default=20000)
    ap.add_argument("--ppl-tokens", type=int, default=0,
                    help="also the policy's perplexity on this many tokens of --text (decode path, context --ctx)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--forced", action="store_true", help="also select='predictor' asked for explicitly")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    text, dense = None, None
    if args.ppl_tokens:
        text = python_docs_text() if args.text == "python-docs" else Path(args.text).read_text(encoding="utf-8")
        from flashrt.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(args.model_dir)
        text = tok.decode(tok.encode(text)[args.skip_tokens:args.skip_tokens + args.ppl_tokens + 1])
        with flashrt.Generator(args.model_dir, mode="dense", threads=args.threads, progress=False,
                               max_context=args.ctx) as g:
            dense = perplexity(g, text, context=args.ctx, max_tokens=args.ppl_tokens, progress=False)["perplexity"]
        print(f"dense perplexity {dense:.3f} on {args.ppl_tokens} tokens", flush=True)
    rows = []
    for b in args.budgets:
        budget = None if b == "none" else b
        auto, ref, forced, info, finfo, ppl, fppl = [], [], [], None, None, None, None
        for _ in range(args.repeat):
            ctx = args.ctx if args.ppl_tokens else None          # one context for every run: one plan
            r, info = tok_s(args.model_dir, budget, args.tokens, args.threads, text,
                            args.ppl_tokens if not auto else 0, ctx)
            ppl = info["ppl"] if not auto else ppl
            auto.append(r)
            ref.append(tok_s(args.model_dir, budget, args.tokens, args.threads, ctx=ctx, select="all")[0])
            if args.forced:
                try:
                    r, fi = tok_s(args.model_dir, budget, args.tokens, args.threads, text,
                                  args.ppl_tokens if not forced else 0, ctx, select="predictor")
                except flashrt.FlashrtError as e:            # the predictors do not fit this budget
                    finfo = {"error": str(e).split(";")[0]}
                    break
                fppl = fi["ppl"] if not forced else fppl
                finfo = fi
                forced.append(r)
        a, s = float(np.median(auto)), float(np.median(ref))
        scoring = "-" if info["select"] != "predictor" else ("gate-first" if info["gate_first"] else "product")
        exp = "-" if info["expected"] is None else f"{100 * (info['expected'] - 1):+.1f}%"
        row = [b, info["select"], scoring, f"{info['share']:.2f}", exp, "yes" if info["warned"] else "no",
               "-" if ppl is None else f"{ppl:.2f} ({100 * (ppl / dense - 1):+.1f}%)",
               f"{a:.1f}", f"{s:.1f}", f"{a / s:.2f}"]
        if args.forced:
            if forced:
                f = float(np.median(forced))
                row += [f"{'gate-first' if finfo['gate_first'] else 'product'} {finfo['share']:.2f}",
                        "-" if fppl is None else f"{fppl:.2f} ({100 * (fppl / dense - 1):+.1f}%)",
                        f"{f:.1f} ({f / s:.2f}x)"]
            else:
                row += ["does not fit", "-", "-"]
        rows.append(tuple(row))
        print(" | ".join(map(str, rows[-1])), flush=True)
    table = md_table(["budget", "policy", "scoring", "cache share", "expected perplexity", "warned",
                      "perplexity (vs dense)", "tok/s (policy)", "tok/s (select=all)", "ratio"]
                     + (["forced predictor: scoring, cache share", "its perplexity", "its tok/s (vs all)"]
                        if args.forced else []), rows)
    load1 = os.getloadavg()
    head = (f"{args.model_dir.name}, greedy decode of {args.tokens} tokens, {args.threads} thread(s), "
            f"median of {args.repeat} (alternating runs), {time.strftime('%Y-%m-%d %H:%M')}, load average "
            f"{load0[0]:.1f} before, {load1[0]:.1f} after"
            + (f"; perplexity on {args.ppl_tokens} tokens of {args.text} from token {args.skip_tokens}, context "
               f"{args.ctx} (dense {dense:.3f})" if args.ppl_tokens else ""))
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"# Flash-mode policy per memory budget\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
