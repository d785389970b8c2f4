"""The memory budget: what stays in DRAM, and how many neurons each layer may cache.

A budget is a promise: resident tensors + neuron caches + KV cache + working buffers
stay under it (the interpreter's own baseline, before the model is opened, is not
counted). Planning happens before anything big is allocated, so a budget that cannot
work is refused at once with the minimum that would.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BudgetError
from .ffn.flash import STREAM_CHUNK_BYTES, prefetch_stage_rows
from .kv_cache import KVCache

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

KV_BUDGET_SHARE = 0.10  # under a budget, the default context uses at most this share of it
MIN_CONTEXT = 256
MIN_CACHE_SHARE = 0.05  # flash mode needs room for at least this share of each layer's neurons
UNITEMIZED_SHARE = 0.03  # of the budget, kept back for what the plan does not itemize


def parse_size(value) -> int:
    """200000000, "200MB", "1.5 GiB" -> bytes."""
    if isinstance(value, bool):
        raise BudgetError(f"memory budget must be a size like '200MB', got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise BudgetError(f"cannot read the memory budget {value!r}: use bytes or a size like 200MB, 1.5GB, 512MiB")
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not n > 0:
        raise BudgetError(f"memory budget must be positive, got {value!r}")
    return int(n)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def kv_bytes_per_token(args) -> int:
    """KV-cache bytes per position (k and v, float32) for a family's ModelArgs."""
    return KVCache.bytes_needed(args.num_hidden_layers, 1, args.num_key_value_heads, args.head_dim)


def working_bytes(args, row_bytes: int, max_context: int) -> int:
    """Activation buffers of one forward: logits, attention scores of a full-context prompt,
    a stream chunk and its float32 conversion, per-block scratch of the linear layers."""
    vocab = args.vocab_size
    d = args.hidden_size
    n_heads = args.num_attention_heads
    stream = STREAM_CHUNK_BYTES * 3  # raw chunk + float32 copy (f16 models) + h/partial sums
    # + the causal mask (bool) and the int64 index pairs NumPy builds to apply it (half the entries)
    scores = n_heads * max_context * max_context * 4 + 9 * max_context * max_context
    # the loader's bounce buffer (rows are not block-aligned, so a stream chunk passes through it),
    # and per neuron the caches' id/slot maps, selection stamps and the temporal prior
    loader = STREAM_CHUNK_BYTES + 4 * 4096
    bookkeeping = args.num_hidden_layers * args.n_neurons * 24
    # decode prefetch's stage for the next layer's guessed misses (dense FFN layers only)
    prefetch = 0 if getattr(args, "n_experts", None) else prefetch_stage_rows(args.n_neurons, row_bytes) * row_bytes
    return 2 * vocab * 4 + scores + stream + 8 * max_context * d * 4 + loader + bookkeeping + prefetch


@dataclass
class BudgetPlan:
    mode: str
    budget: int | None
    resident_bytes: int
    predictor_bytes: int
    tokenizer_bytes: int  # measured when it was loaded
    kv_bytes: int
    working_bytes: int
    cache_rows: int  # per layer (flash mode); 0 in naive mode
    cache_bytes: int  # all layers
    max_context: int
    n_neurons: int
    unit: str = "neurons"  # what a cache row holds: "neurons", or "experts" (a mixture of experts)

    @property
    def total(self) -> int:
        return (self.resident_bytes + self.predictor_bytes + self.tokenizer_bytes + self.kv_bytes
                + self.working_bytes + self.cache_bytes)

    @property
    def cache_share(self) -> float:
        return self.cache_rows / self.n_neurons if self.n_neurons else 0.0

    def describe(self) -> str:
        b = fmt_bytes(self.budget) if self.budget else "none"
        return (f"budget {b}: resident {fmt_bytes(self.resident_bytes)}, predictors {fmt_bytes(self.predictor_bytes)}, "
                f"tokenizer {fmt_bytes(self.tokenizer_bytes)}, "
                f"KV cache {fmt_bytes(self.kv_bytes)} ({self.max_context} tokens), buffers {fmt_bytes(self.working_bytes)}, "
                f"{self.unit[:-1]} caches {fmt_bytes(self.cache_bytes)} ({self.cache_rows}/{self.n_neurons} {self.unit} "
                f"per layer)")


