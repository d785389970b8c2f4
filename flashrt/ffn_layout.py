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

_PARTS = {"llama": GATED_PARTS, "opt": RELU_PARTS}


def parts_for(architecture: str) -> tuple:
    """The bundle parts of a forward-pass family ("llama" -> gate, up, down; "opt" -> up, down)."""
    try:
        return _PARTS[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; expected one of {sorted(_PARTS)}"
        ) from None


def row_bytes(parts, dim: int, dtype) -> int:
    """Bytes of one bundle row: n_parts * dim * itemsize (rows are packed, no padding)."""
    return len(parts) * dim * np.dtype(dtype).itemsize


def _fill(out, blocks):
    dim = blocks[0].shape[1]
    for k, block in enumerate(blocks):
        out[:, k * dim:(k + 1) * dim] = block
    return out


def make_bundles(gate, up, down, dtype=None):
    """Bundle a gated FFN.

    gate, up: (n_neurons, dim) (HF gate_proj/up_proj weights); down: (dim, n_neurons)
    (HF down_proj weight). Returns (n_neurons, 3 * dim) in `dtype` (default: the
    inputs' result type).
    """
    gate, up, down = np.asarray(gate), np.asarray(up), np.asarray(down)
    n, dim = gate.shape
    if up.shape != (n, dim) or down.shape != (dim, n):
        raise ValueError(
            f"gated FFN shapes do not match: gate {gate.shape}, up {up.shape}, "
            f"down {down.shape} (expected ({n}, {dim}), ({n}, {dim}), ({dim}, {n}))"
        )
    dtype = np.result_type(gate, up, down) if dtype is None else np.dtype(dtype)
    out = np.empty((n, 3 * dim), dtype)  # (n_neurons, 3 * dim)
    return _fill(out, (gate, up, down.T))


def make_bundles_relu(up, down, dtype=None):
    """Bundle a ReLU FFN. up: (n_neurons, dim) (fc1.weight); down: (dim, n_neurons) (fc2.weight).

    Returns (n_neurons, 2 * dim).
    """
    up, down = np.asarray(up), np.asarray(down)
    n, dim = up.shape
    if down.shape != (dim, n):
        raise ValueError(
            f"ReLU FFN shapes do not match: up {up.shape}, down {down.shape} "
            f"(expected ({dim}, {n}))"
        )
    dtype = np.result_type(up, down) if dtype is None else np.dtype(dtype)
    out = np.empty((n, 2 * dim), dtype)  # (n_neurons, 2 * dim)
    return _fill(out, (up, down.T))


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
