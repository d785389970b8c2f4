"""The Falcon family (model_type falcon: Falcon-7B and its shape): phi.py's parallel block
under Falcon's names. One LayerNorm feeds attention and FFN, both join the residual together;
multi-query attention (one k/v head) with RoPE over whole heads; an FFN dense_h_to_4h -> GELU
(exact) -> dense_4h_to_h, not gated; biases where `bias` says; the head tied to the embedding.

The checkpoint fuses q, k and v into `self_attention.query_key_value` as [q heads, k, v] row
blocks; the converters split it (`fused`) into the virtual `self_attention.{q,k,v}.` tensors.
Refused: ALiBi, the sequential block (parallel_attn false), per-head interleaved q/k/v (not
multi-query) and new_decoder_architecture (Falcon-40B/180B: grouped k/v, two LayerNorms).
"""

from dataclasses import dataclass

import numpy as np

from flashrt.errors import UnsupportedModelError
from flashrt.ffn.base import FFNSpec
from flashrt.ffn.layout import RELU_PARTS
from flashrt.models import phi
from flashrt.models.base import fused_qkv
from flashrt.models.config import DecoderArgs, check_family, config_int, decoder_fields, read_activation

ARCHITECTURE = "falcon"
MODEL_TYPES = ("falcon",)
GGUF_ARCHITECTURES = {"falcon": "falcon"}
FFN_PARTS = RELU_PARTS
EMBED_NAME = "transformer.word_embeddings.weight"
LAYER_PATTERN = r"transformer\.h\.(\d+)\."
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # relu: ReLU-fied Falcon (the paper's 95% sparse FFN)
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(kw_only=True)
class ModelArgs(DecoderArgs):
    rotary_dim: int
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bias: bool = False
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        check_family(config, where, MODEL_TYPES, REQUIRED, family="Falcon")
        for key, want, what in (("alibi", False, "ALiBi positions"), ("parallel_attn", True, "the sequential block"),
                                ("new_decoder_architecture", False, "new_decoder_architecture (Falcon-40B/180B)"),
                                ("multi_query", True, "per-head interleaved q/k/v (multi_query false)")):
            if bool(config.get(key, want)) != want:
                raise UnsupportedModelError(f"{where}: {what} is not supported for falcon")
        act = read_activation(config, where, "falcon", ACTIVATIONS, keys=("activation",), default="gelu")
        fields = decoder_fields(config, where, "falcon", ffn_key="ffn_hidden_size",
                                ffn_default=4 * config_int(config, "hidden_size", where), n_kv_heads=1, tied=True)
        return cls(**fields, rotary_dim=fields["head_dim"],
                   layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                   bias=bool(config.get("bias", False)), hidden_act=ACTIVATIONS[act])

    def to_config(self, config):
        cfg = {k: v for k, v in config.items() if k != "rope_parameters"}
        cfg.update(ffn_hidden_size=self.intermediate_size, head_dim=self.head_dim, rope_theta=self.rope_theta,
                   rope_scaling=self.rope_scaling, layer_norm_epsilon=self.layer_norm_eps,
                   max_position_embeddings=self.max_position_embeddings,
                   tie_word_embeddings=self.tie_word_embeddings, bias=self.bias)
        return cfg


