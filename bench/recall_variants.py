"""Top-k recall at 50% per layer, out of domain, of up estimates for gate-first scoring: what
would it take to reach issue 13's 0.85 in every layer?

    python bench/recall_variants.py MODEL_DIR [--layers 5 10 15 20 25 29] \
        [--variants gate r48 r96 r192 sign q2 q3 q4] [--record WORK.npz] [--out bench/results/recall_variants]

Every variant computes the gate exactly (gate rows in DRAM, as gate-first does) and scores a
neuron by |silu(gate.x) * u_hat| with one estimate u_hat of up.x:
  gate   no up estimate (|silu(gate.x)| alone)
  rN     the data-aware rank-N SVD of up (calibrate's up estimate at rank N), fitted on the
         FFN inputs recorded on calibrate's own text (2048 tokens sampled from the model,
         temperature 1, seed 0: the defaults)
  sign   up's rows as 1 bit per weight (sign x the row's mean |w|)
  qB     up's rows at B bits per weight (uniform, per block of 32, scale = the block's max |w|)
Recall is measured on 4096 tokens of Python's reference manual from token 20000 (context 512):
the share of each token's true top half by |h| that the variant's top half holds. The
recording (FFN inputs and h of every layer, float16, ~0.5 GB) is kept in --record and reused.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import WORK_DIR, md_table  # noqa: E402
from flashrt.api import load_model, model_args  # noqa: E402
from flashrt.calibration import FitWeights, RecordingFFN, _sample_token  # noqa: E402
from flashrt.ffn.dense import DenseFFN  # noqa: E402
from flashrt.format.reader import ModelFiles  # noqa: E402
from flashrt.predictor.calibrate import python_docs_text  # noqa: E402
from flashrt.predictor.fit import data_aware_lowrank, input_sqrt_cov  # noqa: E402
from flashrt.predictor.lowrank import silu, topk_mask  # noqa: E402
from flashrt.tokenizer import Tokenizer  # noqa: E402

N_FIT, CTX, SKIP, N_EVAL = 2048, 512, 20000, 4096


def record(files, out):
    """calibrate's sampled text (its defaults) and the manual's tokens, through the dense model."""
    model = load_model(files, lambda spec, w: RecordingFFN(DenseFFN.from_files(files, spec, 1), max_tokens=N_FIT), 1)
    rec, L = model.ffn, files.n_layers
    rng = np.random.default_rng(0)
    bos = files.config.get("bos_token_id")
    bos = int(bos[0] if isinstance(bos, list) else bos) if bos is not None else 0
    while rec.n_recorded(0) < N_FIT:                     # as flashrt.calibration.calibrate samples
        kv, tok = model.make_cache(CTX), bos
        for _ in range(min(CTX, N_FIT - rec.n_recorded(0))):
            tok = _sample_token(model.forward(np.array([tok]), kv)[-1], rng)
    Xf = np.stack([rec.arrays(l, np.float16)[0] for l in range(L)])
    rec.clear()
    ids = np.array(Tokenizer.from_dir(files.tokenizer_dir).encode(python_docs_text()), np.int64)[SKIP:SKIP + N_EVAL]
    rec.max_tokens = ids.size
    for i in range(0, ids.size, CTX):
        model.forward(ids[i:i + CTX], model.make_cache(CTX))
    Xe = np.stack([rec.arrays(l, np.float16)[0] for l in range(L)])
    He = np.stack([rec.arrays(l, np.float16)[1] for l in range(L)])
    np.savez(out, Xf=Xf, Xe=Xe, He=He)


def up_estimate(variant, Wu, X_fit, S):
    """(n, d) float32 matrix U_hat with u_hat = x @ U_hat.T, or None for no estimate."""
    if variant == "gate":
        return None
    if variant.startswith("r"):
        A, B = data_aware_lowrank(X_fit, Wu, int(variant[1:]), S)
        return B @ A
    if variant == "sign":
        return np.sign(Wu) * np.abs(Wu).mean(1, keepdims=True)
    if variant.startswith("q"):
        lv = 2 ** (int(variant[1:]) - 1)
        blocks = Wu.reshape(Wu.shape[0], -1, 32)
        step = np.abs(blocks).max(2, keepdims=True) / lv + 1e-12
        return ((np.clip(np.floor(blocks / step), -lv, lv - 1) + 0.5) * step).reshape(Wu.shape)
    raise SystemExit(f"unknown variant {variant!r}")


def cost(variant, d, n, bits_float=16):
    """(multiply-adds per token as a share of the dense FFN's, DRAM bytes per layer) of the up estimate."""
    ffn = 3 * d * n
    if variant == "gate":
        return 0.0, 0
    if variant.startswith("r"):
        r = int(variant[1:])
        return r * (d + n) / ffn, r * (d + n) * bits_float // 8
    bits = 1 if variant == "sign" else int(variant[1:])
    return d * n / ffn, d * n * bits // 8 + (n if variant == "sign" else n * d // 32) * 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15, 20, 25, 29])
    ap.add_argument("--variants", nargs="+", default=["gate", "r48", "r96", "r192", "sign", "q2", "q3", "q4"])
    ap.add_argument("--record", type=Path, default=WORK_DIR / "recall_variants.npz")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    files = ModelFiles.open(args.model_dir)
    if not args.record.exists():
        args.record.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        record(files, args.record)
        print(f"recorded {args.record} in {time.perf_counter() - t:.0f} s", flush=True)
    z = np.load(args.record)
    Xf_all, Xe_all, He_all = z["Xf"], z["Xe"], z["He"]       # (L, T, d), (L, T, d), (L, T, n) float16
    fam, margs = model_args(files)
    weights = FitWeights(DenseFFN.from_files(files, fam.ffn_spec(margs, files.load_resident()), n_threads=1))
    recall = {v: {} for v in args.variants}
    for l in args.layers:
        Wg, Wu, _ = weights[l]
        Wg, Wu = np.asarray(Wg, np.float32), np.asarray(Wu, np.float32)
        X_fit, X = Xf_all[l].astype(np.float32), Xe_all[l].astype(np.float32)
        true = topk_mask(np.abs(He_all[l].astype(np.float32)), 0.5)
        G = silu(X @ Wg.T)
        S = input_sqrt_cov(X_fit)
        for v in args.variants:
            U = up_estimate(v, Wu, X_fit, S)
            s = np.abs(G) if U is None else np.abs(G * (X @ U.T))
            recall[v][l] = float((true & topk_mask(s, 0.5)).sum() / true.sum())
        print(l, " ".join(f"{v}={recall[v][l]:.3f}" for v in args.variants), flush=True)
    d, n = files.dim, files.n_neurons
    rows = []
    for v in args.variants:
        macs, nbytes = cost(v, d, n)
        vals = [recall[v][l] for l in args.layers]
        rows.append([v, f"{100 * macs:.1f}%", f"{nbytes * files.n_layers / 1e6:.1f}"]
                    + [f"{x:.3f}" for x in vals] + [f"{min(vals):.3f}"])
    table = md_table(["up estimate (exact gate)", "its MACs / dense FFN", "its MB (all layers)"]
                     + [f"layer {l}" for l in args.layers] + ["min"], rows)
    head = (f"{args.model_dir.name}: top-k recall at 50% on {N_EVAL} tokens of Python's reference manual from "
            f"token {SKIP}, ctx {CTX}; low-rank estimates fitted on calibrate's {N_FIT} sampled tokens. The exact "
            f"gate itself costs 33.3% of the FFN's MACs and the gate rows as stored on top of these.")
    print(head + "\n\n" + table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"# Up estimates for gate-first scoring: recall\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
