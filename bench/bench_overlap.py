"""Decode at the speed of the slower of flash and compute (issue 14): flash mode with its reads
overlapped (the default) against the serial path (read, then compute), against
max(I/O ms, compute ms) of the same run, dense (everything in DRAM, where it fits) and naive,
at a share of the model in DRAM (default 50%).

Per flash row: ms/token; I/O in flight (ms_io: the loader's time with reads outstanding) and
I/O waited (ms_io_wait: the time the token was blocked on them); compute = total - waited -
cache; the neurons computed while reads were in flight. Serial and overlapped runs share one
Generator (the switch is FlashFFN.overlap) and alternate per repeat; medians (min-max).

    python bench/bench_overlap.py --model DIR          # a converted model directory
    python bench/bench_overlap.py --shape opt-1.3b     # the synthetic shape (made if absent)
    python bench/bench_overlap.py --quick --shape tiny
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (decode_run, drop_page_cache, ensure_synthetic, fmt_ms, header, md_table,  # noqa: E402
                    mem_available, model_bytes, open_flash_at_share, summarize, synthetic_prompt, write_result)


def row_figures(rs):
    tot = summarize([r["ms_per_token"] for r in rs])
    io = summarize([r.get("ms_io_per_token", 0.0) for r in rs])
    wait = summarize([r.get("ms_io_wait_per_token", 0.0) for r in rs])
    cache = summarize([r.get("ms_cache_per_token", 0.0) for r in rs])
    comp = summarize([r["ms_per_token"] - r.get("ms_io_wait_per_token", 0.0) - r.get("ms_cache_per_token", 0.0)
                      for r in rs])
    ovl = summarize([r.get("neurons_overlapped_per_token", 0.0) for r in rs])
    gb = summarize([r.get("bytes_read_per_token", 0.0) / 1e9 for r in rs])
    hit = summarize([r.get("prefetch_hit_rate", 0.0) for r in rs])
    pf = summarize([r.get("neurons_prefetched_per_token", 0.0) / max(r.get("neurons_read_per_token", 0.0), 1e-12)
                    for r in rs])
    return dict(total=tot, io=io, wait=wait, cache=cache, compute=comp, overlapped=ovl, gb=gb, hit=hit, pf=pf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--model", default=None, help="model directory (default: the synthetic shape)")
    ap.add_argument("--share", type=float, default=0.5, help="share of the model in DRAM (flash mode)")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--naive-tokens", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    common.RESULTS_DIR = Path(args.results)
    if args.quick:
        args.tokens, args.naive_tokens, args.repeats = min(args.tokens, 4), min(args.naive_tokens, 2), 2
    import flashrt

    path = Path(args.model) if args.model else ensure_synthetic(args.shape)
    mb = model_bytes(path)
    name = path.name
    vocab = 256 if "tiny" in name else 1024
    prompt = lambda s: synthetic_prompt(vocab, args.prompt_tokens, seed=s)  # noqa: E731
    cache_note = drop_page_cache([mb["ffn_path"]])
    dense_fits = not args.no_dense and mem_available() > mb["total"] * 1.15 + 2e9
    variants = [("flash overlap+prefetch", True, True), ("flash overlap", True, False), ("flash serial", False, False)]
    runs = {k: [] for k in [v[0] for v in variants] + ["dense", "naive"]}
    g, note = open_flash_at_share(path, args.share, threads=args.threads, window=args.window, max_context=256)
    plan = g.plan.describe()
    try:
        decode_run(g, prompt(99), 2, seed=99)
        for rep in range(args.repeats):
            for key, overlap, prefetch in variants[::1 if rep % 2 == 0 else -1]:
                g.ffn.overlap, g.ffn.prefetch = overlap, prefetch
                r = decode_run(g, prompt(rep), args.tokens, seed=rep)
                runs[key].append(r)
                print(f"{key:17s} rep {rep}: {r['ms_per_token']:.1f} ms/token, I/O in flight "
                      f"{r.get('ms_io_per_token', 0):.1f} ms, waited {r.get('ms_io_wait_per_token', 0):.1f} ms",
                      flush=True)
    finally:
        g.close()
    others = ([("dense", dict(mode="dense"))] if dense_fits else []) + \
             ([] if args.no_naive else [("naive", dict(mode="naive", memory_budget=common.budget_for(path, args.share)[0]))])
    for key, kw in others:
        with flashrt.Generator(path, threads=args.threads, max_context=256, progress=False, **kw) as g2:
            decode_run(g2, prompt(99), 1, seed=99)
            for rep in range(args.repeats):
                r = decode_run(g2, prompt(rep), args.naive_tokens if key == "naive" else args.tokens, seed=rep)
                runs[key].append(r)
                print(f"{key:17s} rep {rep}: {r['ms_per_token']:.1f} ms/token", flush=True)
    fig = {k: row_figures(v) for k, v in runs.items() if v}
    rows = []
    for k, f in fig.items():
        m = max(f["io"]["median"], f["compute"]["median"])
        rows.append([k, fmt_ms(f["total"]), f"{f['io']['median']:.1f}", f"{f['wait']['median']:.1f}",
                     f"{f['cache']['median']:.1f}", f"{f['compute']['median']:.1f}",
                     f"{m:.1f}" if k.startswith("flash") else "-",
                     f"{f['total']['median'] / m:.2f}" if k.startswith("flash") and m else "-",
                     f"{f['overlapped']['median']:.3f}", f"{f['gb']['median']:.3g}",
                     f"{f['pf']['median']:.2f} / {f['hit']['median']:.3f}" if f["pf"]["median"] else "-"])
    config = dict(model=str(path), share=args.share, budget=note, plan=plan, tokens=args.tokens,
                  repeats=args.repeats, threads=args.threads, window=args.window, page_cache=cache_note,
                  order="the flash variants alternate per repeat (one Generator, FlashFFN.overlap/prefetch); dense and naive after")
    text = header(f"Overlapped flash decode, {name} at {args.share:.0%} of the model in DRAM", config, path)
    table = md_table(["mode", "ms / token (min–max)", "I/O in flight ms", "I/O waited ms", "cache ms",
                      "compute ms (total - waited - cache)", "max(I/O, compute) ms", "total / max", "FFN share computed during reads",
                      "GB read / token", "share of reads prefetched / prefetch hit rate"], rows)
    lines = [text, "", table, "", f"loadavg at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", ""]
    fo, fs = fig["flash overlap+prefetch"]["total"]["median"], fig["flash serial"]["total"]["median"]
    fm = max(fig["flash overlap+prefetch"]["io"]["median"], fig["flash overlap+prefetch"]["compute"]["median"])
    lines.append(f"overlap+prefetch / serial: {fo / fs:.3f}x the time per token; overlap alone / serial: "
                 f"{fig['flash overlap']['total']['median'] / fs:.3f}x; overlap+prefetch / max(I/O, compute): {fo / fm:.2f}.")
    if "dense" in fig:
        lines.append(f"overlapped / dense: {fo / fig['dense']['total']['median']:.2f}x.")
    if "naive" in fig:
        lines.append(f"naive / overlapped: {fig['naive']['total']['median'] / fo:.1f}x; naive / serial: "
                     f"{fig['naive']['total']['median'] / fs:.1f}x.")
    out = "\n".join(lines)
    print(out)
    write_result(f"overlap_{name}{'-quick' if args.quick else ''}.md", out)


if __name__ == "__main__":
    main()
