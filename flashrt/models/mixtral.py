"""The Mixtral family (model_type mixtral): Llama/Mistral attention, a sparse mixture of
experts in place of the FFN.

    ModelArgs.from_dict   llama's validator plus the router's keys (num_local_experts, num_experts_per_tok)
    tensors(args)         resident tensors (the routers among them) and, per layer and part,
                          one (name, shape) per expert
    GGUF_NAMES            llama.cpp's names (GGUF architecture "llama" with ffn_*_exps tensors)
    ffn_spec(args, w)     an MoESpec: gated SiLU experts, the routers, top-k, normalised
    Model                 llama's forward pass; the FFN it calls routes (flashrt/ffn/moe.py)

The experts of a layer are stored as one bundle matrix of n_experts * intermediate_size
neuron rows, expert-major: expert e is rows [e * n, (e + 1) * n), one contiguous span of
ffn.bin that one read fetches whole (flashrt/ffn/moe.py).

Routing, as HF's MixtralTopKRouter: p = softmax(x @ router.T) in float32, the top-k
experts by p, their p divided by their sum; y = sum_k p_k * expert_k(x).
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from flashrt.errors import ModelFormatError
from flashrt.ffn.layout import GATED_PARTS
from flashrt.ffn.moe import MoESpec
from flashrt.models import llama
from flashrt.models.base import weight_getter
from flashrt.models.config import config_int
from flashrt.quant import QMatrix

ARCHITECTURE = "mixtral"
MODEL_TYPES = ("mixtral",)
FFN_PARTS = GATED_PARTS
EMBED_NAME = llama.EMBED_NAME
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
# HF's per-expert names: w1 = gate, w3 = up, w2 = down
FLOAT_TENSORS = (".block_sparse_moe.gate.weight",)  # the routers stay float in quantized models: they choose
EXPERT = {"gate": "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
          "up": "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
          "down": "model.layers.{}.block_sparse_moe.experts.{}.w2.weight"}


def expert_keys(config, where, n_experts_key="num_local_experts"):
    """(n_experts, top_k) from a config, checked: one clear line for a router that asks for
    more experts than exist."""
    n_experts = config_int(config, n_experts_key, where)
    top_k = config_int(config, "num_experts_per_tok", where)
    if top_k > n_experts:
        raise ModelFormatError(f"{where}: num_experts_per_tok {top_k} asks the router for more experts than the "
                               f"{n_experts} the layer has ({n_experts_key}); the config is wrong")
    return n_experts, top_k


@dataclass(kw_only=True)
class ModelArgs(llama.ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    MODEL_TYPES: ClassVar[tuple] = MODEL_TYPES
    ACTIVATIONS: ClassVar[dict] = {"silu": "silu", "swish": "silu"}  # the experts' activation

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        base = super().from_dict(config, where, warn)
        n_experts, top_k = expert_keys(config, where)
        return dataclasses.replace(base, num_local_experts=n_experts, num_experts_per_tok=top_k)

    def to_config(self, config):
        cfg = super().to_config(config)
        cfg["num_local_experts"] = self.num_local_experts
        cfg["num_experts_per_tok"] = self.num_experts_per_tok
        return cfg

    @property
    def n_experts(self):
        return self.num_local_experts

    @property
    def expert_neurons(self):
        return self.intermediate_size

    @property
    def n_neurons(self):
        """Neuron rows per layer in ffn.bin: every expert's, expert-major."""
        return self.num_local_experts * self.intermediate_size


def tensors(args):
    """(resident {HF name: shape}, ffn [per layer {part: [(HF name, shape) per expert]}])."""
    resident, _ = llama.tensors(dataclasses.replace(args, model_type="mistral"))
    return moe_tensors(args, resident, ROUTER, EXPERT)


def moe_tensors(args, resident, router, expert):
    """resident plus each layer's router (n_experts, d), and the experts' table: per layer
    {part: [(name, shape) per expert]} from the name patterns router ("{}": layer) and
    expert[part] ("{}": layer, expert). Shared by the mixture-of-experts families."""
    d, n, E = args.hidden_size, args.intermediate_size, args.num_local_experts
    shapes = {"gate": (n, d), "up": (n, d), "down": (d, n)}
    ffn = []
    for i in range(args.num_hidden_layers):
        resident[router.format(i)] = (E, d)
        ffn.append({p: [(expert[p].format(i, e), shapes[p]) for e in range(E)] for p in FFN_PARTS})
    return resident, ffn


# llama.cpp's names: the experts of a layer are one 3-D tensor per part (n_experts first)
GGUF_NAMES = {k: v for k, v in llama.GGUF_NAMES.items() if not k.startswith("blk.{}.ffn_") or k.endswith("norm.weight")}
GGUF_NAMES["blk.{}.ffn_gate_inp.weight"] = "model.layers.{}.block_sparse_moe.gate.weight"
GGUF_EXPERTS = {"gate": "blk.{}.ffn_gate_exps.weight", "up": "blk.{}.ffn_up_exps.weight",
                "down": "blk.{}.ffn_down_exps.weight"}


def sanitize(weights):
    return llama.sanitize(weights)


def router_f32(w):
    """A router as float32 (n_experts, d): float as stored, or a GGUF's quantized blocks dequantized."""
    return w.dequantize() if isinstance(w, QMatrix) else np.asarray(w, np.float32)


def ffn_spec(args, weights):
    """Gated SiLU experts routed by each layer's resident router, top-k renormalised."""
    get = weight_getter(weights, f"a {args.model_type} checkpoint")
    routers = [router_f32(get(ROUTER.format(i))) for i in range(args.num_hidden_layers)]
    return MoESpec(gated=True, act=args.ffn_act, up_bias=None, down_bias=None, routers=routers,
                   n_experts=args.num_local_experts, top_k=args.num_experts_per_tok,
                   expert_neurons=args.intermediate_size, norm_topk=True)


class Model(llama.Model):
    """llama's forward pass; `ffn` is an MoE FFN (flashrt/ffn/moe.py) that routes each token."""
