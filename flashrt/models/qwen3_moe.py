"""The Qwen3-MoE family (model_type qwen3_moe; GGUF qwen3moe): Qwen3's attention (per-head q/k
RMSNorm before RoPE, models/qwen3.py) and a mixture of experts in every layer.

Routing, as HF's Qwen3MoeTopKRouter: softmax over the router logits in float32, the top-k
experts, their probabilities renormalised to sum to 1 when norm_topk_prob (Qwen3-30B-A3B: 128
experts, top-8, normalised). Experts are stored as mixtral.py describes (expert-major rows,
one contiguous span each); their size is moe_intermediate_size. Layers with a dense MLP
(mlp_only_layers, decoder_sparse_step > 1) are refused.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from flashrt.errors import UnsupportedModelError
from flashrt.ffn.layout import GATED_PARTS
from flashrt.ffn.moe import MoESpec
from flashrt.models import mixtral, qwen3
from flashrt.models.base import weight_getter
from flashrt.models.config import config_int

ARCHITECTURE = "qwen3_moe"
MODEL_TYPES = ("qwen3_moe",)
GGUF_ARCHITECTURES = {"qwen3moe": "qwen3_moe"}  # llama.cpp's general.architecture -> HF model_type
FFN_PARTS = GATED_PARTS
EMBED_NAME = qwen3.EMBED_NAME
ROUTER = "model.layers.{}.mlp.gate.weight"
FLOAT_TENSORS = (".mlp.gate.weight",)  # the routers stay float in quantized models
EXPERT = {"gate": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
          "up": "model.layers.{}.mlp.experts.{}.up_proj.weight",
          "down": "model.layers.{}.mlp.experts.{}.down_proj.weight"}
GGUF_EXPERTS = mixtral.GGUF_EXPERTS


@dataclass(kw_only=True)
class ModelArgs(mixtral.ModelArgs):
    norm_topk_prob: bool = True
    MODEL_TYPES: ClassVar[tuple] = MODEL_TYPES

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        cfg = dict(config)
        cfg["intermediate_size"] = config_int(config, "moe_intermediate_size", where)  # the experts' size
        # transformers 4 spells it num_experts, transformers 5 saves num_local_experts
        cfg["num_local_experts"] = config.get("num_experts", config.get("num_local_experts"))
        if not config.get("use_sliding_window", False):
            cfg["sliding_window"] = None
        n_experts, top_k = mixtral.expert_keys(cfg, where, "num_local_experts")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(f"{where}: layers with a dense MLP (mlp_only_layers "
                                        f"{config.get('mlp_only_layers')}, decoder_sparse_step "
                                        f"{config.get('decoder_sparse_step')}) are not supported; flashrt runs "
                                        f"Qwen3-MoE models whose every layer has experts")
        base = super(mixtral.ModelArgs, cls).from_dict(cfg, where, warn)  # llama's validator
        return dataclasses.replace(base, num_local_experts=n_experts, num_experts_per_tok=top_k,
                                   norm_topk_prob=bool(config.get("norm_topk_prob", False)))

    def to_config(self, config):
        cfg = super().to_config(config)  # intermediate_size stays the config's (the dense MLP's, unused)
        cfg.pop("num_local_experts", None)
        cfg.update(moe_intermediate_size=self.intermediate_size, num_experts=self.num_local_experts,
                   norm_topk_prob=self.norm_topk_prob)
        return cfg


def tensors(args):
    """qwen3's resident tensors (q/k norms included), the routers, and per layer and part one
    (name, shape) per expert."""
    resident, _ = qwen3.tensors(args)
    return mixtral.moe_tensors(args, resident, ROUTER, EXPERT)


GGUF_NAMES = {k: v for k, v in qwen3.GGUF_NAMES.items() if not k.startswith("blk.{}.ffn_") or k.endswith("norm.weight")}
GGUF_NAMES["blk.{}.ffn_gate_inp.weight"] = ROUTER


def sanitize(weights):
    return qwen3.sanitize(weights)


def ffn_spec(args, weights):
    get = weight_getter(weights, f"a {args.model_type} checkpoint")
    routers = [mixtral.router_f32(get(ROUTER.format(i))) for i in range(args.num_hidden_layers)]
    return MoESpec(gated=True, act=args.ffn_act, up_bias=None, down_bias=None, routers=routers,
                   n_experts=args.num_local_experts, top_k=args.num_experts_per_tok,
                   expert_neurons=args.intermediate_size, norm_topk=args.norm_topk_prob)


class Model(qwen3.Model):
    """Qwen3's forward pass (q/k norms); `ffn` is an MoE FFN (flashrt/ffn/moe.py)."""
