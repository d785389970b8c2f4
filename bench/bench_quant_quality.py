"""Perplexity per storage type on held-out text, SmolLM2-135M-Instruct (the Q4_1 GGUF).

The baseline is the float32 conversion (the GGUF dequantized exactly). The other rows:
  float16          the dequantized weights rounded to float16
  q8_0, q4_0       every matrix requantized from the float32 values (ggml's quantizer)
  q4_1 (default)   the GGUF's own blocks copied bit for bit (embedding Q8_0, attention and
                   the FFN's gate/up Q4_1); only the down projection is re-blocked along
                   d_model (requantized from its dequantized values)
Two evaluation paths: "prefill" scores each context window as one batch (BLAS over
blocks dequantized to float32: the weights exactly as stored); "decode" feeds the tokens
one at a time through flash mode with every neuron selected, where quantized matrices run
integer dot products against a per-block int8 copy of the activations.

    python bench/bench_quant_quality.py                  # 4096 tokens prefill, 1024 decode
    python bench/bench_quant_quality.py --quick          # 1024 / 256
Text: the tail of ../shared/data/tinyshakespeare.txt (or --text), context 512.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK_DIR, header, md_table, write_result  # noqa: E402

# the shared data directory beside the checkout (or beside the worktrees' parent); --text overrides
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = next((p for p in (os.path.join(_ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
                                 os.path.join(_ROOT, "..", "..", "shared", "data", "tinyshakespeare.txt"))
                     if os.path.isfile(p)), "tinyshakespeare.txt")
TYPES = ["float32", "float16", "q8_0", "q4_0", None]       # None: the GGUF's default (q4_1)


def converted(gguf, storage, work):
    from flashrt.convert import convert
    from flashrt.format import ModelFiles

    out = work / f"smollm2-{storage or 'default'}"
    if not (out / "manifest.json").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(gguf, out, dtype=storage, overwrite=out.exists(), progress=False)
    return ModelFiles.open(out)


def main(argv=None):
    import flashrt
    from flashrt.home import default_gguf_path
    from flashrt.perplexity import perplexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--tail-chars", type=int, default=60000, help="held-out text: the last N characters")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored on the prefill path")
    ap.add_argument("--decode-tokens", type=int, default=1024, help="tokens scored on the decode path (0: skip)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.decode_tokens = 1024, 256
    with open(args.text, encoding="utf-8") as f:
        text = f.read()[-args.tail_chars:]
    gguf = default_gguf_path()
    work = WORK_DIR / "quant"
    work.mkdir(parents=True, exist_ok=True)
    out = header("Perplexity per storage type (SmolLM2-135M-Instruct, held-out tinyshakespeare tail)",
                 dict(gguf=gguf.name, text=os.path.basename(args.text), tail_chars=args.tail_chars,
                      prefill_tokens=args.tokens, decode_tokens=args.decode_tokens,
                      context=args.context, threads=args.threads))
    rows, base = [], {}
    for storage in TYPES:
        files = converted(gguf, storage, work)
        name = files.storage + (" (GGUF default)" if storage is None else "")
        res = {}
        with flashrt.Generator(files.path, threads=args.threads, max_context=args.context) as g:
            t0 = time.perf_counter()
            res["prefill"] = perplexity(g, text, context=args.context, max_tokens=args.tokens,
                                        progress=False)
            res["prefill_s"] = time.perf_counter() - t0
        if args.decode_tokens:
            with flashrt.Generator(files.path, mode="flash", select="all", threads=args.threads,
                                   max_context=args.context) as g:
                res["decode"] = perplexity(g, text, context=args.context,
                                           max_tokens=args.decode_tokens, progress=False)
        if storage == "float32":
            base = res
        cells = [name, f"{(files.resident_bytes + files.ffn_bytes) / 1e6:.1f}"]
        for path in ("prefill", "decode"):
            if path not in res:
                cells += ["", ""]
                continue
            p, b = res[path]["perplexity"], base[path]["perplexity"]
            cells += [f"{p:.4f}", f"{100 * (p / b - 1):+.2f}%"]
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    n_pre = base["prefill"]["tokens_scored"]
    n_dec = base["decode"]["tokens_scored"] if "decode" in base else 0
    out += md_table(["storage", "weights MB", f"ppl prefill ({n_pre} tok)", "vs float32",
                     f"ppl decode ({n_dec} tok)", "vs float32"], rows)
    out += ("\nTargets (issue 12): q8_0 <= +0.5%, 4-bit <= +2% requantized from float, the copied "
            "blocks identical to the float32 dequantization (checked bit for bit in "
            "tests/test_quantized_models.py).\n")
    print(out)
    write_result("quant_quality.md", out)


if __name__ == "__main__":
    main()
