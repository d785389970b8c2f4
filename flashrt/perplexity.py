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

from .errors import GenerationError


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows. logits (n, vocab) float32, targets (n,)."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float((logsumexp - z[np.arange(len(targets)), targets]).sum())


def perplexity(g, text: str, context: int = 512, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Split the text's tokens into windows of `context`; score every token after each window's first."""
    if context < 2:
        raise GenerationError(f"context must be at least 2 tokens, got {context}")
    if context > g.max_context:
        raise GenerationError(f"context {context} exceeds the model's KV cache ({g.max_context}); lower --context or raise --max-context")
    ids = np.asarray(g._require_tokenizer().encode(text), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.size < 2:
        raise GenerationError("the text has fewer than 2 tokens; nothing to score")
    windows = [ids[i : i + context] for i in range(0, ids.size, context)]
    windows = [w for w in windows if w.size >= 2]
    total_nll, n_scored = 0.0, 0
    by_token = g.mode != "dense"
    g._acquire()
    try:
        if hasattr(g.ffn, "reset_run_stats"):
            g.ffn.reset_run_stats()
        bar = tqdm(total=sum(w.size for w in windows), desc="perplexity", unit="tok", disable=not progress)
        for w in windows:
            g._reset()
            if by_token:
                rows = []
                for t in w[:-1]:
                    rows.append(g.model.forward(np.array([t], dtype=np.int64), g.kv)[-1])
                    bar.update(1)
                logits = np.stack(rows)
                bar.update(1)
            else:
                logits = g.model.forward(w, g.kv)[:-1]
                bar.update(w.size)
            total_nll += _nll(g._check_finite(logits, "perplexity"), w[1:])
            n_scored += w.size - 1
        bar.close()
    finally:
        g._release()
    result = {"tokens_scored": n_scored, "context": context, "mode": g.mode}
    if by_token and hasattr(g.ffn, "run_stats"):
        result.update(g.ffn.run_stats())
    result["perplexity"] = math.exp(total_nll / n_scored)
    return result
