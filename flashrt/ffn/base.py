"""What every FFN shares: the spec of its kind (gated or not, activation, biases) and the
one interface the forward passes and the Generator call.

Each model family says what its FFN is (`models/<family>.py: ffn_spec`); the dense FFN
and the flash FFN both compute from that spec, so they compute exactly the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# the `act` argument of _core.kernels.ffn_rows (its act_param: FATReLU's threshold)
ACT_CODES = {"silu": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "fatrelu": 4, "drelu": 5}
# activations that make most neurons exactly zero (gated or not): the fire / no-fire kind of
# predictor applies, and flash mode reads only the neurons predicted to fire
RELU_KINDS = ("relu", "fatrelu", "drelu")


def sparsity_class(act: str, gated: bool, zero_fraction: float | None = None) -> str:
    """What kind of FFN this is for flash mode: "relu-sparse" (a ReLU-type activation, most
    neurons exactly zero: the fire / no-fire predictor and the window read a few percent of the
    FFN per token), "relu, weakly sparse" (ReLU-type, but under half the neurons measured zero),
    "dense-gated" (a smooth gate: every neuron contributes a little; selection by estimated
    |h| trades quality for reads, and small models gain little) or "dense" (smooth, not gated)."""
    if act in RELU_KINDS:
        return "relu-sparse" if zero_fraction is None or zero_fraction >= 0.5 else "relu, weakly sparse"
    return "dense-gated" if gated else "dense"


@dataclass
class FFNSpec:
    """gated: h = act(gate.x) * (up.x) (drelu: relu(gate.x) * relu(up.x)); otherwise
    h = act(up.x + up_bias). act: a name of ACT_CODES; act_param: fatrelu's threshold."""
    gated: bool
    act: str
    up_bias: list | None  # per layer (n_neurons,) float32, or None
    down_bias: list | None  # per layer (d,) float32, or None
    act_param: float = 0.0

    @property
    def act_code(self) -> int:
        return ACT_CODES[self.act]

    @property
    def relu_sparse(self) -> bool:
        """Neurons are exactly zero wherever the ReLU-type activation cuts them."""
        return self.act in RELU_KINDS


class FFN(Protocol):
    """The feed-forward block of every layer, without the norm before it or the residual.

    Dense (all rows in DRAM) or on flash (predicted rows through the neuron cache):
    the model cannot tell. Biases (OPT's fc1/fc2) are the FFN's business. The lifecycle
    methods are no-ops where an FFN keeps no state (dense).
    """

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (T, d) float32 -> (T, d) float32."""
        ...

    def reset(self) -> None:
        """A new sequence starts (forget caches and clocks)."""
        ...

    def start_decode(self) -> None:
        """The prompt is done: per-token figures count from here."""
        ...

    def decode_stats(self) -> dict:
        """Per decoded token figures since start_decode ({} when there are none)."""
        ...

    def close(self) -> None:
        """Release files and threads."""
        ...


class StatelessFFN:
    """The FFN protocol's lifecycle for an FFN that keeps no state between tokens (every row
    in DRAM): nothing to reset, no per-token figures, nothing to release."""

    def reset(self) -> None:
        pass

    def start_decode(self) -> None:
        pass

    def decode_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
