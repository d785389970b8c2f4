"""Budget sweep of a mixture of experts from flash: decode tokens/s and expert hit rate against the
memory limit of the whole process (a memory cgroup), from bench_moe.py's JSON lines.

    python bench/bench_moe.py flashrt /work/wt/moe2-bench/qwen3moe --sweep 3GB 4GB 5GB 6GB 8GB \\
        --tokens 24 --prompt 4 --out bench/results/moe_sweep_qwen3-30b-a3b.jsonl
    python bench/figure_moe_sweep.py "Qwen3-30B-A3B shape=bench/results/moe_sweep_qwen3-30b-a3b.jsonl" \\
        "Mixtral-8x7B shape=bench/results/moe_sweep_mixtral-8x7b.jsonl"

Each series is LABEL=FILE; runs at the same limit (and prefetch setting) are reduced to their median.
Writes bench/results/figure_moe_sweep.{md,png} (matplotlib is a bench-only dependency).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path):
    """{(limit bytes, prefetch): [run, ...]} of the successful flashrt runs in a JSON-lines file."""
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("engine") != "flashrt" or r.get("returncode") != 0 or "ffn" not in r:
            continue
        out.setdefault((r["limit"], bool(r.get("prefetch", False))), []).append(r)
    return out


def summary(runs):
    med = lambda key: statistics.median(key(r) for r in runs)  # noqa: E731
    return {"runs": len(runs), "tok_s": med(lambda r: r["tokens_per_second"]),
            "hit": med(lambda r: r["ffn"]["expert_hit_rate"]),
            "cached": med(lambda r: r["cache_experts"]),
            "read_mb": med(lambda r: r["ffn"]["bytes_read_per_token"] / 1e6),
            "io_ms": med(lambda r: r["ffn"]["ms_io_per_token"]),
            "compute_ms": med(lambda r: r["ffn"]["ms_compute_per_token"]),
            "peak_gb": med(lambda r: r["max_usage"] / 1e9),
            "failcnt": max(r["failcnt"] for r in runs), "oom": max(r["oom_kill"] for r in runs),
            "load": med(lambda r: r.get("loadavg", float("nan")))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="+", help="LABEL=FILE.jsonl")
    ap.add_argument("--out", type=Path, default=RESULTS / "figure_moe_sweep")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the md (repeatable)")
    a = ap.parse_args()
    series = []
    for s in a.series:
        label, path = s.split("=", 1)
        series.append((label, {k: summary(v) for k, v in sorted(load(path).items())}, path))
    lines = ["# Expert caches against the memory limit", "",
             "Decode tokens/s and expert hit rate of flashrt (experts on flash, per-layer expert caches sized by the",
             "budget planner) in a memory cgroup whose limit is the whole process's; medians over the runs at each",
             "limit (`bench/bench_moe.py`, `bench/figure_moe_sweep.py`).", ""]
    for note in a.note:
        lines += [note, ""]
    for label, rows, path in series:
        lines += [f"## {label} (`{path}`)", "",
                  "| limit | prefetch | runs | experts cached / layer | tok/s | hit rate | read / token | ms I/O, compute / token | peak | reclaims, OOM | loadavg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (limit, pf), r in rows.items():
            lines.append(f"| {limit / 1e9:g} GB | {'on' if pf else 'off'} | {r['runs']} | {r['cached']:.0f} | "
                         f"{r['tok_s']:.3f} | {r['hit']:.3f} | {r['read_mb']:.0f} MB | {r['io_ms']:.0f}, "
                         f"{r['compute_ms']:.0f} | {r['peak_gb']:.2f} GB | {r['failcnt']}, {r['oom']} | {r['load']:.1f} |")
        lines.append("")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines += ["matplotlib not installed (pip install matplotlib): no PNG."]
    else:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
        for label, rows, _ in series:
            for pf in (False, True):
                pts = sorted((k[0] / 1e9, r) for k, r in rows.items() if k[1] == pf)
                if not pts:
                    continue
                name = label + (" + prefetch" if pf else "")
                x = [p[0] for p in pts]
                a1.plot(x, [p[1]["tok_s"] for p in pts], "o-" if not pf else "s", label=name)
                if not pf:  # with prefetch, experts read ahead count as hits: not the cache's own rate
                    a2.plot(x, [p[1]["hit"] for p in pts], "o-", label=name)
                    a3.plot(x, [p[1]["read_mb"] for p in pts], "o-", label=name)
        xl = "memory limit of the whole process (GB)"
        a1.set(xlabel=xl, ylabel="decode tokens/s", title="speed (shared 2-core machine)", ylim=(0, None))
        a2.set(xlabel=xl, ylabel="expert hit rate", title="expert caches", ylim=(0, 1))
        a3.set(xlabel=xl, ylabel="MB read from flash per token", title="reads", ylim=(0, None))
        for ax in (a1, a2, a3):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = a.out.with_suffix(".png")
        fig.savefig(png, dpi=110)
        lines += [f"![sweep]({png.name})", ""]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(a.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
