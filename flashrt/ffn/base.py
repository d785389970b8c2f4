"""What every FFN shares: the spec of its kind (gated or not, activation, biases) and the
one interface the forward passes and the Generator call.

Each model family says what its FFN is (`models/<family>.py: ffn_spec`); the dense FFN
and the flash FFN both compute from that spec, so they compute exactly the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

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
