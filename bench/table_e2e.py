"""The paper's Table 3 on this machine: end-to-end ms per decoded token, split into I/O,
cache management and compute, for dense (everything in DRAM, where it fits), naive and
flashrt, with half of the model in DRAM for the last two.

Models: the synthetic OPT-shaped model (bench/make_synthetic.py) and SmolLM2-135M-Instruct
(predictors fitted by flashrt.predictor.calibrate into a copy under bench/work).

Per mode the split is measured inside the runtime (g.stats.ffn): I/O = the loader's wall
time in reads (in flight), cache = NeuronCache bookkeeping, compute = the rest of the token
once the time it waited for reads is taken out
(attention, predictor, FFN kernel, head, Python). The compute is also set against what
memory bandwidth allows for the bytes the token touches (resident matrices, the FFN rows
computed, predictors), bandwidth measured here with NumPy reductions on 2 threads.

    python bench/table_e2e.py                      # synthetic opt-6.7b + SmolLM2
    python bench/table_e2e.py --shape opt-1.3b --no-smollm2
    python bench/table_e2e.py --quick --shape tiny --no-smollm2
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (PAPER_E2E_MS, PROSE, budget_for, decode_run, drop_page_cache, ensure_synthetic, fmt_ms,  # noqa: E402
                    header, md_table, mem_available, memory_bandwidth, model_bytes, open_flash_at_share, smollm2_path, summarize,
                    synthetic_prompt, write_result)


def resident_touched_bytes(path) -> int:
    """Bytes of the resident matrices one decode token reads: every 2-D weight except the
    position table and the token embedding (one row each), unless the embedding is the head."""
    with open(Path(path) / "resident.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))
    meta.pop("__metadata__", None)
    has_head = "lm_head.weight" in meta
    total = 0
    for name, m in meta.items():
        if len(m["shape"]) != 2:
            continue
        if "embed_positions" in name or ("embed_tokens" in name and has_head):
            continue
        total += m["data_offsets"][1] - m["data_offsets"][0]
    return total


def open_mode(path, mode, budget, threads, window, sparsity):
    import flashrt

    kw = dict(threads=threads, max_context=256, progress=False)
    if mode == "dense":
        return flashrt.Generator(path, mode="dense", **kw)
    if mode == "naive":
        return flashrt.Generator(path, mode="naive", memory_budget=budget, **kw)
    g, note = open_flash_at_share(path, SHARE[0], select="predictor", window=window, sparsity=sparsity,
                                  threads=threads, max_context=256)
    return g


BANDWIDTH = []  # DRAM bandwidth probes of this run, GB/s
SHARE = [0.5]


def bench_model(name, path, prompt_fn, args, bw_GBs):
    mb = model_bytes(path)
    budget, budget_note = budget_for(path, args.budget_share)
    cache_note = drop_page_cache([mb["ffn_path"]])
    dense_fits = mem_available() > mb["total"] * 1.15 + 2e9
    modes = (["dense"] if dense_fits else []) + ["naive", "flash"]
    # small models: all modes open side by side, repeats interleaved; big ones (> 2 GB): one
    # mode at a time (two copies of the resident tensors would not fit beside other jobs)
    big = mb["total"] > 2e9
    blocks = [[m] for m in modes] if big else [modes]
    tokens = {"dense": args.tokens, "flash": args.tokens, "naive": args.naive_tokens}
    config = dict(model=path, budget=budget_note + " (naive; flash mode: resident + neuron caches = "
                  f"{args.budget_share:.0%} of the model, see its plan)", window=args.window, threads=args.threads, tokens=args.tokens,
                  naive_tokens=args.naive_tokens, repeats=args.repeats, sparsity=args.sparsity,
                  page_cache=cache_note, dense="runs" if dense_fits else "skipped: the model does not fit in the DRAM free here",
                  order="modes one after another" if big else "modes interleaved per repeat")
    text = header(f"End to end, {name}: dense vs naive vs flashrt at {args.budget_share:.0%} of the model in DRAM "
                  f"(paper Table 3)", config, path)
    runs = {m: [] for m in modes}
    plans = {}
    for block in blocks:
        gens = {}
        try:
            for m in block:
                gens[m] = open_mode(path, m, budget, args.threads, args.window,
                                    args.sparsity if m == "flash" else None)
                if gens[m].plan is not None:
                    plans[m] = gens[m].plan.describe()
            for m, g in gens.items():
                decode_run(g, prompt_fn(99), 2, seed=99)  # warm-up
            for rep in range(args.repeats):
                for m, g in gens.items():
                    r = decode_run(g, prompt_fn(rep), tokens[m], seed=rep)
                    runs[m].append(r)
                    print(f"{name} {m:6s} rep {rep}: {r['ms_per_token']:.1f} ms/token "
                          f"({r['n_decoded']} tokens), I/O {r.get('ms_io_loader_per_token', 0):.1f} ms, "
                          f"cache {r.get('ms_cache_per_token', 0):.2f} ms", flush=True)
        finally:
            for g in gens.values():
                g.close()

    BANDWIDTH.append(memory_bandwidth())  # again, after the runs: the machine is noisy
    (common.RESULTS_DIR / f"raw_e2e_{Path(path).name}.json").write_text(json.dumps(runs, indent=1))
    res_touch = resident_touched_bytes(path)
    pred = Path(path) / "predictors.npz"
    pred_bytes = pred.stat().st_size if pred.is_file() else 0
    rows, med = [], {}
    for m in modes:
        rs = runs[m]
        tot = summarize([r["ms_per_token"] for r in rs])
        io = summarize([r.get("ms_io_loader_per_token", 0.0) for r in rs])
        cache = summarize([r.get("ms_cache_per_token", 0.0) for r in rs])
        # compute = the token minus the time it waited for reads (with overlap the reads in
        # flight partly hide behind the kernel: subtracting them all would undercount compute)
        comp = summarize([r["ms_per_token"] - r.get("ms_io_wait_per_token", r.get("ms_io_loader_per_token", 0.0))
                          - r.get("ms_cache_per_token", 0.0) for r in rs])
        predict = summarize([r.get("ms_predict_per_token", 0.0) for r in rs])
        gb = summarize([r.get("bytes_read_per_token", 0.0) / 1e9 for r in rs])
        share = summarize([r.get("neurons_computed_per_token", 1.0) for r in rs])
        touched = res_touch + share["median"] * mb["ffn"] + (pred_bytes if m == "flash" else 0)
        bw_GBs = max(bw_GBs, *BANDWIDTH)  # the best probe so far (start and end of the run)
        bound = touched / (bw_GBs * 1e9) * 1e3
        med[m] = dict(total=tot["median"], compute=comp["median"], bound=bound)
        rows.append([m, fmt_ms(tot), f"{1e3 / tot['median']:.2f}", f"{io['median']:.1f}", f"{cache['median']:.2f}",
                     f"{comp['median']:.1f} ({predict['median']:.1f})", f"{gb['median']:.3g}", f"{share['median']:.3f}",
                     f"{touched / 1e9:.3g} GB / {bound:.1f} ms", f"{touched / comp['median'] / 1e6:.1f}",
                     f"{comp['median'] / bound:.2f}"])
    table = md_table(["mode", "ms / token (min–max)", "tokens/s", "I/O ms", "cache ms", "compute ms (predictor)",
                      "GB read / token", "FFN share computed", "bytes touched / bandwidth bound", "effective GB/s of compute", "compute / bound"],
                     rows)
    lines = [text] + [f"Plan ({m}): {p}" for m, p in plans.items()] + ["", table, ""]
    speedup = med["naive"]["total"] / med["flash"]["total"]
    lines.append(f"**End to end, naive / flashrt: {speedup:.1f}x** (target >= 4x: {'met' if speedup >= 4 else 'NOT met'}; "
                 f"paper on M1 Max CPU {PAPER_E2E_MS['naive']:.0f} / {PAPER_E2E_MS['flashrt']:.0f} ms = "
                 f"{PAPER_E2E_MS['naive'] / PAPER_E2E_MS['flashrt']:.1f}x).")
    ratio = med["flash"]["compute"] / med["flash"]["bound"]
    lines.append(f"**flashrt compute / memory-bandwidth bound: {ratio:.2f}** (target <= 1.5: "
                 f"{'met' if ratio <= 1.5 else 'NOT met'}; DRAM read bandwidth {bw_GBs:.1f} GB/s: the best of NumPy sums and the f16 GEMV kernel on 2 threads, "
                 f"probed before and after the runs; probes {', '.join(f'{b:.1f}' for b in BANDWIDTH)} GB/s).")
    if "dense" in med:
        lines.append(f"dense compute / bound: {med['dense']['compute'] / med['dense']['bound']:.2f}; "
                     f"flashrt vs dense: {med['flash']['total'] / med['dense']['total']:.2f}x the time per token.")
    return "\n".join(lines), med


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-6.7b", help="synthetic shape ('none' to skip)")
    ap.add_argument("--model", default=None, help="synthetic model dir (default bench/work/synthetic-SHAPE[-DTYPE])")
    ap.add_argument("--dtype", default="float16", help="the synthetic model's storage: float16 | float32 | q8_0 | q4_0 | q4_1")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--naive-tokens", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=None,
                    help="flash: share of neurons skipped (default: the predictors' own setting)")
    ap.add_argument("--budget-share", type=float, default=0.5)
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    SHARE[0] = args.budget_share
    if args.quick:
        args.tokens, args.naive_tokens, args.repeats = min(args.tokens, 4), min(args.naive_tokens, 2), 2
    common.RESULTS_DIR = Path(args.results)
    bw = memory_bandwidth()
    BANDWIDTH.append(bw)
    print(f"DRAM read bandwidth (best of NumPy sums and the f16 GEMV kernel, 2 threads): {bw:.1f} GB/s", flush=True)
    suffix = "-quick" if args.quick else ""
    out = {}
    if args.shape != "none":
        path = ensure_synthetic(args.shape, args.model, dtype=args.dtype)
        vocab = 256 if args.shape == "tiny" else 1024
        text, out[args.shape] = bench_model(f"synthetic {args.shape}", path,
                                            lambda s: synthetic_prompt(vocab, 16, seed=s), args, bw)
        write_result(f"table_e2e_{args.shape}{common.dtype_suffix(args.dtype)}{suffix}.md", text + "\n\nThe synthetic model's activations are "
                     "constructed (bench/make_synthetic.py); sampling at temperature 1 from random prompts.")
    if not args.no_smollm2:
        path = smollm2_path(calibrated=True)
        prompts = [PROSE, "Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
                   "List three facts about the Moon."]
        text, out["smollm2"] = bench_model("SmolLM2-135M-Instruct", path, lambda s: prompts[s % len(prompts)],
                                           args, bw)
        write_result(f"table_e2e_smollm2{suffix}.md", text + "\n\nSmolLM2 runs at temperature 1 (seeded) so "
                     "every mode decodes the requested number of tokens; predictors from flashrt.predictor.calibrate.")
    return out


if __name__ == "__main__":
    main()
