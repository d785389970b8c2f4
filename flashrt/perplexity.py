"""Perplexity of a text under a Generator, in any mode.

Dense mode scores each context window as one batch. Flash and naive modes feed the
tokens one at a time through the decode path (predictor, window and cache at work),
because that is the path whose quality is in question; a batch would take the
prefill path, which reads every neuron.
"""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from .errors import FlashrtError, GenerationError

# the FFN's per-token figures perplexity reports (flash and naive modes)
FRACTIONS = ("neurons_selected_per_token", "neurons_computed_per_token", "neurons_read_per_token")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows. logits (n, vocab) float32, targets (n,)."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float((logsumexp - z[np.arange(len(targets)), targets]).sum())


def perplexity(g, text: str, context: int = 512, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Split the text's tokens into windows of `context`; score every token after each window's first.

    Uses the Generator's public methods only: `logits` (dense: one batch per window) and
    `decode_logits` (flash, naive: one token at a time, whose FFN figures it averages)."""
    if context < 2:
        raise GenerationError(f"context must be at least 2 tokens, got {context}")
    if context > g.max_context:
        raise GenerationError(f"context {context} exceeds the model's KV cache ({g.max_context}); lower --context or raise --max-context")
    if g.tokenizer is None:
        raise FlashrtError(f"the model at {g.path} has no tokenizer; perplexity needs one to split the text")
    ids = np.asarray(g.tokenizer.encode(text), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.size < 2:
        raise GenerationError("the text has fewer than 2 tokens; nothing to score")
    windows = [ids[i : i + context] for i in range(0, ids.size, context)]
    windows = [w for w in windows if w.size >= 2]
    total_nll, n_scored = 0.0, 0
    by_token = g.mode != "dense"
    fractions = {}  # FFN neuron fractions summed over windows, weighted by decoded tokens
    bar = tqdm(total=sum(w.size for w in windows), desc="perplexity", unit="tok", disable=not progress)
    for w in windows:
        if by_token:
            logits = g.decode_logits(w[:-1])
            n_decoded = g.stats.ffn.get("decode_tokens", 0)
            for key in FRACTIONS:
                fractions[key] = fractions.get(key, 0.0) + g.stats.ffn[key] * n_decoded
        else:
            logits = g.logits(w)[:-1]
        bar.update(w.size)
        total_nll += _nll(logits, w[1:])
        n_scored += w.size - 1
    bar.close()
    result = {"tokens_scored": n_scored, "context": context, "mode": g.mode}
    if by_token:
        result.update({key: value / n_scored for key, value in fractions.items()})
    result["perplexity"] = math.exp(total_nll / n_scored)
    return result
