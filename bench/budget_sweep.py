"""Tokens/s and peak memory across memory budgets, each run inside its own memory cgroup whose
limit is the budget plus the interpreter's baseline (bench/memcg.py: page cache counts; the
model's files are dropped from the page cache before every run).

    python bench/budget_sweep.py MODEL_DIR --budgets 194MB 220MB 260MB 300MB --tokens 32 --repeats 3
    python bench/budget_sweep.py MODEL_DIR --fractions 0.5 0.75 1.0     # of resident + FFN bytes

Prints one row per budget: median decode tokens/s over the repeats, peak RSS above the
pre-open baseline (VmHWM - VmRSS before opening), the cgroup's peak charge above its
baseline, how often the limit was hit (failcnt: the kernel reclaimed to make room) and major
faults (pgmajfault: evicted pages read back, i.e. thrashing). Runs alternate budgets within
each repeat, so that machine noise spreads over all of them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memcg  # noqa: E402


def main(argv=None):
    from flashrt.budget import fmt_bytes, parse_size
    from flashrt.format import ModelFiles

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="*", default=[])
    ap.add_argument("--fractions", nargs="*", type=float, default=[])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--select", default="default", help="all | oracle | predictor | default (the model's)")
    ap.add_argument("--json", default=None, help="also write the raw runs here")
    args = ap.parse_args(argv)
    budgets = [parse_size(b) for b in args.budgets]
    if args.fractions:
        with ModelFiles.open(args.model) as f:
            size = f.resident_bytes + f.ffn_bytes
        budgets += [int(x * size) for x in args.fractions]
    if not budgets:
        ap.error("give --budgets and/or --fractions")
    try:
        memcg.MemCgroup().remove()
    except (OSError, RuntimeError) as e:
        sys.exit(f"budget_sweep: no writable memory cgroup here ({e})")

    runs = {b: [] for b in budgets}
    for rep in range(args.repeats):
        for b in budgets:
            r = memcg.run_generation(args.model, b, n_tokens=args.tokens, select=args.select)
            runs[b].append(r)
            status = "ok" if r["returncode"] == 0 else f"exit {r['returncode']}: {r['stderr'].strip().splitlines()[-1:]}"
            print(f"  repeat {rep + 1} budget {fmt_bytes(b)}: {r.get('tokens_per_second')} tok/s, {status}",
                  file=sys.stderr)

    print(f"model {args.model}, {args.tokens} tokens, select={args.select}, cgroup v{runs[budgets[0]][0]['cgroup_version']}, "
          f"{args.repeats} repeats (medians)")
    print("| budget | tok/s | peak RSS - baseline | cgroup peak - baseline | failcnt | pgmajfault | ok |")
    print("|---|---|---|---|---|---|---|")
    for b in budgets:
        ok = [r for r in runs[b] if r["returncode"] == 0 and "tokens_per_second" in r]
        if not ok:
            print(f"| {fmt_bytes(b)} | - | - | - | - | - | 0/{len(runs[b])} |")
            continue
        med = lambda xs: statistics.median(xs)  # noqa: E731
        tps = med([r["tokens_per_second"] for r in ok])
        rss = med([r["peak_rss"] - r["rss_baseline"] for r in ok])
        cg = [r["max_usage"] - r["baseline"] for r in ok if r.get("max_usage") is not None]
        print(f"| {fmt_bytes(b)} | {tps:.2f} | {fmt_bytes(rss)} | {fmt_bytes(med(cg)) if cg else 'n/a'} | "
              f"{med([r['failcnt'] for r in ok]):.0f} | {med([r['pgmajfault'] for r in ok]):.0f} | "
              f"{len(ok)}/{len(runs[b])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(b): runs[b] for b in budgets}, indent=1))


if __name__ == "__main__":
    main()
