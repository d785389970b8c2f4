"""Flash reads per storage type: bytes read per token on the synthetic OPT shape, the same
weights stored as float16, q8_0, q4_0 and q4_1.

Each model is bench/make_synthetic.py's (same seed: the same weights, quantized by the
writer) with its constructed predictor, in flash mode. Two settings per type:
  same cache   the neuron caches hold the same number of neurons as float16's at half its
               size (the bytes differ): isolates the bytes per neuron read;
  same budget  the float16 model's budget (half its bytes): quantized caches hold 2-3.5x
               more neurons, so they also read fewer.
Decode runs are interleaved across the types; medians reported.

    python bench/bench_quant_io.py                     # opt-1.3b shape (~2.4 GB float16)
    python bench/bench_quant_io.py --shape tiny --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (budget_for, decode_run, drop_page_cache, ensure_synthetic, header, md_table,  # noqa: E402
                    model_bytes, synthetic_prompt, write_result)

TYPES = ["float16", "q8_0", "q4_0", "q4_1"]


def main(argv=None):
    import flashrt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES), help="storage types, float16 first")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    types = args.types.split(",")
    if args.quick:
        args.tokens, args.repeats = 4, 2
    vocab = 1024 if args.shape != "tiny" else 256
    paths = {t: ensure_synthetic(args.shape, dtype=t) for t in types}
    mb = {t: model_bytes(p) for t, p in paths.items()}
    budget16, note = budget_for(paths["float16"], 0.5)
    cache_note = drop_page_cache([mb[t]["ffn_path"] for t in types])
    text = header(f"Flash reads per storage type, synthetic {args.shape}",
                  dict(shape=args.shape, budget=note, tokens=args.tokens, repeats=args.repeats,
                       window=args.window, threads=args.threads, page_cache=cache_note))
    gens = {}
    with flashrt.Generator(paths["float16"], mode="flash", memory_budget=budget16, window=args.window,
                           threads=args.threads, max_context=256, progress=False) as g:
        rows16 = g.plan.cache_rows
    for t in types:
        same_budget = flashrt.Generator(paths[t], mode="flash", memory_budget=budget16, window=args.window,
                                        threads=args.threads, max_context=256, progress=False)
        # the budget that gives this type's caches float16's row count: its fixed part + those rows
        fixed = same_budget.plan.total - same_budget.plan.cache_bytes
        budget = fixed + rows16 * mb[t]["row_bytes"] * mb[t]["n_layers"] + 1
        same_cache = flashrt.Generator(paths[t], mode="flash", memory_budget=budget,
                                       window=args.window, threads=args.threads, max_context=256, progress=False)
        gens[t, "same cache"] = same_cache
        gens[t, "same budget"] = same_budget
    results = {k: [] for k in gens}
    try:
        for k, g in gens.items():
            decode_run(g, synthetic_prompt(vocab, 16, seed=99), 2, seed=99)       # warm-up
        for rep in range(args.repeats):
            for k, g in gens.items():
                r = decode_run(g, synthetic_prompt(vocab, 16, seed=rep), args.tokens, seed=rep)
                results[k].append(r)
                print(f"{k[0]:8s} {k[1]:11s} rep {rep}: {r['bytes_read_per_token'] / 1e6:.2f} MB read/token, "
                      f"{r['ms_per_token']:.1f} ms/token, cache rows {g.plan.cache_rows}", flush=True)
        rows = []
        base = {s: np.median([r["bytes_read_per_token"] for r in results["float16", s]])
                for s in ("same cache", "same budget")}
        for (t, s), g in gens.items():
            rs = results[t, s]
            b = np.median([r["bytes_read_per_token"] for r in rs])
            useful = [r["neurons_read_per_token"] * mb[t]["n_layers"] * g.files.n_neurons * mb[t]["row_bytes"]
                      for r in rs]
            useful16 = [r["neurons_read_per_token"] * mb["float16"]["n_layers"] * g.files.n_neurons
                        * mb["float16"]["row_bytes"] for r in results["float16", s]]
            u, u16 = np.median(useful), np.median(useful16)
            rows.append([t, s, f"{mb[t]['row_bytes']}", f"{g.plan.cache_rows}", f"{u / 1e6:.3f}",
                         f"{u / u16:.3f}", f"{b / 1e6:.3f}",
                         f"{b / base[s]:.3f}", f"{np.median([r['reads_per_token'] for r in rs]):.0f}",
                         f"{np.median([r['mean_read_bytes'] for r in rs]) / 1024:.1f}",
                         f"{np.median([r['ms_per_token'] for r in rs]):.1f}"])
    finally:
        for g in gens.values():
            g.close()
    text += md_table(["storage", "setting", "bundle bytes", "cache rows / layer", "bundle MB read / token",
                      "vs float16", "device MB read / token (4 KiB-aligned)", "vs float16", "reads / token",
                      "mean read KiB", "ms / token"], rows)
    text += ("\nTarget (issue 12): bytes read per token at 4-bit <= 0.3x float16. A bundle of q4_0 is "
             "18/64 = 0.28x float16's bytes, q4_1 20/64 = 0.31x, q8_0 34/64 = 0.53x. 'bundle MB' counts "
             "the bundles the loader was asked for; 'device MB' what O_DIRECT read, whole 4 KiB blocks "
             "(an isolated bundle smaller than a block still costs one or two blocks).\n")
    print(text)
    write_result(f"quant_io_{args.shape}{'-quick' if args.quick else ''}.md", text)


if __name__ == "__main__":
    main()