def tensors(args):
    """The tensor-name table: (resident {HF name: shape}, ffn [per layer {part: (HF name, shape)}])."""
    d, n_ff, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q_dim, kv_dim = args.num_attention_heads * hd, args.num_key_value_heads * hd
    resident = {EMBED_NAME: (args.vocab_size, d), "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    if not args.tie_word_embeddings:
        resident["lm_head.weight"] = (args.vocab_size, d)
    ffn = []
    for i in range(args.num_hidden_layers):
        p = f"transformer.h.{i}."
        a = p + "self_attention."
        resident |= {p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                     a + "q.weight": (q_dim, d), a + "k.weight": (kv_dim, d), a + "v.weight": (kv_dim, d),
                     a + "dense.weight": (d, q_dim)}
        if args.bias:
            resident |= {a + "q.bias": (q_dim,), a + "k.bias": (kv_dim,), a + "v.bias": (kv_dim,),
                         a + "dense.bias": (d,), p + "mlp.dense_h_to_4h.bias": (n_ff,),
                         p + "mlp.dense_4h_to_h.bias": (d,)}
        ffn.append({"up": (p + "mlp.dense_h_to_4h.weight", (n_ff, d)),
                    "down": (p + "mlp.dense_4h_to_h.weight", (d, n_ff))})
    return resident, ffn


def fused(args):
    """{fused name: [(part name, rows), ...]}: query_key_value as [q heads, k, v] row blocks."""
    return fused_qkv(args, "transformer.h.{}.self_attention.", "query_key_value", ("q", "k", "v"), ("weight", "bias"))


# llama.cpp (GGUF) tensor names -> Hugging Face (its converter writes query_key_value as
# [all q, all k, all v], which for one k/v head is the checkpoint's own order)
GGUF_NAMES = {
    "token_embd.weight": EMBED_NAME,
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "transformer.h.{}.input_layernorm.weight",
    "blk.{}.attn_norm.bias": "transformer.h.{}.input_layernorm.bias",
    "blk.{}.attn_qkv.weight": "transformer.h.{}.self_attention.query_key_value.weight",
    "blk.{}.attn_qkv.bias": "transformer.h.{}.self_attention.query_key_value.bias",
    "blk.{}.attn_output.weight": "transformer.h.{}.self_attention.dense.weight",
    "blk.{}.attn_output.bias": "transformer.h.{}.self_attention.dense.bias",
    "blk.{}.ffn_up.weight": "transformer.h.{}.mlp.dense_h_to_4h.weight",
    "blk.{}.ffn_up.bias": "transformer.h.{}.mlp.dense_h_to_4h.bias",
    "blk.{}.ffn_down.weight": "transformer.h.{}.mlp.dense_4h_to_h.weight",
    "blk.{}.ffn_down.bias": "transformer.h.{}.mlp.dense_4h_to_h.bias",
}


def gguf_config(get, arch, n_layers):
    """falcon GGUF metadata beyond llama's: LayerNorm eps, the FFN width, one k/v head."""
    kv = get("attention.head_count_kv", 1)
    if kv != 1:
        raise UnsupportedModelError(f"GGUF falcon with {kv} k/v heads (Falcon-40B/180B) is not supported")
    return {"activation": "gelu", "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5),
            "ffn_hidden_size": get("feed_forward_length", None), "multi_query": True, "parallel_attn": True}


def sanitize(weights):
    """Drop tensors the forward pass does not use (rotary buffers)."""
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def ffn_spec(args, weights):
    """dense_h_to_4h (up) and dense_4h_to_h (down), biases where the config has them; not gated."""
    if not args.bias:
        return FFNSpec(gated=False, act=args.hidden_act, up_bias=None, down_bias=None)

    def bias(i, name):
        return np.ascontiguousarray(weights[f"transformer.h.{i}.mlp.{name}.bias"], np.float32)

    n = args.num_hidden_layers
    return FFNSpec(gated=False, act=args.hidden_act, up_bias=[bias(i, "dense_h_to_4h") for i in range(n)],
                   down_bias=[bias(i, "dense_4h_to_h") for i in range(n)])


class Model(phi.Model):
    NAMES = {"embed": EMBED_NAME, "final_w": "transformer.ln_f.weight", "final_b": "transformer.ln_f.bias",
             "head": "lm_head.weight", "head_b": "lm_head.bias",
             "ln_w": "transformer.h.{}.input_layernorm.weight", "ln_b": "transformer.h.{}.input_layernorm.bias",
             "q": "transformer.h.{}.self_attention.q.", "k": "transformer.h.{}.self_attention.k.",
             "v": "transformer.h.{}.self_attention.v.", "o": "transformer.h.{}.self_attention.dense."}
    CHECKPOINT = "a falcon checkpoint"
