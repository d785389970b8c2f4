"""Write a mixture-of-experts model at a real model's shape, 4-bit (q4_0), with routing
statistics set by construction: a flashrt model directory and/or a same-shape GGUF for llama.cpp.

    python bench/make_synthetic_moe.py OUT --shape qwen3-30b-a3b           # 48 layers, 128 experts, top-8: ~17 GB
    python bench/make_synthetic_moe.py OUT.gguf --shape qwen3-30b-a3b --gguf  # the same model as a llama GGUF
    python bench/make_synthetic_moe.py OUT --shape tiny                    # 2 layers (tests)

The architecture is flashrt's mixtral family (Llama attention, softmax top-k router with
renormalised weights: what llama.cpp's "llama" architecture runs with expert_count > 0) at the
shape of the named model: Qwen3-30B-A3B's 48 layers, d 2048, 32 query / 4 KV heads of 128,
128 experts of 768 neurons, top-8, vocab 151936 (its per-head q/k norms are omitted: they
cost nothing in bytes).

How routing is made (the numbers every result quotes; `routing.json` holds the simulated
figures below for the written seed):

* Embeddings n_v = sqrt(d) (sqrt(1 - GAMMA^2) g_v + GAMMA c): g_v a random unit vector per
  token, orthogonal to a shared unit direction c. Attention's o_proj and the experts' down
  projections are tiny (scale 2e-5), so every layer's input is ~rmsnorm(n_v) = n_v: routing
  depends on the current token only.
* Router l: R_e = SIGMA / sqrt(1 - GAMMA^2) u_e + b_e / (GAMMA sqrt(d)) c, u_e random unit
  vectors orthogonal to c, so logit_e = SIGMA z_(v,e) + b_e with z ~ N(0, 1) per token and
  expert, and b_e = POPULARITY * N(0, 1) per expert: popular experts win more often.
* The LM head is the embedding times ALPHA: the current token's own logit stands out by
  log(REPEAT / (1 - REPEAT) (V - 1)), so sampling at temperature 1 repeats the current token
  with probability ~REPEAT (and its experts with it) and otherwise draws a uniform new token.
  Token-to-token expert reuse is REPEAT plus the chance overlap of two draws.
  These parameters are chosen, not measured from Qwen3-30B-A3B (no checkpoint at hand):
  SIGMA 1, POPULARITY 0.35 (the top 10% of experts take ~1/4 of the routes: trained
  routers are load-balanced), REPEAT 0.3.
* Every other weight is random q4_0 blocks (values do not change the speed): gate/up rows with
  scale 1/(8 sqrt(d)), q/k/v the same, o_proj and down 2e-5. The GGUF holds the same bytes for
  the embedding, head, routers, attention and the experts' gate/up rows; its down
  projections (stored transposed in GGUF) are other random blocks of the same scale.

Writing streams one layer at a time (flashrt's ModelWriter; gguf's GGUFWriter with tensor
infos first, then each tensor's bytes), generated from per-tensor seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashrt.format.writer import ModelWriter  # noqa: E402
from flashrt.quant import QMatrix, quantize  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(n_layers=48, dim=2048, n_experts=128, top_k=8, expert_neurons=768, n_heads=32,
                          n_kv_heads=4, head_dim=128, vocab=151936),
    "mixtral-8x7b": dict(n_layers=32, dim=4096, n_experts=8, top_k=2, expert_neurons=14336, n_heads=32,
                         n_kv_heads=8, head_dim=128, vocab=32000),
    "tiny": dict(n_layers=2, dim=64, n_experts=8, top_k=2, expert_neurons=64, n_heads=4, n_kv_heads=2,
                 head_dim=16, vocab=512),
}
GAMMA, SIGMA, POPULARITY, REPEAT = 0.5, 1.0, 0.35, 0.3


def popularity():
    return float(os.environ.get("FLASHRT_MOE_POPULARITY", POPULARITY))
SMALL = 2e-5           # o_proj and down: the residual stream stays the embedding
Q4_0_BLOCK = 18        # bytes per 32 weights: fp16 scale + 16 bytes of nibbles


def config_of(s):
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": s["dim"],
            "intermediate_size": s["expert_neurons"], "num_hidden_layers": s["n_layers"],
            "num_attention_heads": s["n_heads"], "num_key_value_heads": s["n_kv_heads"], "head_dim": s["head_dim"],
            "num_local_experts": s["n_experts"], "num_experts_per_tok": s["top_k"], "vocab_size": s["vocab"],
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def _rng(seed, *key):
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def random_q4_0(seed, key, rows, k, scale):
    """(rows, k / 32 * 18) uint8 q4_0 blocks: random nibbles with mean 8 (weights (q - 8) * scale of
    mean 0: a nibble 0 becomes 8), every block's scale `scale`. A biased mean (uniform nibbles
    average -0.5) would add the same vector in every layer and attention would amplify it."""
    b = np.frombuffer(_rng(seed, *key).bytes(rows * (k // 32) * Q4_0_BLOCK), np.uint8).copy()
    lo, hi = b & 15, b >> 4
    lo[lo == 0] = 8
    hi[hi == 0] = 8
    b = (lo | (hi << 4)).reshape(rows, k // 32, Q4_0_BLOCK)
    b[:, :, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return b.reshape(rows, -1)


def shared_direction(seed, d):
    c = _rng(seed, "c").standard_normal(d)
    return c / np.linalg.norm(c)


def _orth_units(g, c):
    g -= np.outer(g @ c, c)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g


def embedding_rows(seed, s, lo, hi, c):
    """n_v for tokens lo..hi-1, float32 (hi - lo, d)."""
    d = s["dim"]
    g = _orth_units(_rng(seed, "embed", lo).standard_normal((hi - lo, d)), c)
    return (np.sqrt(d) * (np.sqrt(1 - GAMMA ** 2) * g + GAMMA * c)).astype(np.float32)


def embedding_blocks(seed, s, c, chunk=8192):
    return np.concatenate([quantize(embedding_rows(seed, s, lo, min(s["vocab"], lo + chunk), c), "q4_0")
                           for lo in range(0, s["vocab"], chunk)])


def head_alpha(s):
    return float(np.log(REPEAT / (1 - REPEAT) * (s["vocab"] - 1)) / (s["dim"] * (1 - GAMMA ** 2)))


def scaled_blocks(blocks, factor):
    out = blocks.copy().reshape(blocks.shape[0], -1, Q4_0_BLOCK)
    scales = out[:, :, :2].copy().view(np.float16).astype(np.float32) * factor
    out[:, :, :2] = scales.astype(np.float16).view(np.uint8).reshape(out.shape[0], out.shape[1], 2)
    return out.reshape(blocks.shape)


def router(seed, s, layer, c):
    """(n_experts, d) float32: SIGMA / sqrt(1 - GAMMA^2) u_e + b_e / (GAMMA sqrt(d)) c."""
    d, E = s["dim"], s["n_experts"]
    rng = _rng(seed, "router", layer)
    u = _orth_units(rng.standard_normal((E, d)), c)
    b = popularity() * rng.standard_normal(E)
    return (SIGMA / np.sqrt(1 - GAMMA ** 2) * u + np.outer(b / (GAMMA * np.sqrt(d)), c)).astype(np.float32)


def attention_blocks(seed, s, layer):
    d, hd = s["dim"], s["head_dim"]
    q_dim, kv_dim = s["n_heads"] * hd, s["n_kv_heads"] * hd
    big = 1.0 / (8 * np.sqrt(d))
    return {"q_proj": random_q4_0(seed, ("q", layer), q_dim, d, big),
            "k_proj": random_q4_0(seed, ("k", layer), kv_dim, d, big),
            "v_proj": random_q4_0(seed, ("v", layer), kv_dim, d, big),
            "o_proj": random_q4_0(seed, ("o", layer), d, q_dim, SMALL)}


def expert_rows(seed, s, layer, e, part):
    """gate/up rows (n, d) of expert e as q4_0 blocks (the same in both files)."""
    return random_q4_0(seed, (part, layer, e), s["expert_neurons"], s["dim"], 1.0 / (8 * np.sqrt(s["dim"])))


# ------------------------------------------------------------------ routing statistics
def simulate_routing(seed, s, n_tokens=2000, caches=(8, 16, 32, 48, 64, 96, 128)):
    """The routes of a REPEAT-sticky token stream through the constructed routers (float weights):
    per-expert popularity, token-to-token reuse, and each per-layer LRU cache size's hit rate."""
    rng = _rng(seed, "simulate")
    c = shared_direction(seed, s["dim"])
    toks = [int(rng.integers(s["vocab"]))]
    for _ in range(n_tokens - 1):
        toks.append(toks[-1] if rng.random() < REPEAT else int(rng.integers(s["vocab"])))
    d = s["dim"]
    g = _orth_units(np.random.default_rng([seed, 7]).standard_normal((n_tokens, d)), c)  # one vector per distinct token
    uniq = {t: i for i, t in enumerate(dict.fromkeys(toks))}
    x = (np.sqrt(d) * (np.sqrt(1 - GAMMA ** 2) * g[:len(uniq)] + GAMMA * c))[[uniq[t] for t in toks]]
    k, E = s["top_k"], s["n_experts"]
    share_top10, reuse, hits = [], [], {C: 0 for C in caches if C <= E}
    for layer in range(min(s["n_layers"], 8)):
        routes = np.argsort(-(x @ router(seed, s, layer, c).T), axis=1)[:, :k]      # (T, k)
        counts = np.sort(np.bincount(routes.ravel(), minlength=E))[::-1]
        share_top10.append(counts[:max(1, E // 10)].sum() / counts.sum())
        reuse.append(np.mean([len(set(routes[t]) & set(routes[t - 1])) / k for t in range(1, n_tokens)]))
        for C in hits:
            lru, h = [], 0
            for t in range(n_tokens):
                for e in routes[t]:
                    if e in lru:
                        h += 1
                        lru.remove(e)
                    elif len(lru) >= C:
                        lru.pop(0)
                    lru.append(e)
            hits[C] += h
    n_layers_sim = min(s["n_layers"], 8)
    return {"n_tokens": n_tokens, "layers_simulated": n_layers_sim, "repeat": REPEAT, "sigma": SIGMA,
            "popularity": popularity(), "top10pct_experts_share_of_routes": float(np.mean(share_top10)),
            "uniform_share_would_be": max(1, E // 10) / E,
            "token_to_token_expert_reuse": float(np.mean(reuse)), "chance_reuse_would_be": k / E,
            "lru_hit_rate_by_cache_experts": {C: h / (n_tokens * k * n_layers_sim) for C, h in hits.items()}}


# ------------------------------------------------------------------ writers
def write_flashrt(out, s, seed, overwrite=False, progress=True):
    d, n, E = s["dim"], s["expert_neurons"], s["n_experts"]
    c = shared_direction(seed, d)
    t0 = time.time()
    with ModelWriter(out, "mixtral", config_of(s), "q4_0", overwrite=overwrite,
                     source={"kind": "synthetic-moe", "seed": seed, "shape": s}) as w:
        emb = embedding_blocks(seed, s, c)
        w.add_resident("model.embed_tokens.weight", QMatrix(emb, "q4_0"))
        w.add_resident("lm_head.weight", QMatrix(scaled_blocks(emb, head_alpha(s)), "q4_0"))
        del emb
        w.add_resident("model.norm.weight", np.ones(d, np.float32))
        for l in range(s["n_layers"]):
            p = f"model.layers.{l}."
            w.add_resident(p + "input_layernorm.weight", np.ones(d, np.float32))
            w.add_resident(p + "post_attention_layernorm.weight", np.ones(d, np.float32))
            for name, b in attention_blocks(seed, s, l).items():
                w.add_resident(p + f"self_attn.{name}.weight", QMatrix(b, "q4_0"))
            w.add_resident(p + "block_sparse_moe.gate.weight", router(seed, s, l, c))
            rows = np.empty((E * n, 3 * (d // 32) * Q4_0_BLOCK), np.uint8)  # expert-major neuron rows
            rb = (d // 32) * Q4_0_BLOCK
            for e in range(E):
                r = rows[e * n:(e + 1) * n]
                r[:, :rb] = expert_rows(seed, s, l, e, "gate")
                r[:, rb:2 * rb] = expert_rows(seed, s, l, e, "up")
                r[:, 2 * rb:] = random_q4_0(seed, ("down", l, e), n, d, SMALL)
            w.add_ffn_layer(l, rows)
            del rows
            if progress:
                print(f"  layer {l + 1}/{s['n_layers']} ({time.time() - t0:.0f} s)", flush=True)
        return w.commit()


def add_placeholder_vocab(w, V) -> None:
    """A placeholder BPE vocabulary of V tokens on GGUFWriter w (llama.cpp takes n_vocab from it;
    the benches feed token ids, never text)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["<unk>", "<s>", "</s>", "t", "5"] + [f"t{i}" for i in range(5, V)])
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["t 5"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(out, s, seed, progress=True):
    """The same model as a llama-architecture GGUF (expert_count, ffn_*_exps), tokenizer "none"."""
    import gguf

    Q = gguf.GGMLQuantizationType.Q4_0
    d, n, E, V = s["dim"], s["expert_neurons"], s["n_experts"], s["vocab"]
    hd = s["head_dim"]
    c = shared_direction(seed, d)
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_block_count(s["n_layers"])
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(n)
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_expert_count(E)
    w.add_expert_used_count(s["top_k"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    add_placeholder_vocab(w, V)
    rb = lambda k: k // 32 * Q4_0_BLOCK  # noqa: E731
    q_dim, kv_dim = s["n_heads"] * hd, s["n_kv_heads"] * hd
    plan = [("token_embd.weight", (V, rb(d)), Q, lambda: embedding_blocks(seed, s, c)),
            ("output_norm.weight", (d,), None, lambda: np.ones(d, np.float32)),
            ("output.weight", (V, rb(d)), Q, lambda: scaled_blocks(embedding_blocks(seed, s, c), head_alpha(s)))]
    for l in range(s["n_layers"]):
        att = lambda l=l: attention_blocks(seed, s, l)  # noqa: E731
        plan += [(f"blk.{l}.attn_norm.weight", (d,), None, lambda: np.ones(d, np.float32)),
                 (f"blk.{l}.ffn_norm.weight", (d,), None, lambda: np.ones(d, np.float32)),
                 (f"blk.{l}.attn_q.weight", (q_dim, rb(d)), Q, lambda att=att: att()["q_proj"]),
                 (f"blk.{l}.attn_k.weight", (kv_dim, rb(d)), Q, lambda att=att: att()["k_proj"]),
                 (f"blk.{l}.attn_v.weight", (kv_dim, rb(d)), Q, lambda att=att: att()["v_proj"]),
                 (f"blk.{l}.attn_output.weight", (d, rb(q_dim)), Q, lambda att=att: att()["o_proj"]),
                 (f"blk.{l}.ffn_gate_inp.weight", (E, d), None,
                  lambda l=l: router(seed, s, l, c).astype(np.float16).astype(np.float32)),
                 (f"blk.{l}.ffn_gate_exps.weight", (E, n, rb(d)), Q,
                  lambda l=l: np.stack([expert_rows(seed, s, l, e, "gate") for e in range(E)])),
                 (f"blk.{l}.ffn_up_exps.weight", (E, n, rb(d)), Q,
                  lambda l=l: np.stack([expert_rows(seed, s, l, e, "up") for e in range(E)])),
                 (f"blk.{l}.ffn_down_exps.weight", (E, d, rb(n)), Q,
                  lambda l=l: np.stack([random_q4_0(seed, ("gdown", l, e), d, n, SMALL) for e in range(E)]))]
    for name, shape, qt, _ in plan:
        dt = np.dtype(np.uint8 if qt is not None else np.float32)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.time()
    for i, (name, shape, qt, make) in enumerate(plan):
        a = np.ascontiguousarray(make()).reshape(shape)
        w.write_tensor_data(a)
        if progress and name.endswith("ffn_down_exps.weight"):
            print(f"  {name} ({time.time() - t0:.0f} s)", flush=True)
    w.close()
    return Path(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", action="store_true", help="write the llama.cpp GGUF instead of a flashrt directory")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--stats-only", action="store_true", help="print the simulated routing statistics only")
    a = ap.parse_args()
    s = SHAPES[a.shape]
    stats = simulate_routing(a.seed, s)
    print(json.dumps(stats, indent=1))
    if a.stats_only:
        return
    t0 = time.time()
    if a.gguf:
        out = write_gguf(a.out, s, a.seed)
    else:
        out = write_flashrt(a.out, s, a.seed, a.overwrite)
        (Path(out) / "routing.json").write_text(json.dumps(stats, indent=1) + "\n")
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) if Path(out).is_dir() else Path(out).stat().st_size
    print(f"{out}: {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
