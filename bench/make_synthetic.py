"""Write an OPT-shaped flashrt model with realistic ReLU activation sparsity, plus its predictors.

    python bench/make_synthetic.py OUT --shape opt-6.7b     # 32 layers, d 4096, FFN 16384, fp16, ~13 GB
    python bench/make_synthetic.py OUT --shape opt-1.3b     # 24 layers, d 2048, FFN 8192, ~3 GB
    python bench/make_synthetic.py OUT --shape opt-13b --dtype q4_0   # 40 layers, d 5120, FFN 20480, ~7 GB (fp16 ~25 GB)
    python bench/make_synthetic.py OUT --shape tiny         # 2 layers, d 128 (tests)
    python bench/make_synthetic.py OUT --shape drelu-llama-7b   # Llama-2-7B shape with a dReLU FFN, ~13 GB
    python bench/make_synthetic.py OUT --shape drelu-tiny       # its 2-layer miniature (tests)

How the activations are made (the numbers every result quotes):

* The residual stream is dominated by the embeddings: h_t = p_t + e_tok, scaled by
  EMBED_SCALE so that attention (out_proj scaled by ATTN_OUT_SCALE) and FFN outputs
  (fc2 entries ~ DOWN_SCALE) barely move it. Every layer's FFN input is then
  x_t = LayerNorm(p_t + e_tok).
* Both embeddings live mostly in an r-dimensional latent subspace Q (d, r) orthonormal:
  p_t = E * sqrt(position_share) * Q s_t with s_t an AR(1) walk over positions
  (s_{t+1} = rho s_t + sqrt(1-rho^2) xi: consecutive tokens share most of their latent
  state), and e_v = E * (sqrt(1 - position_share) * Q c_v + gamma m_v) with c_v ~ N(0, I_r)
  token-specific and m_v a full-rank part orthogonal to Q. So Q^T x_t = kappa * L_t with
  L_t = sqrt(pos) s_t + sqrt(1-pos) c_tok (unit variance per coordinate).
* fc1 rows are low rank + noise: w_i = Q u_i / kappa + eps_i with |u_i| = 1 (per layer U),
  eps_i ~ N(0, noise^2 / d): the pre-activation is u_i . L_t + eps_i . x_t + b_i with a
  predictable part of variance 1 and an unpredictable part of variance noise^2.
* fc1 biases are negative per neuron, b_i = -sqrt(1 + noise^2) * Phi^-1(1 - rate_i), so
  neuron i fires with probability rate_i; rates are log-normal (spread rate_spread),
  normalised to mean_rate (3%: OPT-6.7B is ~97% sparse per token).
* The predictor of each layer is exact for the predictable part by construction:
  A = Q^T / kappa (r, d), B = U (n, r), bias = b + margin, threshold 0 (score > 0 fires);
  the margin is set on 64 sampled tokens so that the predictor finds target_recall (95%)
  of the active neurons; the noise then costs false positives (paper: ~5% FN, ~7% FP).
* rho, position_share and noise were tuned in a simulation of this construction so that a
  window of k=5 holds ~24% of the FFN and reads ~2.4% per token (the paper's figures).
* Attention matrices are random float16 slices of one N(0, 1/d) pool (values do not matter
  for speed); vocab is small (1024) and the LM head is untied with small weights, so
  sampling at temperature 1 wanders over the vocabulary instead of repeating a token.

The dReLU-Llama shapes (a TurboSparse / Bamboo FFN, h = relu(gate.x) * relu(up.x), on Llama-2-7B's
dims; model_type "bamboo" in the Llama family, see build_drelu_llama) reuse that construction:
* No learned positions (RoPE): the latent walk runs over the vocabulary instead, c_v = S[v]
  (AR(1) in v), and the untied LM head row w is the normalised embedding of token w - 1, scaled
  so that sampling at temperature 1 nearly always continues v -> v + 1. Decoding walks the
  vocabulary, and consecutive tokens share most of their latent state as in the OPT shape.
* No FFN biases: every embedding carries a constant component along a unit direction m
  orthogonal to Q, so x . m is ~ the same mu for every token; a gate row adds (b_i / mu) m,
  which acts as the bias b_i. The gate fires with rate_i (mean GATE_RATE); the up rows are
  noise plus a small m component (P(up.x > 0) ~ UP_POSITIVE), so ~90% of the neurons are exactly
  zero per token (TurboSparse-Mistral's figure). The predictor is the gate's exact low-rank part
  (kind "relu": it predicts the gate firing; the up sign it cannot see costs reads).

Writing is streamed layer by layer through flashrt.format.writer.ModelWriter (one layer's
float32 work arrays in RAM at a time; the resident tensors, ~1/3 of the model, are held
until commit as the writer requires).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashrt.format.writer import ModelWriter, register_file  # noqa: E402
from flashrt.predictor import LowRankPredictor, PredictorSet  # noqa: E402

SHAPES = {
    "opt-6.7b": dict(n_layers=32, dim=4096, n_neurons=16384, n_heads=32, vocab=1024, rank=64),
    "opt-1.3b": dict(n_layers=24, dim=2048, n_neurons=8192, n_heads=32, vocab=1024, rank=64),
    "opt-13b": dict(n_layers=40, dim=5120, n_neurons=20480, n_heads=40, vocab=1024, rank=64),
    "tiny": dict(n_layers=2, dim=128, n_neurons=512, n_heads=4, vocab=256, rank=16),
    "drelu-llama-7b": dict(n_layers=32, dim=4096, n_neurons=11008, n_heads=32, vocab=1024, rank=64),
    "drelu-tiny": dict(n_layers=2, dim=128, n_neurons=512, n_heads=4, vocab=256, rank=16),
}
GATE_RATE = 0.18         # dReLU shapes: mean gate firing rate
UP_POSITIVE = 0.55       # dReLU shapes: share of tokens with up.x > 0, per neuron
HEAD_GAP = 12.0          # dReLU shapes: logit of the next token (v + 1) above its own row
ACTIVATION = dict(mean_rate=0.03, rate_spread=1.0, rho=0.9, position_share=0.8, noise=0.5,
                  noise_energy=1.0, target_recall=0.95)
EMBED_SCALE = 400.0     # residual stream size: attention and FFN outputs are ~1e-5 of it
ATTN_OUT_SCALE = 0.1    # out_proj entries ~ N(0, (0.1 / sqrt(d))^2)
DOWN_SCALE = 0.02       # fc2 entries ~ N(0, 0.02^2)
HEAD_SCALE = 0.01       # untied LM head entries: logits ~ N(0, 0.64): sampling wanders
MAX_POSITIONS = 2048


def _inv_cdf(p):
    nd = NormalDist()
    return np.array([nd.inv_cdf(float(q)) for q in p])


def _ar_walk(rng, n_steps, r, rho):
    """(n_steps, r) stationary AR(1), unit variance per coordinate."""
    s = np.empty((n_steps, r), np.float32)
    cur = rng.standard_normal(r)
    c = np.sqrt(1.0 - rho * rho)
    for t in range(n_steps):
        s[t] = cur
        cur = rho * cur + c * rng.standard_normal(r)
    return s


def _layer_norm(h):
    h = h - h.mean(axis=-1, keepdims=True)
    return h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + 1e-5)


def _tokenizer(vocab):
    """A word-level tokenizer: token i is the word `w{i}` (prompts: 'w12 w7 w300')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"\u2581w{i}": i for i in range(vocab)}, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    cfg = {"chat_template": None, "bos_token": None, "eos_token": None, "add_bos_token": False,
           "bos_token_id": None, "eos_token_ids": []}
    return tok.to_str(), cfg


