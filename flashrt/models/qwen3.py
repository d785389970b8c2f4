"""The Qwen3 family (model_type qwen3): the Llama family's forward pass with one addition,
an RMSNorm over each head of q and of k (weights (head_dim,), shared by the heads, eps
rms_norm_eps) after the projections and before RoPE. No q/k/v biases; head_dim is its own
config key (Qwen3-0.6B: 16 heads of 128 over hidden_size 1024).

Everything else -- config keys, the FFN (gated SiLU), GQA, RoPE, tied or untied head --
is llama.py's; this module adds the two norm tensors to its tables.
"""

from flashrt.models import llama
from flashrt.models.llama import EMBED_NAME, FFN_PARTS, ffn_spec, sanitize  # noqa: F401 (the family protocol)

ARCHITECTURE = "qwen3"
MODEL_TYPES = ("qwen3",)
GGUF_ARCHITECTURES = {"qwen3": "qwen3"}  # llama.cpp's general.architecture -> HF model_type
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


class ModelArgs(llama.ModelArgs):
    MODEL_TYPES = MODEL_TYPES


def tensors(args):
    """llama.tensors(args) plus each layer's q_norm and k_norm, (head_dim,)."""
    resident, ffn = llama.tensors(args)
    for i in range(args.num_hidden_layers):
        for name in QK_NORMS:
            resident[f"model.layers.{i}.{name}"] = (args.head_dim,)
    return resident, ffn


# llama.cpp (GGUF) tensor names -> Hugging Face: llama's, and the two norms
GGUF_NAMES = {**llama.GGUF_NAMES,
              "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
              "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight"}


class Model(llama.Model):
    QK_NORM = True
