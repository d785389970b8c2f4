"""SmolLM2 dense decode against the memory-bandwidth bound (issue 14), and where the rest goes.

One Generator (the default model, its GGUF's q4_1 blocks, everything in DRAM), three variants
alternating per repeat: the decode step as it runs (one kernels.attn_step per layer for the
attention half, q, k, v fused into one GEMV inside it: Model.step_kernel), the same operations
as separate kernel and NumPy calls (q, k, v fused, see flashrt/models/base.py fuse_rows), and
those with the fusion off (three GEMVs per layer). Per variant:
ms/token (median, min-max), the bytes a token touches (every resident matrix it multiplies by,
the whole FFN and the head: each once), the DRAM read bandwidth probed on this machine before
and after the runs (common.memory_bandwidth: the best of NumPy sums and the f16 GEMV kernel on
2 threads), and compute / bound. Then one profiled run: per op kind, calls per token, ms per
token and us per call, and the Python between the ops (the token minus every timed op).

    python bench/bench_decode_ops.py                  # ~1-2 minutes
    python bench/bench_decode_ops.py --tokens 32 --repeats 3
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_ms, header, md_table, memory_bandwidth, summarize, write_result  # noqa: E402


def nbytes(W) -> int:
    import numpy as np
    data = W if isinstance(W, np.ndarray) else getattr(W, "data", None)
    return int(data.nbytes) if isinstance(data, np.ndarray) else 0


def touched_bytes(g) -> dict:
    """Bytes of weights one dense decode token reads: attention matrices, FFN bundles, the head."""
    m = g.model
    attn = sum(nbytes(W) for L in m.layers for W in (L.wq, L.wk, L.wv, L.wo))
    ffn = sum(int(B.nbytes) for B in g.ffn.bundles)
    head = nbytes(m.lm_head)
    return dict(attention=attn, ffn=ffn, head=head, total=attn + ffn + head)


def decode_ms(g, n_tokens: int) -> float:
    g.generate("Once upon a time", max_new_tokens=n_tokens, temperature=0)
    return 1e3 * g.stats.decode_seconds / max(g.stats.n_generated_tokens - 1, 1)


def profile(g, n_tokens: int) -> tuple[float, list]:
    """One run with every op kind timed: (ms/token, rows of (op, calls/token, ms/token, us/call))."""
    from flashrt._core import kernels

    acc = collections.defaultdict(lambda: [0, 0])
    saved = []
    decoding = [False]  # count only inside decode steps (one token), not the prompt's forward

    def wrap(obj, name, key):
        f = getattr(obj, name)
        saved.append((obj, name, f, name in vars(obj) if not isinstance(obj, type) else True))

        def timed(*a, **k):
            t = time.perf_counter_ns()
            try:
                return f(*a, **k)
            finally:
                if decoding[0]:
                    e = acc[key]
                    e[0] += time.perf_counter_ns() - t
                    e[1] += 1
        setattr(obj, name, timed)

    forward = g.model.forward

    def forward_flag(ids, *a, **k):
        decoding[0] = len(ids) == 1
        return forward(ids, *a, **k)

    for name in ("attn_step", "gemv", "ffn_rows", "rms_norm", "rope_", "attend_one"):
        wrap(kernels, name, f"kernels.{name}")
    wrap(g.kv, "append", "kv.append")
    g.model.forward = forward_flag
    try:
        g.generate("Once upon a time", max_new_tokens=2, temperature=0)
        acc.clear()
        g.generate("Once upon a time", max_new_tokens=n_tokens, temperature=0)
        n_fwd = max(g.stats.n_generated_tokens - 1, 1)  # the decode steps
        ms_tok = 1e3 * g.stats.decode_seconds / n_fwd
    finally:
        del g.model.forward
        for obj, name, f, own in reversed(saved):
            if own:
                setattr(obj, name, f)
            else:
                delattr(obj, name)
    rows, timed_ms = [], 0.0
    for key, (ns, c) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        rows.append((key, c / n_fwd, ns / 1e6 / n_fwd, ns / max(c, 1) / 1e3))
        timed_ms += ns / 1e6
    rest = ms_tok - timed_ms / n_fwd
    rows.append(("Python between the ops (token - timed ops)", None, rest, None))
    return ms_tok, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: SmolLM2, the GGUF's q4_1)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import flashrt

    bw = [memory_bandwidth()]
    variants = {"step": (True, True), "fused": (False, True), "three": (False, False)}  # (step_kernel, fuse_qkv)
    runs = {v: [] for v in variants}
    with flashrt.Generator(args.model, threads=args.threads, progress=False) as g:
        decode_ms(g, 4)
        for rep in range(args.repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for v in order:
                g.model.step_kernel, g.model.fuse_qkv = variants[v]
                runs[v].append(decode_ms(g, args.tokens))
                print(f"{v}: {runs[v][-1]:.2f} ms/token", flush=True)
        g.model.step_kernel, g.model.fuse_qkv = True, True
        tb = touched_bytes(g)
        prof_ms, prof = profile(g, args.tokens)
        model_name = g.path.name
    bw.append(memory_bandwidth())
    bw_GBs = max(bw)
    bound = tb["total"] / (bw_GBs * 1e9) * 1e3
    rows = []
    labels = {"step": "dense, one attn_step per layer (default)", "fused": "dense, q/k/v fused, separate calls",
              "three": "dense, q/k/v as three GEMVs"}
    for v, label in labels.items():
        s = summarize(runs[v])
        rows.append([label, fmt_ms(s, 2), f"{1e3 / s['median']:.1f}", f"{tb['total'] / 1e6:.1f} MB",
                     f"{bound:.2f}", f"{tb['total'] / s['median'] / 1e6:.1f}", f"{s['median'] / bound:.2f}"])
    config = dict(model=model_name, tokens=args.tokens, repeats=args.repeats, threads=args.threads,
                  order="the variants alternate per repeat in one Generator (Model.step_kernel, Model.fuse_qkv)",
                  bytes=f"attention {tb['attention'] / 1e6:.1f} MB + FFN {tb['ffn'] / 1e6:.1f} MB + head "
                        f"{tb['head'] / 1e6:.1f} MB per token",
                  bandwidth=f"{bw_GBs:.1f} GB/s (probes {', '.join(f'{b:.1f}' for b in bw)})")
    text = header("SmolLM2 dense decode against the memory-bandwidth bound", config)
    t1 = md_table(["variant", "ms / token (min–max)", "tokens/s", "bytes touched / token", "bound ms (bytes / bandwidth)",
                   "effective GB/s", "time / bound"], rows)
    t2 = md_table(["op", "calls / token", "ms / token", "us / call"],
                  [[k, "-" if c is None else f"{c:.1f}", f"{ms:.2f}", "-" if us is None else f"{us:.1f}"]
                   for k, c, ms, us in prof])
    med = {v: summarize(runs[v])["median"] for v in variants}
    out = "\n".join([text, "", t1, "",
                     f"attn_step / separate calls: {med['step'] / med['fused']:.3f}x the time per token; "
                     f"fused / three GEMVs: {med['fused'] / med['three']:.3f}x (medians).", "",
                     f"Per op, one profiled run of {args.tokens} tokens (the default; {prof_ms:.2f} ms/token with the timers):", "",
                     t2, "", f"loadavg at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"])
    print(out)
    write_result("decode_ops_smollm2.md", out)


if __name__ == "__main__":
    main()
