"""Benchmark the compute kernels against NumPy float32 (OpenBLAS) on model shapes, and the
quantized storage types (q8_0, q4_0, q4_1) side by side with the float16 kernel.

    python bench/bench_kernels.py [--rounds 15] [--threads N] [--quick] [--only storage]

A = flashrt kernel on float16 weights, B = NumPy on the same weights in float32.
Rounds alternate A and B (the machine is shared and noisy); every call is timed on its own
and the report quotes the median call.
Throughput is weight bytes per second (float16 bytes for A, float32 bytes for B); the
target is ratio = A GB/s / B GB/s >= 0.70, i.e. A takes <= 0.71x B's time for half the bytes.

The storage section times gemv, ffn_rows and the prefill product (x (T, k) @ W.T by converting
row blocks of W to float32 and BLAS, what flashrt.linear does) for float16 and each quantized
type on the same weights, rotating the order every round; GB/s counts each type's own bytes,
"speed" is float16's time / this type's time (> 1: faster than float16).

The prefetch section (--only prefetch) streams a whole SmolLM2-sized FFN (30 layers, 1536
neurons, d 576; bigger than the L3 cache, so every layer comes from DRAM as in a decode step)
through ffn_rows with the kernels' software prefetch on and off (kernels._set_prefetch),
alternating, for each storage type.
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashrt._core import kernels  # noqa: E402
from gguf import GGMLQuantizationType as GQ  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from flashrt.threads import default_threads  # noqa: E402

TARGET = 0.70

GEMV_SHAPES = [
    ("SmolLM2 q/o_proj", 576, 576),
    ("SmolLM2 k/v_proj", 192, 576),
    ("SmolLM2 lm_head", 49152, 576),
    ("SmolLM2 FFN bundle", 1536, 1728),
    ("OPT-6.7B-like bundle", 4096, 8192),
]
FFN_SHAPES = [
    # name, n rows, d, gated, act
    ("SmolLM2 FFN 1536x(3*576) silu", 1536, 576, True, "silu"),
    ("OPT-6.7B-like 4096x(2*4096) relu", 4096, 4096, False, "relu"),
]


def machine_facts():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "?"
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:
        pass
    print(f"python {platform.python_version()}  numpy {np.__version__}  BLAS {blas}")
    print(f"cpu: {model}  os.cpu_count()={os.cpu_count()}  loadavg {load}")
    print(f"kernels.cpu_features(): {kernels.cpu_features()}")
    env = {k: os.environ.get(k) for k in ("FLASHRT_THREADS", "OMP_NUM_THREADS",
                                           "OPENBLAS_NUM_THREADS", "FLASHRT_KERNELS")}
    print(f"env: {env}  default_threads()={default_threads()}")


def _call_times(fn, reps, into):
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        into.append(time.perf_counter() - t0)


def ab(fa, fb, rounds, target_s=0.02):
    """Median per-call seconds of fa and fb: every call timed alone (so preemptions by other
    work on the machine land in the tails, not in the median), in alternating A/B batches."""
    for _ in range(3):                           # warm-up (page faults, thread pools, caches)
        fa(), fb()
    t0 = time.perf_counter()
    fa(), fb()
    reps = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))
    ta, tb = [], []
    for r in range(rounds):
        pair = [(fa, ta), (fb, tb)] if r % 2 == 0 else [(fb, tb), (fa, ta)]
        for fn, acc in pair:
            _call_times(fn, reps, acc)
    return float(np.median(ta)), float(np.median(tb))


def bench_gemv(rounds, n_threads, quick):
    print("\n== gemv: out = W @ x  (A: kernels.gemv on float16 W;  B: NumPy float32 W32 @ x)")
    print(f"{'shape':>34} {'A us':>9} {'A GB/s':>7} {'B us':>9} {'B GB/s':>7} {'ratio':>6}  ok(>={TARGET})")
    rng = np.random.default_rng(0)
    ratios = []
    for name, n, k in GEMV_SHAPES:
        if quick and n * k > 10_000_000:
            continue
        W = rng.standard_normal((n, k)).astype(np.float16)          # (n, k) float16
        W32 = W.astype(np.float32)                                   # (n, k) float32
        x = rng.standard_normal(k).astype(np.float32)
        out = np.empty(n, np.float32)
        ta, tb = ab(lambda: kernels.gemv(W, x, out, n_threads), lambda: W32 @ x, rounds)
        ga, gb = W.nbytes / ta / 1e9, W32.nbytes / tb / 1e9
        ratios.append(ga / gb)
        print(f"{name + f' {n}x{k}':>34} {ta * 1e6:9.1f} {ga:7.1f} {tb * 1e6:9.1f} {gb:7.1f} "
              f"{ga / gb:6.2f}  {'yes' if ga / gb >= TARGET else 'NO'}")
    return ratios


def numpy_ffn_f32(R32, x, d, gated, act, bias):
    """NumPy float32 FFN over bundle rows (the B side): BLAS GEMVs + vector ops."""
    if gated:
        g = R32[:, :d] @ x
        h = g / (1.0 + np.exp(-g)) * (R32[:, d:2 * d] @ x)
    else:
        h = np.maximum(R32[:, :d] @ x + bias, 0.0)
    return h @ R32[:, -d:]


def bench_ffn(rounds, n_threads, quick):
    print("\n== ffn_rows: y = sum_i h_i down_i  (A: kernels.ffn_rows on float16 rows;  "
          "B: NumPy float32 twin)")
    print(f"{'shape':>40} {'A us':>9} {'A GB/s':>7} {'B us':>9} {'B GB/s':>7} {'ratio':>6}  active")
    rng = np.random.default_rng(1)
    ratios = []
    for name, n, d, gated, act in FFN_SHAPES:
        if quick and n * d > 4_000_000:
            continue
        n_parts = 3 if gated else 2
        R = (rng.standard_normal((n, n_parts * d)) * 0.05).astype(np.float16)  # (n, n_parts*d)
        R32 = R.astype(np.float32)
        x = rng.standard_normal(d).astype(np.float32)
        # OPT: rows in the neuron cache are the predicted-active ones; a positive bias keeps
        # (nearly) all of them active so the comparison is dense work against dense work.
        bias = None if gated else np.full(n, 3.0, np.float32)
        out = np.empty(d, np.float32)
        h = np.empty(n, np.float32)
        kernels.ffn_rows(R, x, out, gated, act, bias, h, n_threads)
        active = float(np.mean(h != 0))
        ta, tb = ab(lambda: kernels.ffn_rows(R, x, out, gated, act, bias, None, n_threads),
                    lambda: numpy_ffn_f32(R32, x, d, gated, act, bias), rounds)
        ga, gb = R.nbytes / ta / 1e9, R32.nbytes / tb / 1e9
        ratios.append(ga / gb)
        print(f"{name:>40} {ta * 1e6:9.1f} {ga:7.1f} {tb * 1e6:9.1f} {gb:7.1f} {ga / gb:6.2f}  "
              f"{active:.2f}")
    return ratios


def bench_convert(rounds, n_threads):
    print("\n== f16_to_f32 (A: kernels.f16_to_f32;  B: NumPy astype into a preallocated buffer)")
    rng = np.random.default_rng(2)
    for n in (256 * 576, 4 * 1024 * 1024):
        src = rng.standard_normal(n).astype(np.float16)
        out = np.empty(n, np.float32)
        ta, tb = ab(lambda: kernels.f16_to_f32(src, out, n_threads),
                    lambda: np.copyto(out, src, casting="unsafe"), rounds)
        print(f"{n:>12} elems: A {ta * 1e6:8.1f} us ({src.nbytes / ta / 1e9:5.1f} GB/s in)   "
              f"B {tb * 1e6:8.1f} us   speed-up {tb / ta:5.1f}x")


def abn(fns, rounds, target_s=0.02):
    """Median per-call seconds of each fn, every call timed alone, the order rotated per round."""
    for _ in range(3):
        for f in fns:
            f()
    t0 = time.perf_counter()
    for f in fns:
        f()
    reps = max(1, int(target_s * len(fns) / max(time.perf_counter() - t0, 1e-7)))
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            _call_times(fns[j], reps, times[j])
    return [float(np.median(t)) for t in times]


QTYPES = [("q8_0", GQ.Q8_0), ("q4_0", GQ.Q4_0), ("q4_1", GQ.Q4_1)]
PREFILL_T = 64


def _storage_variants(W32):
    """[(name, weights, qtype)] for float16 and each quantized type of the float32 matrix W32."""
    out = [("float16", W32.astype(np.float16), None)]
    for name, g in QTYPES:
        out.append((name, gguf_quantize(W32, g), name))
    return out


def _print_storage_row(label, variants, times):
    base = times[0]
    cells = [f"{name} {t * 1e6:8.1f} us {W.nbytes / t / 1e9:5.1f} GB/s x{base / t:4.2f}"
             for (name, W, _), t in zip(variants, times)]
    print(f"{label:>30}  " + "  ".join(cells))


def _prefill_fn(W, qtype, x, y, n_threads):
    """y (T, n) = x (T, k) @ W.T, converting row blocks of W to float32 (as flashrt.linear)."""
    n, k = W.shape[0], x.shape[1]
    rows = max(64, min(1024, (1 << 19) // k)) // 8 * 8
    buf = np.empty(rows * k, np.float32)

    def run():
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            blk = buf[: (r1 - r0) * k].reshape(r1 - r0, k)
            kernels.to_f32(W[r0:r1], blk, qtype, n_threads)
            np.matmul(x, blk.T, out=y[:, r0:r1])
    return run


def bench_storage(rounds, n_threads, quick):
    print("\n== storage types: float16 kernel vs q8_0 / q4_0 / q4_1 on the same weights "
          "(x<speed> = float16 time / this time)")
    rng = np.random.default_rng(3)
    print("-- gemv")
    for name, n, k in GEMV_SHAPES:
        if quick and n * k > 10_000_000:
            continue
        W32 = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        x = rng.standard_normal(k).astype(np.float32)
        out = np.empty(n, np.float32)
        variants = _storage_variants(W32)
        times = abn([lambda W=W, q=q: kernels.gemv(W, x, out, n_threads, q) for _, W, q in variants],
                    rounds)
        _print_storage_row(f"{name} {n}x{k}", variants, times)
    print("-- ffn_rows (all rows active)")
    for name, n, d, gated, act in FFN_SHAPES:
        if quick and n * d > 4_000_000:
            continue
        n_parts = 3 if gated else 2
        R32 = (rng.standard_normal((n * n_parts, d)) * 0.05).astype(np.float32)
        x = rng.standard_normal(d).astype(np.float32)
        bias = None if gated else np.full(n, 3.0, np.float32)
        out = np.empty(d, np.float32)
        variants = [(nm, W.reshape(n, -1), q) for nm, W, q in _storage_variants(R32)]
        times = abn([lambda W=W, q=q: kernels.ffn_rows(W, x, out, gated, act, bias, None,
                                                        n_threads, q) for _, W, q in variants],
                    rounds)
        _print_storage_row(name, variants, times)
    print(f"-- prefill: x ({PREFILL_T}, k) @ W.T, row blocks of W converted to float32 + BLAS")
    for name, n, k in GEMV_SHAPES[:2] + GEMV_SHAPES[3:4]:
        W32 = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        x = rng.standard_normal((PREFILL_T, k)).astype(np.float32)
        y = np.empty((PREFILL_T, n), np.float32)
        variants = _storage_variants(W32)
        times = abn([_prefill_fn(W, q, x, y, n_threads) for _, W, q in variants], max(3, rounds // 3))
        _print_storage_row(f"{name} {n}x{k}", variants, times)


def bench_prefetch(rounds, n_threads):
    print("\n== software prefetch: ffn_rows over 30 SmolLM2-sized layers in turn (DRAM-bound), "
          "prefetch off vs on")
    rng = np.random.default_rng(4)
    n, d, layers = 1536, 576, 30
    R32 = (rng.standard_normal((n * 3, d)) * 0.05).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    out = np.empty(d, np.float32)
    default = kernels._set_prefetch(0)
    kernels._set_prefetch(default)
    for name, W, q in _storage_variants(R32):
        bundle = W.reshape(n, -1)
        copies = [bundle.copy() for _ in range(layers)]       # distinct memory per layer
        nbytes = sum(c.nbytes for c in copies)

        def step(ahead):
            def run():
                kernels._set_prefetch(ahead)
                for c in copies:
                    kernels.ffn_rows(c, x, out, True, "silu", None, None, n_threads, q)
            return run
        t_off, t_on = ab(step(0), step(default), rounds, target_s=0.05)
        kernels._set_prefetch(default)
        print(f"{name:>8} {nbytes / 1e6:6.1f} MB  off {t_off * 1e3:6.2f} ms {nbytes / t_off / 1e9:5.1f} GB/s   "
              f"on {t_on * 1e3:6.2f} ms {nbytes / t_on / 1e9:5.1f} GB/s   x{t_off / t_on:4.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="alternating A/B rounds (median)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: policy)")
    ap.add_argument("--quick", action="store_true", help="skip the big shapes")
    ap.add_argument("--only", choices=["storage", "prefetch"], help="run only this section")
    args = ap.parse_args()
    n_threads = default_threads() if args.threads is None else args.threads
    machine_facts()
    print(f"config: rounds={args.rounds} kernel n_threads={n_threads} (NumPy/OpenBLAS uses its own)")
    if args.only == "storage":
        bench_storage(args.rounds, n_threads, args.quick)
        return
    if args.only == "prefetch":
        bench_prefetch(args.rounds, n_threads)
        return
    g = bench_gemv(args.rounds, n_threads, args.quick)
    f = bench_ffn(args.rounds, n_threads, args.quick)
    bench_convert(args.rounds, n_threads)
    bench_storage(args.rounds, n_threads, args.quick)
    bench_prefetch(args.rounds, n_threads)
    print(f"\nsummary: gemv ratio min {min(g):.2f} median {np.median(g):.2f}; "
          f"ffn_rows ratio min {min(f):.2f}; target >= {TARGET}")


if __name__ == "__main__":
    main()
