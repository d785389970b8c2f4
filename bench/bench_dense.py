"""Dense path speed on SmolLM2-135M-Instruct beside its peers, same GGUF, same thread count:
flashrt at the GGUF's own storage (q4_1: the file's blocks, see flashrt/convert/gguf.py) and at
float16, llama.cpp (llama-cpp-python, Q4_1; skipped when not installed) and transformers
(float32, the GGUF dequantized by its own loader; skipped when torch is not installed).

Prefill: tokens/s over one prompt (greedy, KV cache reset each time).
Decode:  tokens/s over N greedy tokens after the prompt (the prompt's time excluded).
Bandwidth: the bytes of weights each decode step touches x tokens/s (the honest ceiling of
a memory-bound decoder); flashrt touches every resident matrix and the whole FFN once.
Runs are interleaved (a, b, c, a, b, c, ...) and medians reported: this machine is shared.

    python bench/bench_dense.py            # ~2-3 minutes
    python bench/bench_dense.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PROSE, WORK_DIR, fmt_ms, header, md_table, summarize, write_result  # noqa: E402


def flashrt_runner(threads: int, path=None):
    import flashrt

    g = flashrt.Generator(path, threads=threads, progress=False)
    files = g.files
    touched = files.resident_bytes + files.ffn_bytes  # every matrix once per token (tied head = embedding)

    def prefill(ids):
        t0 = time.perf_counter()
        g.logits(ids)
        return len(ids) / (time.perf_counter() - t0)

    def decode(ids, n):
        list(g.stream_tokens(ids, max_new_tokens=n, stop_at_eos=False))
        return g.stats.decode_tokens_per_second

    return g, prefill, decode, touched


def storage_model(gguf: str, dtype=None):
    """The GGUF converted at `dtype` (None: its own storage type, as the model cache does), cached in bench/work."""
    from flashrt.convert import convert

    out = WORK_DIR / f"smollm2-{dtype or 'default-storage'}"
    if not (out / "manifest.json").is_file():
        convert(gguf, out, dtype=dtype, overwrite=out.exists(), progress=False)
    return out


def llama_cpp_runner(gguf: str, threads: int, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None

    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, verbose=False)

    def prefill(ids):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(ids))
        return len(ids) / (time.perf_counter() - t0)

    def decode(ids, n):
        llm.reset()
        llm.eval(list(ids))
        t0 = time.perf_counter()
        for _ in range(n - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return (n - 1) / (time.perf_counter() - t0)

    return llm, prefill, decode, os.path.getsize(gguf)


def transformers_runner(gguf: str, threads: int):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 torch_dtype=torch.float32).eval()
    touched = sum(p.numel() * 4 for p in model.parameters())

    @torch.inference_mode()
    def prefill(ids):
        t0 = time.perf_counter()
        model(torch.tensor([ids]))
        return len(ids) / (time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(ids, n):
        out = model(torch.tensor([ids]), use_cache=True)
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
        return (n - 1) / (time.perf_counter() - t0)

    return model, prefill, decode, touched


def main(argv=None):
    from flashrt.home import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.prompt_tokens, args.repeats = 16, 32, 2

    gguf = str(default_gguf_path())
    text = header("Dense decode and prefill: flashrt vs llama.cpp vs transformers (SmolLM2-135M)",
                  dict(threads=args.threads, decode_tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                       repeats=args.repeats, gguf=os.path.basename(gguf)))
    runners = {}
    gq, *rest = flashrt_runner(args.threads, storage_model(gguf))
    runners[f"flashrt dense ({gq.files.storage}, the GGUF's blocks: the default)"] = rest
    g, *rest = flashrt_runner(args.threads, storage_model(gguf, "float16"))
    runners[f"flashrt dense ({g.files.storage})"] = rest
    ids = (g.tokenizer.encode(PROSE * 8))[: args.prompt_tokens]
    llama = llama_cpp_runner(gguf, args.threads, n_ctx=args.prompt_tokens + args.tokens + 8)
    if llama is not None:
        runners["llama.cpp (Q4_1)"] = llama[1:]
    else:
        print("llama-cpp-python is not installed: the llama.cpp row is skipped", flush=True)
    if not args.no_transformers:
        tr = transformers_runner(gguf, args.threads)
        if tr is not None:
            runners["transformers (float32)"] = tr[1:]
    results = {name: {"prefill": [], "decode": []} for name in runners}
    for name, (prefill, decode, _) in runners.items():  # warm-up
        prefill(ids[:8])
        decode(ids[:8], 4)
    for rep in range(args.repeats):
        for name, (prefill, decode, _) in runners.items():
            results[name]["prefill"].append(prefill(ids))
            results[name]["decode"].append(decode(ids, args.tokens))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{n}: {r['decode'][-1]:.1f} tok/s" for n, r in results.items()), flush=True)

    rows = []
    ref_name = "llama.cpp (Q4_1)" if "llama.cpp (Q4_1)" in results else f"flashrt dense ({g.files.storage})"
    ref = summarize(results[ref_name]["decode"])["median"]
    for name, (_, _, touched) in runners.items():
        p, d = summarize(results[name]["prefill"]), summarize(results[name]["decode"])
        rows.append([name, fmt_ms(p), fmt_ms(d), f"{d['median'] / ref:.2f}", f"{touched / 1e6:.0f}",
                     f"{touched * d['median'] / 1e9:.2f}"])
    table = md_table(["runtime", "prefill tok/s (min-max)", "decode tok/s (min-max)", f"decode vs {ref_name}",
                      "weight MB touched / token", "GB/s achieved"], rows)
    print(table)
    write_result("dense_peers.md", text + "\n" + table)


if __name__ == "__main__":
    main()