def _default_context(args, budget: int | None, max_context: int | None, n_ctx_model: int) -> int:
    if max_context is not None:
        if max_context < 1:
            raise BudgetError(f"max_context must be positive, got {max_context}")
        return min(int(max_context), n_ctx_model)
    ctx = min(2048, n_ctx_model)
    if budget is not None:
        per_token = kv_bytes_per_token(args)
        while ctx > MIN_CONTEXT and ctx * per_token > KV_BUDGET_SHARE * budget:
            ctx //= 2
    return ctx


def plan_budget(files, args, mode: str, memory_budget, max_context: int | None, n_ctx_model: int,
                predictor_bytes: int = 0, tokenizer_bytes: int = 0) -> BudgetPlan:
    """Split the budget. With no budget, flash mode caches every neuron (a DRAM-sized cache).
    args: the family's ModelArgs of the model in `files`."""
    budget = parse_size(memory_budget) if memory_budget is not None else None
    ctx = _default_context(args, budget, max_context, n_ctx_model)
    n_layers = args.num_hidden_layers
    row_bytes = files.ffn_row_bytes
    n_neurons = files.n_neurons
    work = working_bytes(args, row_bytes, ctx)
    n_experts = getattr(args, "n_experts", None)
    if n_experts:  # a mixture of experts: the cache unit is a whole expert, a token needs top_k of them
        row_bytes = args.expert_neurons * files.ffn_row_bytes
        n_neurons = n_experts
        work += 2 * row_bytes  # prefill's staging buffer for one expert, and its float32 blocks
    fixed = dict(resident_bytes=files.resident_bytes, predictor_bytes=predictor_bytes, tokenizer_bytes=tokenizer_bytes,
                 kv_bytes=ctx * kv_bytes_per_token(args), working_bytes=work)
    fixed_total = sum(fixed.values())
    # what the items above do not yet itemize (allocator overhead, NumPy temporaries): measured
    # VmHWM ran up to 1.7% over the items for SmolLM2 with a context-filling prompt
    usable = None if budget is None else int(budget * (1 - UNITEMIZED_SHARE))
    if mode == "naive":
        cache_rows = 0
        need = int(fixed_total / (1 - UNITEMIZED_SHARE)) + 1
    else:
        min_rows = args.num_experts_per_tok if n_experts else max(1, int(MIN_CACHE_SHARE * n_neurons))
        need = int((fixed_total + min_rows * row_bytes * n_layers) / (1 - UNITEMIZED_SHARE)) + 1
        if budget is None:
            cache_rows = n_neurons
        else:
            cache_rows = min(n_neurons, (usable - fixed_total) // (row_bytes * n_layers)) if usable > fixed_total else 0
    if n_experts and mode == "naive":  # naive: each token reads its top-k experts into a cache just that big
        cache_rows = args.num_experts_per_tok
        need = int((fixed_total + cache_rows * row_bytes * n_layers) / (1 - UNITEMIZED_SHARE)) + 1
    caches = "expert caches of one token's experts" if n_experts else f"neuron caches of {MIN_CACHE_SHARE:.0%} of the FFN"
    if budget is not None and (budget < need or (mode == "flash" and cache_rows < min_rows)):
        raise BudgetError(
            f"a memory budget of {fmt_bytes(budget)} is too small for {files.path.name} in {mode} mode: "
            f"it needs at least {fmt_bytes(need)} (resident tensors {fmt_bytes(fixed['resident_bytes'])}, "
            f"tokenizer {fmt_bytes(fixed['tokenizer_bytes'])}, "
            f"KV cache {fmt_bytes(fixed['kv_bytes'])} for {ctx} tokens, buffers {fmt_bytes(fixed['working_bytes'])}"
            + ("" if mode == "naive" and not n_experts else f", {caches}")
            + "); raise the budget or lower max_context"
        )
    return BudgetPlan(mode=mode, budget=budget, cache_rows=int(cache_rows), unit="experts" if n_experts else "neurons",
                      cache_bytes=int(cache_rows) * row_bytes * n_layers, max_context=ctx, n_neurons=n_neurons, **fixed)


def check_dense_budget(files, args, memory_budget, max_context: int) -> None:
    """Dense mode holds everything in DRAM: refuse a budget smaller than that."""
    budget = parse_size(memory_budget)
    need = (files.resident_bytes + files.ffn_bytes + max_context * kv_bytes_per_token(args)
            + working_bytes(args, files.ffn_row_bytes, max_context))
    if budget < need:
        raise BudgetError(f"dense mode keeps the whole model in DRAM and needs {fmt_bytes(need)}, more than the "
                          f"budget of {fmt_bytes(budget)}; use mode='flash' to run under this budget")
