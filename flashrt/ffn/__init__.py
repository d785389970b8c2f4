"""The FFN, the heart of the method: one interface, two implementations.

    base.py       FFNSpec (gated?, activation, biases) and the FFN protocol
    layout.py     the bundle layout on flash: one row per neuron ([gate,] up, down)
    dense.py      DenseFFN: every bundle in DRAM (dense mode, and the oracle)
    flash.py      FlashFFN: selection -> window/cache -> loader -> kernel (flash and naive modes)
    selection.py  which neurons a token needs: all, oracle, predictor
    stats.py      per-token figures of the flash FFN
"""
from .base import ACT_CODES, FFN, FFNSpec

__all__ = ["ACT_CODES", "FFN", "FFNSpec"]
