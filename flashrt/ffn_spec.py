"""What kind of FFN a model has: gated or not, its activation, its biases.

Shared by the dense FFN and the flash FFN so both compute exactly the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedModelError

ACT_CODES = {"silu": 0, "relu": 1, "gelu": 2}  # the `act` argument of _core.kernels.ffn_rows


@dataclass
class FFNSpec:
    gated: bool
    act: str
    up_bias: list | None  # per layer (n_neurons,) float32, or None
    down_bias: list | None  # per layer (d,) float32, or None

    @property
    def act_code(self) -> int:
        return ACT_CODES[self.act]


def ffn_spec(architecture: str, config: dict, weights: dict) -> FFNSpec:
    n_layers = int(config["num_hidden_layers"])
    if architecture == "llama":
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported for llama-family models (only silu)")
        return FFNSpec(gated=True, act="silu", up_bias=None, down_bias=None)
    if architecture == "opt":
        act = config.get("activation_function", "relu")
        if act not in ("relu", "gelu"):
            raise UnsupportedModelError(f"OPT activation_function {act!r} is not supported (relu, gelu)")
        up = [np.ascontiguousarray(weights[f"model.decoder.layers.{i}.fc1.bias"], np.float32) for i in range(n_layers)]
        down = [np.ascontiguousarray(weights[f"model.decoder.layers.{i}.fc2.bias"], np.float32) for i in range(n_layers)]
        return FFNSpec(gated=False, act=act, up_bias=up, down_bias=down)
    raise UnsupportedModelError(f"unknown architecture {architecture!r}")