def window_stats(sel, ks=(1, 5)):
    """sel (T, n) bool selections of consecutive tokens -> {k: (held, new)} shares."""
    out = {}
    T, n = sel.shape
    for k in ks:
        held, new = [], []
        for t in range(k - 1, T):
            prev = sel[t - k + 1:t].any(axis=0) if k > 1 else np.zeros(n, bool)
            held.append((prev | sel[t]).mean())
            new.append((sel[t] & ~prev).mean())
        out[k] = (float(np.mean(held)), float(np.mean(new)))
    return out


def _predictor_report(score0, fires, margin, target_recall):
    """(margin, report) for a predictor's margin-0 scores (T, n) against the neurons that
    fire (T, n) bool: margin (None: the one that reaches target_recall, fitted on this layer
    and then kept for the others), and what selecting score0 + margin > 0 gives (active and
    selected shares, recall, false-positive rate, the k=1 and k=5 window statistics)."""
    if margin is None:
        margin = float(-np.quantile(score0[fires], 1.0 - target_recall))
    sel = score0 + margin > 0
    tp = (sel & fires).sum()
    rep = dict(active=float(fires.mean()), selected=float(sel.mean()), recall=float(tp / max(fires.sum(), 1)),
               fp_rate=float((sel & ~fires).sum() / max((~fires).sum(), 1)))
    ws = window_stats(sel)
    rep.update(held_k5=ws[5][0], new_k5=ws[5][1], new_k1=ws[1][1])
    return margin, rep


