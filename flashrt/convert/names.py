"""Name-map tables: which tensors a model has (HF names, HF shapes) and GGUF -> HF names."""
from __future__ import annotations

import re

# -- GGUF (llama.cpp) -> Hugging Face, llama architecture --------------------------------
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
# GGUF tensors that carry nothing flashrt needs (precomputed rotary tables).
GGUF_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf(name: str):
    """The HF name of a GGUF tensor of the llama architecture, or None when unknown."""
    m = _BLK.match(name)
    if m:
        key = "blk.{}." + m.group(2)
        return GGUF_TO_HF[key].format(m.group(1)) if key in GGUF_TO_HF else None
    return GGUF_TO_HF.get(name)


# -- Hugging Face checkpoints ---------------------------------------------------------
# Tensors some checkpoints carry that are recomputed at run time.
HF_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def normalize_hf_name(name: str, model_type: str) -> str:
    """HF OPT checkpoints may lack the `model.` prefix (`decoder.layers...`): add it."""
    if model_type == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


def llama_tensors(config: dict):
    """Expected tensors of a Llama-family model.

    Returns (resident {name: shape}, ffn [per layer {part: (name, shape)}]).
    """
    d = config["hidden_size"]
    n_ff = config["intermediate_size"]
    hd = config["head_dim"]
    q_dim = config["num_attention_heads"] * hd
    kv_dim = config["num_key_value_heads"] * hd
    qkv_bias = config.get("model_type") == "qwen2"
    resident = {"model.embed_tokens.weight": (config["vocab_size"], d),
                "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        resident["lm_head.weight"] = (config["vocab_size"], d)
    ffn = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        resident[p + "input_layernorm.weight"] = (d,)
        resident[p + "post_attention_layernorm.weight"] = (d,)
        resident[p + "self_attn.q_proj.weight"] = (q_dim, d)
        resident[p + "self_attn.k_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.v_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.o_proj.weight"] = (d, q_dim)
        if qkv_bias:
            resident[p + "self_attn.q_proj.bias"] = (q_dim,)
            resident[p + "self_attn.k_proj.bias"] = (kv_dim,)
            resident[p + "self_attn.v_proj.bias"] = (kv_dim,)
        ffn.append({"gate": (p + "mlp.gate_proj.weight", (n_ff, d)),
                    "up": (p + "mlp.up_proj.weight", (n_ff, d)),
                    "down": (p + "mlp.down_proj.weight", (d, n_ff))})
    return resident, ffn


def opt_tensors(config: dict):
    """Expected tensors of an OPT model (pre-LN, no projections). Same return as llama_tensors."""
    d = config["hidden_size"]
    n_ff = config["ffn_dim"]
    resident = {"model.decoder.embed_tokens.weight": (config["vocab_size"], d),
                "model.decoder.embed_positions.weight": (config["max_position_embeddings"] + 2, d),
                "model.decoder.final_layer_norm.weight": (d,),
                "model.decoder.final_layer_norm.bias": (d,)}
    if not config["tie_word_embeddings"]:
        resident["lm_head.weight"] = (config["vocab_size"], d)
    ffn = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            resident[p + f"self_attn.{proj}.weight"] = (d, d)
            resident[p + f"self_attn.{proj}.bias"] = (d,)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            resident[p + f"{ln}.weight"] = (d,)
            resident[p + f"{ln}.bias"] = (d,)
        resident[p + "fc1.bias"] = (n_ff,)
        resident[p + "fc2.bias"] = (d,)
        ffn.append({"up": (p + "fc1.weight", (n_ff, d)),
                    "down": (p + "fc2.weight", (d, n_ff))})
    return resident, ffn


def expected_tensors(architecture: str, config: dict):
    return (llama_tensors if architecture == "llama" else opt_tensors)(config)


def embed_name(architecture: str) -> str:
    return ("model.embed_tokens.weight" if architecture == "llama"
            else "model.decoder.embed_tokens.weight")
