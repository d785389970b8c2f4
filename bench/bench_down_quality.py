"""Which storage can the FFN's down columns take? Perplexity of SmolLM2-135M-Instruct (the Q4_1
GGUF) with the down projection re-blocked along d_model as each candidate type.

A bundle row holds neuron i's down COLUMN (d_model weights), but the GGUF stores down_proj in
rows of n_ff weights, Q4_1 blocks along n_ff: the column's blocks must be requantized from the
dequantized values (flashrt/convert/gguf.py). This measures what each type costs in quality:
everything but the down projection is the default model's (the GGUF's own blocks); the down
columns are the GGUF's exact values ("float", the baseline) or those requantized with ggml's
reference quantizer (gguf.quants) as q8_0 (today's default), q5_0, q5_1, q4_1. Scored on the
prefill path (float32 BLAS over the stored values: the weights' quality, not the kernels').
Bytes: the down columns of a token's FFN at each type (30 layers x 1536 x 576 weights).

    python bench/bench_down_quality.py                      # ~6 minutes on 2 idle cores
    python bench/bench_down_quality.py --types float,q8_0 --tokens 1024
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quant_quality import DEFAULT_TEXT  # noqa: E402
from common import header, md_table, write_result  # noqa: E402

BYTES_PER_32 = {"float": 128, "q8_0": 34, "q5_0": 22, "q5_1": 24, "q4_1": 20}


def gguf_downs(path):
    """{layer: the GGUF's down_proj (d, n_ff) float32, dequantized exactly}."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path).tensors:
        if t.name.endswith("ffn_down.weight"):
            d, n_ff = int(t.shape[1]), int(t.shape[0])
            out[int(t.name.split(".")[1])] = dequantize(np.asarray(t.data), t.tensor_type).reshape(d, n_ff)
    return out


def main(argv=None):
    import flashrt
    from flashrt.ffn.dense import DenseFFN
    from flashrt.home import default_gguf_path
    from flashrt.perplexity import perplexity
    from gguf import GGMLQuantizationType as G
    from gguf.quants import dequantize, quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--tail-chars", type=int, default=60000)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="float,q8_0,q5_0,q5_1,q4_1")
    args = ap.parse_args(argv)
    types = args.types.split(",")
    ggml = {"q8_0": G.Q8_0, "q5_0": G.Q5_0, "q5_1": G.Q5_1, "q4_1": G.Q4_1}
    with open(args.text, encoding="utf-8") as f:
        text = f.read()[-args.tail_chars:]
    gguf = default_gguf_path()
    downs = gguf_downs(gguf)
    rows, base = [], None
    with flashrt.Generator(None, threads=args.threads, max_context=args.context, progress=False) as g:
        ffn = g.model.ffn
        n_layers, n, d = ffn.n_layers, ffn.n_neurons(0), ffn.dim
        gate = [ffn.part_f32(l, "gate") for l in range(n_layers)]
        up = [ffn.part_f32(l, "up") for l in range(n_layers)]
        for name in types:
            bundles = []
            for l in range(n_layers):
                col = np.ascontiguousarray(downs[l].T)                  # (n, d): neuron i's down column
                if name != "float":
                    col = dequantize(quantize(col, ggml[name]), ggml[name]).reshape(n, d)
                bundles.append(np.ascontiguousarray(np.concatenate([gate[l], up[l], col], axis=1), np.float32))
            g.model.ffn = DenseFFN(bundles, True, ffn.act, n_threads=args.threads)
            t0 = time.perf_counter()
            ppl = perplexity(g, text, context=args.context, max_tokens=args.tokens, progress=False)["perplexity"]
            base = ppl if base is None else base
            mb = n_layers * n * d // 32 * BYTES_PER_32[name] / 1e6
            rows.append([name, f"{mb:.1f}", f"{ppl:.4f}", f"{100 * (ppl / base - 1):+.2f}%"])
            print(rows[-1], f"{time.perf_counter() - t0:.0f} s", flush=True)
        g.model.ffn = ffn
    config = dict(gguf=gguf.name, text=os.path.basename(args.text), tail_chars=args.tail_chars,
                  tokens=args.tokens, context=args.context, baseline=types[0])
    out = "\n".join([header("The FFN's down columns re-blocked along d_model: perplexity per type", config), "",
                     md_table(["down columns", "MB / token", "ppl (prefill)", f"vs {types[0]}"], rows)])
    print(out)
    write_result("down_reblock_quality.md", out)


if __name__ == "__main__":
    main()
