"""The Phi-3 family (model_type phi3: Phi-3 mini/medium, 4k context): the Llama family's
forward pass (RMSNorm, RoPE, GQA, gated SiLU, untied head, optional sliding window) over
checkpoints that fuse q/k/v into one `self_attn.qkv_proj` and gate/up into one
`mlp.gate_up_proj` (gate rows first). The converters split them at load time into llama's
q_proj/k_proj/v_proj and gate_proj/up_proj (`FUSED`), so the model directory, the FFN bundles
and the forward pass are llama's. Long-context RoPE (longrope: Phi-3-128k, Phi-3.5) and
partial rotary embeddings are refused.
"""

from flashrt.errors import UnsupportedModelError
from flashrt.models import llama
from flashrt.models.base import fused_qkv
from flashrt.models.llama import EMBED_NAME, FFN_PARTS, Model, ffn_spec, sanitize, tensors  # noqa: F401 (the family protocol)

ARCHITECTURE = "phi3"
MODEL_TYPES = ("phi3",)
GGUF_ARCHITECTURES = {"phi3": "phi3"}


class ModelArgs(llama.ModelArgs):
    MODEL_TYPES = MODEL_TYPES

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        rp = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        partial = rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{where}: partial_rotary_factor {partial} is not supported for phi3 "
                                        f"(flashrt rotates whole heads)")
        return super().from_dict(config, where, warn)


def fused(args):
    """{fused HF name: [(part HF name, rows), ...]}: the row blocks each fused tensor holds,
    in order (q, k, v; gate, up)."""
    out = fused_qkv(args, "model.layers.{}.self_attn.", "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    for i in range(args.num_hidden_layers):
        m = f"model.layers.{i}.mlp."
        out[m + "gate_up_proj.weight"] = [(m + "gate_proj.weight", args.intermediate_size),
                                          (m + "up_proj.weight", args.intermediate_size)]
    return out


# llama.cpp (GGUF) tensor names -> Hugging Face: phi3 files hold the fused tensors (ffn_up is
# gate_up_proj: gate rows, then up rows)
GGUF_NAMES = {k: v for k, v in llama.GGUF_NAMES.items()
              if not k.startswith(("blk.{}.attn_q.", "blk.{}.attn_k.", "blk.{}.attn_v.", "blk.{}.ffn_gate.",
                                   "blk.{}.ffn_up."))}
GGUF_NAMES |= {"blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
               "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"}


def gguf_config(get, arch, n_layers):
    """The HF config keys of a phi3 GGUF beyond llama's: the sliding window (every layer)."""
    return {"sliding_window": get("attention.sliding_window", None)}
