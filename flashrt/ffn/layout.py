"""The FFN bundle layout: one row per neuron holding everything that neuron needs.

For layer l the FFN is stored as a bundle matrix B of shape (n_neurons, n_parts * dim):
  gated (Llama family), parts ("gate", "up", "down"):
      B[i] = concat(gate_proj.weight[i, :], up_proj.weight[i, :], down_proj.weight[:, i])
  ReLU (OPT), parts ("up", "down"):
      B[i] = concat(fc1.weight[i, :], fc2.weight[:, i])
One read of row i fetches neuron i whole ("row-column bundling", LLM in a flash §3.2).
"""
from __future__ import annotations

import numpy as np

GATED_PARTS = ("gate", "up", "down")
RELU_PARTS = ("up", "down")


def bundle(arrays: dict, parts, dtype=None):
    """The bundle matrix of one layer from its FFN weights in HF layouts.

    arrays: {part: array}: "gate" and "up" (n_neurons, dim) (gate_proj/up_proj, fc1),
    "down" (dim, n_neurons) (down_proj, fc2). Returns (n_neurons, n_parts * dim) in
    `dtype` (default: the inputs' result type).
    """
    blocks = [np.asarray(arrays[p]) for p in parts]
    n, dim = blocks[0].shape
    want = [(dim, n) if p == "down" else (n, dim) for p in parts]
    if [b.shape for b in blocks] != want:
        got = ", ".join(f"{p} {b.shape}" for p, b in zip(parts, blocks))
        raise ValueError(f"FFN shapes do not match: {got} (expected {', '.join(map(str, want))})")
    dtype = np.result_type(*blocks) if dtype is None else np.dtype(dtype)
    out = np.empty((n, len(parts) * dim), dtype)  # (n_neurons, n_parts * dim)
    for k, (p, b) in enumerate(zip(parts, blocks)):
        out[:, k * dim:(k + 1) * dim] = b.T if p == "down" else b
    return out


def make_bundles(gate, up, down, dtype=None):
    """Bundle a gated FFN: gate, up (n_neurons, dim), down (dim, n_neurons) -> (n_neurons, 3 * dim)."""
    return bundle({"gate": gate, "up": up, "down": down}, GATED_PARTS, dtype)


def make_bundles_relu(up, down, dtype=None):
    """Bundle a ReLU FFN: up (n_neurons, dim) (fc1), down (dim, n_neurons) (fc2) -> (n_neurons, 2 * dim)."""
    return bundle({"up": up, "down": down}, RELU_PARTS, dtype)


def part_views(bundles, parts, dim: int) -> dict:
    """Views of each part of bundle rows: {part: (..., dim)}.

    `bundles` is (..., n_parts * dim): a whole layer, any subset of its rows (a cache's
    `rows[:n_used]`) or a single row. The "down" view is down_proj.weight.T, i.e. row i
    is the down column of neuron i. No copies.
    """
    bundles = np.asarray(bundles)
    if bundles.shape[-1] != len(parts) * dim:
        raise ValueError(
            f"bundle rows have {bundles.shape[-1]} elements; expected "
            f"{len(parts)} parts x {dim} = {len(parts) * dim}"
        )
    return {p: bundles[..., k * dim:(k + 1) * dim] for k, p in enumerate(parts)}


def split_bundles(bundles, parts) -> dict:
    """Like `part_views`, with dim inferred: {part: (n, dim) view}."""
    bundles = np.asarray(bundles)
    dim, rem = divmod(bundles.shape[-1], len(parts))
    if rem:
        raise ValueError(
            f"bundle rows have {bundles.shape[-1]} elements, not a multiple of {len(parts)} parts"
        )
    return part_views(bundles, parts, dim)


def unbundle(bundles, parts) -> dict:
    """Back to HF layouts: {"gate": (n, d), "up": (n, d), "down": (d, n)} (copies)."""
    views = split_bundles(bundles, parts)
    return {p: np.ascontiguousarray(v.T if p == "down" else v) for p, v in views.items()}
