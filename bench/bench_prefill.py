"""Time to the first token in flash mode (issue 14): the prompt streamed through every layer
once, or run token by token through the sparse path, or chosen per layer by FlashFFN's
estimate (prefill="auto"), for prompts of several lengths, at a share of the model in DRAM.
Confirms (or not) that the estimate picks the faster path: the table shows what it picked
and which was measured faster. Modes interleaved per repeat; medians (min-max).

    python bench/bench_prefill.py --model DIR [--lengths 4,16,64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (drop_page_cache, ensure_synthetic, fmt_ms, header, md_table, model_bytes,  # noqa: E402
                    open_flash_at_share, summarize, write_result)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--model", default=None)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--lengths", default="4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    common.RESULTS_DIR = Path(args.results)
    if args.quick:
        args.repeats = 1
    path = Path(args.model) if args.model else ensure_synthetic(args.shape)
    mb = model_bytes(path)
    cache_note = drop_page_cache([mb["ffn_path"]])
    lengths = [int(v) for v in args.lengths.split(",")]
    g, note = open_flash_at_share(path, args.share, threads=args.threads, max_context=max(256, 2 * max(lengths)))
    vocab = int(g.config["vocab_size"])
    import numpy as np

    times = {(T, m): [] for T in lengths for m in ("stream", "sparse", "auto")}
    picked = {}
    try:
        for rep in range(args.repeats):
            for T in lengths:
                ids = np.random.default_rng(rep * 100 + T).integers(0, vocab, T)
                for m in ("stream", "sparse", "auto")[::1 if rep % 2 == 0 else -1]:
                    g.ffn.prefill = m
                    g.ffn.prefill_choices = {"stream": 0, "sparse": 0}
                    t0 = time.perf_counter()
                    g._acquire()
                    try:
                        g._prefill(ids)
                    finally:
                        g._release()
                    times[T, m].append((time.perf_counter() - t0) * 1e3)
                    if m == "auto":
                        picked[T] = dict(g.ffn.prefill_choices)
                    print(f"T={T:4d} {m:6s} rep {rep}: {times[T, m][-1]:.0f} ms", flush=True)
    finally:
        g.close()
    rows = []
    agree = 0
    for T in lengths:
        s = {m: summarize(times[T, m]) for m in ("stream", "sparse", "auto")}
        faster = "sparse" if s["sparse"]["median"] < s["stream"]["median"] else "stream"
        p = picked[T]
        choice = "sparse" if p["sparse"] and not p["stream"] else "stream" if p["stream"] and not p["sparse"] else "mixed"
        agree += choice == faster
        rows.append([T, fmt_ms(s["stream"], 0), fmt_ms(s["sparse"], 0), fmt_ms(s["auto"], 0),
                     f"{choice} ({p['sparse']}/{p['sparse'] + p['stream']} layers sparse)", faster,
                     f"{s['stream']['median'] / s['auto']['median']:.2f}"])
    config = dict(model=str(path), share=args.share, budget=note, repeats=args.repeats, threads=args.threads,
                  page_cache=cache_note, order="modes alternate per repeat; prompts of random token ids")
    text = header(f"Time to first token (prefill), {path.name} at {args.share:.0%} of the model in DRAM", config, path)
    table = md_table(["prompt tokens", "stream ms", "sparse ms", "auto ms", "auto picked", "measured faster",
                      "stream / auto"], rows)
    out = "\n".join([text, "", table, "", f"The estimate picked the faster path for {agree} of {len(lengths)} "
                     "prompt lengths."])
    print(out)
    write_result(f"prefill_{path.name}{'-quick' if args.quick else ''}.md", out)


if __name__ == "__main__":
    main()