def build(out, shape="opt-6.7b", seed=0, overwrite=False, act=None, quiet=False, dtype="float16"):
    if shape.startswith("drelu"):
        return build_drelu_llama(out, shape, seed, overwrite, act, quiet, dtype)
    sh = SHAPES[shape]
    a = dict(ACTIVATION, **(act or {}))
    L, d, n, H, V, r = (sh[k] for k in ("n_layers", "dim", "n_neurons", "n_heads", "vocab", "rank"))
    rng = np.random.default_rng(seed)
    log = (lambda *x: None) if quiet else (lambda *x: print(*x, flush=True))
    t_start = time.perf_counter()

    Q = np.linalg.qr(rng.standard_normal((d, r)))[0].astype(np.float32)          # (d, r) orthonormal
    g = a["noise_energy"]
    gamma = np.sqrt(g * r / (d - r))
    kappa = np.sqrt(d / (r * (1.0 + g)))
    pos = a["position_share"]

    def perp(M):
        return M - (M @ Q) @ Q.T

    C = rng.standard_normal((V, r)).astype(np.float32)                            # (V, r) token latents
    M = perp(rng.standard_normal((V, d)).astype(np.float32))                      # (V, d) full-rank part
    embed = EMBED_SCALE * (np.sqrt(1 - pos) * C @ Q.T + gamma * M)                 # (V, d)
    S = _ar_walk(rng, MAX_POSITIONS + 2, r, a["rho"])                              # (P, r)
    positions = EMBED_SCALE * np.sqrt(pos) * S @ Q.T                              # (P, d)

    # one float32 noise pool; every noise matrix is a slice at a random offset
    pool_n = int(max(d * d, n * d) * 5 // 4)
    pool = rng.standard_normal(pool_n, dtype=np.float32)

    def noise(shape_, scale):
        k = int(np.prod(shape_))
        off = int(rng.integers(0, pool_n - k))
        return pool[off:off + k].reshape(shape_) * np.float32(scale)

    attn16 = (pool[: 2 * d * d] / np.sqrt(d)).astype(np.float16)                   # (2 d^2,) N(0, 1/d)
    out16 = (attn16 * np.float16(ATTN_OUT_SCALE)).astype(np.float16)

    def attn_matrix(src):
        off = int(rng.integers(0, d * d))
        return src[off:off + d * d].reshape(d, d)                                  # a view: no copy

    config = {"model_type": "opt", "hidden_size": d, "ffn_dim": n, "num_hidden_layers": L,
              "num_attention_heads": H, "vocab_size": V, "max_position_embeddings": MAX_POSITIONS,
              "activation_function": "relu", "do_layer_norm_before": True, "word_embed_proj_dim": d,
              "tie_word_embeddings": False, "enable_bias": True, "layer_norm_elementwise_affine": True,
              "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float16"}
    source = {"kind": "synthetic", "shape": shape, "seed": seed, "rank": r, **a,
              "embed_scale": EMBED_SCALE, "attn_out_scale": ATTN_OUT_SCALE, "down_scale": DOWN_SCALE}

    # calibration tokens: the inputs every layer's FFN sees, built as the model builds them
    T_cal = 64
    cal_tokens = rng.integers(0, V, T_cal)
    p0 = int(rng.integers(2, MAX_POSITIONS + 2 - T_cal))
    X = _layer_norm(embed[cal_tokens] + positions[p0:p0 + T_cal]).astype(np.float32)  # (T, d)
    A_pred = np.ascontiguousarray(Q.T / kappa, np.float32)                        # (r, d)

    preds, layer_report = [], []
    margin = None
    dp = "model.decoder."
    source["storage"] = dtype        # float16, or a quantized type the writer quantizes to
    with ModelWriter(out, "opt", config, dtype, overwrite=overwrite, source=source) as w:
        w.add_resident(dp + "embed_tokens.weight", embed)
        w.add_resident(dp + "embed_positions.weight", positions)
        w.add_resident("lm_head.weight", rng.standard_normal((V, d), dtype=np.float32) * HEAD_SCALE)
        w.add_resident(dp + "final_layer_norm.weight", np.ones(d, np.float32))
        w.add_resident(dp + "final_layer_norm.bias", np.zeros(d, np.float32))
        zeros = np.zeros(d, np.float32)
        bundle = np.empty((n, 2 * d), np.float16)                                  # (n_neurons, 2 * dim)
        for l in range(L):
            t0 = time.perf_counter()
            p = f"{dp}layers.{l}."
            for name in ("q_proj", "k_proj", "v_proj"):
                w.add_resident(p + f"self_attn.{name}.weight", attn_matrix(attn16))
                w.add_resident(p + f"self_attn.{name}.bias", zeros)
            w.add_resident(p + "self_attn.out_proj.weight", attn_matrix(out16))
            w.add_resident(p + "self_attn.out_proj.bias", zeros)
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                w.add_resident(p + f"{ln}.weight", np.ones(d, np.float32))
                w.add_resident(p + f"{ln}.bias", zeros)

            U = rng.standard_normal((n, r), dtype=np.float32)
            U /= np.linalg.norm(U, axis=1, keepdims=True)                          # (n, r) unit rows
            rate = np.exp(rng.normal(0.0, a["rate_spread"], n))
            rate = np.clip(rate * (a["mean_rate"] / rate.mean()), 1e-4, 0.5)
            b1 = (-np.sqrt(1 + a["noise"] ** 2) * _inv_cdf(1.0 - rate)).astype(np.float32)   # (n,)
            W1 = (U / np.float32(kappa)) @ Q.T                                     # (n, d)
            W1 += noise((n, d), a["noise"] / np.sqrt(d))
            bundle[:, :d] = W1
            bundle[:, d:] = noise((n, d), DOWN_SCALE)                              # fc2.weight.T (n, d)
            w.add_resident(p + "fc1.bias", b1)
            w.add_resident(p + "fc2.bias", zeros)

            # predictor: exact low-rank part; margin for target recall (set on layer 0)
            true_pre = X @ W1.T + b1                                               # (T, n)
            score0 = (X @ A_pred.T) @ U.T + b1                                     # (T, n) margin 0
            fires = true_pre > 0
            margin, rep = _predictor_report(score0, fires, margin, a["target_recall"])
            layer_report.append(rep)
            preds.append(LowRankPredictor("relu", A_pred, U, bias=b1 + np.float32(margin), threshold=0.0))
            w.add_ffn_layer(l, bundle)
            log(f"layer {l + 1}/{L}: active {rep['active']:.3f}, predictor selects {rep['selected']:.3f} "
                f"(recall {rep['recall']:.3f}, FP rate {rep['fp_rate']:.3f}), k=5 holds {rep['held_k5']:.3f} "
                f"reads {rep['new_k5']:.4f}; {time.perf_counter() - t0:.1f} s")
        w.add_tokenizer(*_tokenizer(V))
        w.commit()
    del pool, attn16, out16, bundle

    return _finish(out, preds, layer_report, margin, source, log, t_start)


def _finish(out, preds, layer_report, margin, source, log, t_start):
    """The builders' last step: the constructed predictors and their designed statistics saved
    with the model (predictors.npz, synthetic.json), ffn.bin dropped from the page cache."""
    summary = {k: float(np.mean([rep[k] for rep in layer_report])) for k in layer_report[0]}
    info = {"source": "bench/make_synthetic.py (constructed, not fitted)", "margin": margin,
            "summary_on_64_designed_tokens": summary, "layers": layer_report, **source}
    PredictorSet(preds, info=info).save(out)
    register_file(out, "predictors.npz")
    (Path(out) / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")
    try:  # the file just written sits in the page cache: ask the kernel to drop it
        fd = os.open(Path(out) / "ffn.bin", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        pass
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s; designed statistics (mean over layers): "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return Path(out)


def _rms_norm(h):
    return h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + 1e-5)


def build_drelu_llama(out, shape="drelu-llama-7b", seed=0, overwrite=False, act=None, quiet=False,
                      dtype="float16"):
    """A Llama-family model (model_type bamboo: dReLU FFN) with designed sparsity; see the module
    docstring. Same latent construction as build(); predictors constructed, not fitted."""
    sh = SHAPES[shape]
    a = dict(ACTIVATION, **(act or {}))
    L, d, n, H, V, r = (sh[k] for k in ("n_layers", "dim", "n_neurons", "n_heads", "vocab", "rank"))
    rng = np.random.default_rng(seed)
    log = (lambda *x: None) if quiet else (lambda *x: print(*x, flush=True))
    t_start = time.perf_counter()

    Q = np.linalg.qr(rng.standard_normal((d, r + 1)))[0].astype(np.float32)      # (d, r + 1) orthonormal
    Q, m = np.ascontiguousarray(Q[:, :r]), Q[:, r]                                # latent space, bias direction
    g = a["noise_energy"]
    gamma = np.sqrt(g * r / (d - r - 1))

    def perp(M):
        M = M - (M @ Q) @ Q.T
        return M - np.outer(M @ m, m)

    S = _ar_walk(rng, V, r, a["rho"])                                             # (V, r) latent walk over v
    M = perp(rng.standard_normal((V, d)).astype(np.float32))                      # (V, d) full-rank part
    beta = 0.5                                                                    # the constant part along m
    embed = EMBED_SCALE * (S @ Q.T + gamma * M + beta * np.sqrt(r) * m)           # (V, d)
    X_all = _rms_norm(embed).astype(np.float32)                                   # (V, d) FFN inputs, ~exact
    kappa = float(np.mean(np.linalg.norm(X_all @ Q, axis=1)) / np.sqrt(r))        # Q^T x ~ kappa * latent
    mu = float(np.mean(X_all @ m))                                                # x . m, ~ the same for all v
    unit = embed / np.linalg.norm(embed, axis=1, keepdims=True)
    head = np.roll(unit, 1, axis=0) * np.float32(HEAD_GAP / np.sqrt(d) / (1 - a["rho"]))   # row w: token w - 1

    pool_n = int(max(d * d, n * d) * 5 // 4)
    pool = rng.standard_normal(pool_n, dtype=np.float32)

    def noise(shape_, scale):
        k = int(np.prod(shape_))
        off = int(rng.integers(0, pool_n - k))
        return pool[off:off + k].reshape(shape_) * np.float32(scale)

    attn16 = (pool[: 2 * d * d] / np.sqrt(d)).astype(np.float16)                   # (2 d^2,) N(0, 1/d)
    out16 = (attn16 * np.float16(ATTN_OUT_SCALE)).astype(np.float16)

    def attn_matrix(src):
        off = int(rng.integers(0, d * d))
        return src[off:off + d * d].reshape(d, d)

    config = {"model_type": "bamboo", "architectures": ["BambooForCausalLM"], "hidden_size": d,
              "intermediate_size": n, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": H,
              "vocab_size": V, "max_position_embeddings": MAX_POSITIONS, "hidden_act": "relu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float16"}
    source = {"kind": "synthetic", "shape": shape, "seed": seed, "rank": r, **a, "gate_rate": GATE_RATE,
              "up_positive": UP_POSITIVE, "embed_scale": EMBED_SCALE, "attn_out_scale": ATTN_OUT_SCALE,
              "down_scale": DOWN_SCALE, "storage": dtype}

    # calibration tokens: a stretch of the walk the decode follows (v, v + 1, ...)
    T_cal = 64
    v0 = int(rng.integers(0, V - T_cal))
    X = X_all[v0:v0 + T_cal]                                                      # (T, d)
    A_pred = np.ascontiguousarray(Q.T / kappa, np.float32)                        # (r, d)
    z_up = NormalDist().inv_cdf(UP_POSITIVE)

    preds, layer_report = [], []
    margin = None
    ones = np.ones(d, np.float32)
    with ModelWriter(out, "llama", config, dtype, overwrite=overwrite, source=source) as w:
        w.add_resident("model.embed_tokens.weight", embed)
        w.add_resident("lm_head.weight", head)
        w.add_resident("model.norm.weight", ones)
        bundle = np.empty((n, 3 * d), np.float16)                                  # (n_neurons, 3 * dim)
        for l in range(L):
            t0 = time.perf_counter()
            p = f"model.layers.{l}."
            for name in ("q_proj", "k_proj", "v_proj"):
                w.add_resident(p + f"self_attn.{name}.weight", attn_matrix(attn16))
            w.add_resident(p + "self_attn.o_proj.weight", attn_matrix(out16))
            w.add_resident(p + "input_layernorm.weight", ones)
            w.add_resident(p + "post_attention_layernorm.weight", ones)

            U = rng.standard_normal((n, r), dtype=np.float32)
            U /= np.linalg.norm(U, axis=1, keepdims=True)                          # (n, r) unit rows
            rate = np.exp(rng.normal(0.0, a["rate_spread"], n))
            rate = np.clip(rate * (GATE_RATE / rate.mean()), 1e-4, 0.6)
            b = (-np.sqrt(1 + a["noise"] ** 2) * _inv_cdf(1.0 - rate)).astype(np.float32)   # (n,) gate "bias"
            Wg = (U / np.float32(kappa)) @ Q.T + np.outer(b / mu, m)               # (n, d)
            Wg += noise((n, d), a["noise"] / np.sqrt(d))
            Wu = noise((n, d), 1.0 / np.sqrt(d)) + np.float32(z_up / mu) * m       # P(up.x > 0) ~ UP_POSITIVE
            bundle[:, :d] = Wg
            bundle[:, d:2 * d] = Wu
            bundle[:, 2 * d:] = noise((n, d), DOWN_SCALE)                          # down.weight.T (n, d)

            g_true, u_true = X @ Wg.T, X @ Wu.T                                    # (T, n)
            fires = (g_true > 0) & (u_true > 0)                                    # dReLU: both
            score0 = (X @ A_pred.T) @ U.T + b                                      # (T, n) margin 0
            margin, rep = _predictor_report(score0, fires, margin, a["target_recall"])
            rep["gate_fires"] = float((g_true > 0).mean())
            layer_report.append(rep)
            preds.append(LowRankPredictor("relu", A_pred, U, bias=b + np.float32(margin), threshold=0.0))
            w.add_ffn_layer(l, bundle)
            log(f"layer {l + 1}/{L}: active {rep['active']:.3f} (gate {rep['gate_fires']:.3f}), predictor selects "
                f"{rep['selected']:.3f} (recall {rep['recall']:.3f}), k=5 holds {rep['held_k5']:.3f} reads "
                f"{rep['new_k5']:.4f}; {time.perf_counter() - t0:.1f} s")
        w.add_tokenizer(*_tokenizer(V))
        w.commit()
    del pool, attn16, out16, bundle
    return _finish(out, preds, layer_report, margin, source, log, t_start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output model directory")
    ap.add_argument("--shape", default="opt-6.7b", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--dtype", default="float16", choices=["float16", "q8_0", "q4_0", "q4_1"],
                    help="storage type (quantized: the same weights, quantized by the writer)")
    args = ap.parse_args()
    build(args.out, args.shape, args.seed, args.overwrite, dtype=args.dtype)


if __name__ == "__main__":
    main()
