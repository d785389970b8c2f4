"""A model bigger than the memory it runs in (issue 14): flash-mode generation inside a memory
cgroup (v1 memory.limit_in_bytes or v2 memory.max; page cache counts) whose limit is the
interpreter's baseline + the budget, for models at least 2x that limit. Per row: the model's
size, the cgroup limit, model / limit, the cgroup's peak usage, its reclaim counters (failcnt:
charges that hit the limit and had to reclaim first; pgmajfault: faults that read from disk)
and the decode speed. The model's files are evicted from the page cache first (bench/memcg.py).

    python bench/bench_memlimit.py --model DIR --share 0.5 [--model DIR2 --share 0.45 ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import memcg  # noqa: E402
from common import header, md_table, model_bytes, write_result  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--share", action="append", type=float, help="budget as a share of the model (per --model)")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    common.RESULTS_DIR = Path(args.results)
    shares = args.share or [0.5] * len(args.model)
    rows, raw = [], []
    for path, share in zip(args.model, shares):
        mb = model_bytes(path)
        budget = int(share * mb["total"])
        r = memcg.run_generation(path, budget, args.tokens, prompt="w1 w2 w3 w4 w5 w6 w7 w8", timeout=args.timeout)
        raw.append(r)
        limit = r.get("limit")
        ok = r["returncode"] == 0 and "tokens" in r
        tps = r.get("tokens_per_second") or 0.0
        rows.append([Path(path).name, f"{mb['total'] / 1e9:.2f}", f"{budget / 1e9:.2f}",
                     f"{limit / 1e9:.2f}" if limit else "-", f"{mb['total'] / limit:.2f}" if limit else "-",
                     f"{r['max_usage'] / 1e9:.2f}" if r.get("max_usage") else "-",
                     r["failcnt"], r["pgmajfault"], r["oom_kill"],
                     f"{tps:.2f}" if ok else f"failed (rc {r['returncode']})",
                     f"{1e3 / tps:.0f}" if ok and tps else "-", r.get("cache_rows", "-")])
        print(rows[-1], flush=True)
        if not ok:
            print(r["stderr"][-1500:], flush=True)
    text = header("Models bigger than their memory cgroup: flash mode inside the limit",
                  dict(models=args.model, shares=shares, tokens=args.tokens,
                       limit="interpreter baseline + budget, set by the child after its imports (bench/memcg.py)"))
    table = md_table(["model", "model GB", "budget GB", "cgroup limit GB", "model / limit", "cgroup peak GB",
                      "failcnt (reclaims at the limit)", "pgmajfault", "oom_kill", "decode tok/s", "ms / token",
                      "cache rows / layer"], rows)
    out = "\n".join([text, "", table, ""])
    print(out)
    write_result("memlimit.md", out)


if __name__ == "__main__":
    main()
