"""Mixture-of-experts FFNs: the router picks each token's experts exactly, experts are bundles.

A layer's experts are stored as one bundle matrix of n_experts * expert_neurons rows
(flashrt/ffn/layout.py's neuron rows, expert-major): expert e is rows [e * n, (e + 1) * n),
so its gate, up and down are one contiguous span of ffn.bin, read whole by one request.

    p = softmax(x @ router.T)               (T, n_experts) float32, the router resident
    experts = top_k(p)                      descending p, ties to the lower id
    w = p[experts] (/ their sum if norm)    (T, k)
    y = sum_k w_k * expert_k(x)             each expert the gated FFN of its rows

MoEFFN holds every expert in DRAM (dense mode, and the oracle of the flash path).
FlashMoEFFN keeps a per-layer expert cache (flashrt/_core/cache.pyx's ExpertCache: one slot
per expert, least recently used evicted, an evicted expert's slot overwritten in place by the
read of its replacement, so eviction copies nothing) and reads one token's missing experts of
a layer with one loader call into their slots; a prompt (T > 1) streams each routed expert
once for all the prompt's tokens. Both compute each expert with the same kernels in the
same order, so flash mode equals dense mode bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._core import cache as _cache, kernels, loader as _loader
from ..errors import BudgetError
from ..threads import default_threads
from .base import FFNSpec, StatelessFFN
from .dense import DenseFFN, ffn_blocks

@dataclass
class MoESpec(FFNSpec):
    routers: list = None         # per layer (n_experts, d) float32
    n_experts: int = 0
    top_k: int = 0
    expert_neurons: int = 0      # neuron rows per expert
    norm_topk: bool = True       # renormalise the top-k probabilities to sum to 1


def route(x, router, top_k, norm_topk=True):
    """x (T, d) float32, router (n_experts, d) float32 -> (experts (T, k) int64, weights (T, k) float32).

    Softmax in float32 over the router logits, the k most probable experts (ties: lower id
    first), their probabilities, renormalised to sum to 1 when norm_topk (HF Mixtral; Qwen3-MoE's
    norm_topk_prob)."""
    logits = np.asarray(x, np.float32) @ router.T                 # (T, n_experts)
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]  # (T, k)
    weights = np.take_along_axis(logits, experts, axis=-1)        # (T, k)
    if norm_topk:
        weights /= weights.sum(axis=-1, keepdims=True)
    return experts.astype(np.int64), weights.astype(np.float32)


class MoEFFN(StatelessFFN):
    """The routed FFN with every expert in DRAM.

    bundles: per layer (n_experts * expert_neurons, row) as DenseFFN takes them; spec: the
    family's MoESpec. `ffn(layer, x (T, d)) -> (T, d)`; `last_experts[layer]` holds the
    experts of the last call's tokens (T, k)."""

    def __init__(self, bundles, spec: MoESpec, n_threads=None, qtype=None, down_qtype=None):
        self.dense = DenseFFN(bundles, spec.gated, spec.act, n_threads=n_threads, qtype=qtype, down_qtype=down_qtype)
        self._setup(spec, self.dense.n_layers, self.dense.dim, n_threads, qtype, self.dense.down_qtype)
        for l, B in enumerate(bundles):
            if B.shape[0] != self.n_experts * self.expert_neurons:
                raise ValueError(f"MoEFFN: layer {l} holds {B.shape[0]} neuron rows, not {self.n_experts} experts "
                                 f"x {self.expert_neurons}")

    def _setup(self, spec, n_layers, dim, n_threads, qtype, down_qtype):
        self.spec = spec
        self.n_layers, self.dim = n_layers, dim
        self.n_experts, self.top_k, self.expert_neurons = spec.n_experts, spec.top_k, spec.expert_neurons
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoE: top_k {self.top_k} must be in [1, n_experts = {self.n_experts}]")
        if len(spec.routers) != n_layers or any(r.shape != (self.n_experts, dim) for r in spec.routers):
            raise ValueError(f"MoE: need {n_layers} routers of shape ({self.n_experts}, {dim})")
        self.routers = [np.ascontiguousarray(r, np.float32) for r in spec.routers]
        self.gated, self.act = spec.gated, spec.act
        self.n_threads = n_threads
        self.qtype = qtype
        self.down_qtype = down_qtype if down_qtype != qtype else None
        self.last_experts = [None] * n_layers

    @classmethod
    def from_files(cls, files, spec, n_threads=None):
        bundles = [files.read_ffn_layer(l) for l in range(files.n_layers)]
        return cls(bundles, spec, n_threads=n_threads, qtype=files.qtype, down_qtype=files.down_qtype)

    def _expert_rows(self, layer, e):
        n = self.expert_neurons
        return self.dense.bundles[layer][e * n:(e + 1) * n]

    def _threads(self):
        return default_threads() if self.n_threads is None else self.n_threads

    def _one(self, rows, x, out):
        """out (d,) = expert(x (d,)) over its bundle rows."""
        kernels.ffn_rows(rows, x, out, self.gated, self.act, None, None, self._threads(), self.qtype,
                         self.down_qtype)

    def _many(self, rows, x, out):
        """out (t, d) = expert(x (t, d))."""
        ffn_blocks(rows, x, out, self.gated, self.act, None, None, self._threads(), self.qtype,
                   self.down_qtype or self.qtype)

    def _check_x(self, layer, x):
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"MoE FFN: layer {layer} out of range [0, {self.n_layers})")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MoE FFN: x must be a float32 array (T, {self.dim}), got {getattr(x, 'shape', x)}")
        return np.ascontiguousarray(x)

    def __call__(self, layer, x):
        x = self._check_x(layer, x)
        experts, weights = route(x, self.routers[layer], self.top_k, self.spec.norm_topk)
        self.last_experts[layer] = experts
        if x.shape[0] == 1:
            return self._decode(layer, x, experts[0], weights[0])
        return self._prefill(layer, x, experts, weights)

    def _decode(self, layer, x, experts, weights):
        return self._combine(x, self._fetch(layer, experts), weights)

    def _combine(self, x, rows, weights):
        """y (1, d) = sum_k weights[k] * expert_k(x), rows[k] the k-th selected expert's rows."""
        y = np.zeros((1, self.dim), np.float32)
        part = np.empty(self.dim, np.float32)
        for k in range(len(rows)):
            self._one(rows[k], x[0], part)
            part *= weights[k]
            y[0] += part
        return y

    def _fetch(self, layer, experts):
        return [self._expert_rows(layer, int(e)) for e in experts]

    def _prefill(self, layer, x, experts, weights):
        """Every routed expert once, over the tokens routed to it, in ascending expert order."""
        y = np.zeros_like(x)
        for e, rows in self._stream(layer, np.unique(experts)):
            tok, slot = np.nonzero(experts == e)         # tokens routed to e (each once)
            part = np.empty((len(tok), self.dim), np.float32)
            self._many(rows, np.ascontiguousarray(x[tok]), part)
            part *= weights[tok, slot][:, None]
            y[tok] += part
        return y

    def _stream(self, layer, experts):
        for e in experts:
            yield int(e), self._expert_rows(layer, int(e))


class FlashMoEFFN(MoEFFN):
    """The routed FFN with its experts on flash, through a per-layer expert cache.

    files: the opened ModelFiles; spec: the MoESpec; cache_experts: experts each layer's cache
    holds (>= top_k; the budget planner's plan.cache_rows); reuse: False forgets the cache at
    every token (the "naive" baseline: each token reads its top-k experts).

    Decode: the router's top-k are admitted to the layer's cache (hits marked used; the least
    recently used other experts evicted to make room), the missing ones read by one
    loader.read_rows call (adjacent experts coalesced, big experts split across readers).
    Prefill: each routed expert is computed once for all its tokens, from the cache when it
    is there, else read into a free cache slot (or, once the cache is full, a staging buffer).

    prefetch (off by default; set the attribute): once layer l's missing experts are read,
    layer l+1's router scores layer l's FFN input (a guess: the residual stream moves little
    between layers) and the guessed experts layer l+1 does not cache are read into its cache
    (ExpertCache.prefetch: least recently used slots, pinned while in flight) by a second
    loader's submit_rows, in flight during layer l's expert compute and layer l+1's attention.
    Layer l+1 still routes exactly on its own input; it waits for the prefetch only when it
    selected one of the guessed experts being read, and never for a wrong guess (those slots
    stay pinned until the reads land; the next prefetch is skipped while they have not). At
    most cache_experts - top_k experts are guessed in, so the exact admit always has room."""

    def __init__(self, files, spec, cache_experts, n_threads=None, io_threads=None, reuse=True):
        self._setup(spec, files.n_layers, files.dim, n_threads, files.qtype, files.down_qtype)
        if files.n_neurons != self.n_experts * self.expert_neurons:
            raise ValueError(f"FlashMoEFFN: {files.path} holds {files.n_neurons} neuron rows per layer, not "
                             f"{self.n_experts} experts x {self.expert_neurons}")
        if cache_experts < self.top_k:
            raise BudgetError(f"the expert caches hold {cache_experts} experts per layer, fewer than the "
                              f"{self.top_k} one token needs; raise the memory budget")
        self.reuse = reuse
        self.dtype = files.dtype
        self.row_bytes = files.ffn_row_bytes                       # one neuron row
        self.expert_bytes = self.expert_neurons * self.row_bytes   # one expert: its rows, contiguous
        self.row_elems = self.row_bytes // self.dtype.itemsize
        self.layer_offsets = [files.ffn_layer_offset(l) for l in range(self.n_layers)]
        self.loader = _loader.Loader(str(files.ffn_path), n_threads=io_threads or 0)
        self.cache_experts = int(min(cache_experts, self.n_experts))
        self.caches = [_cache.ExpertCache(self.n_experts, self.cache_experts, self.expert_neurons * self.row_elems,
                                          self.dtype) for _ in range(self.n_layers)]
        self._stage = _loader.aligned_empty((1, self.expert_neurons * self.row_elems), self.dtype)
        self.step = 0
        self.prefetch = False
        self.io_threads = io_threads
        self.pf_loader = None      # the prefetch's own Loader (made on first use): its batch never blocks a read
        self._inflight = None      # [layer, guess (k,), ids being read, scored] of the prefetch in flight
        self.start_decode()

    def _rows(self, flat):
        return flat.reshape(self.expert_neurons, self.row_elems)

    def reset(self) -> None:
        self._settle()
        for c in self.caches:
            c.reset()
        self.step = 0

    def close(self) -> None:
        try:
            self._settle()
        except OSError:
            pass
        for ld in (self.loader, self.pf_loader):
            if ld is not None:
                ld.close()
        self.loader = self.pf_loader = None
        self.caches = []

    def _settle(self) -> None:
        """Let the prefetch in flight land (its read error, if any, raised) and unpin its slots."""
        if self._inflight is not None:
            layer = self._inflight[0]
            self._inflight = None
            if self.pf_loader is not None:
                self.pf_loader.wait()
            self.caches[layer].unpin()

    def start_decode(self) -> None:
        self.tokens = self.hits = self.misses = 0
        self.ns_io = self.ns_cache = self.ns_compute = self.ns_prefetch = self.ns_prefetch_wait = 0
        self.pf_guessed = self.pf_correct = self.pf_read = self.pf_used = self.pf_skipped = 0
        for c in self.caches:
            c.reset_stats()
        for ld in (self.loader, self.pf_loader):
            if ld is not None:
                ld.reset_stats()

    def decode_stats(self) -> dict:
        """Per decoded token: experts used, hit in the caches and read, bytes and reads, ms."""
        t = max(self.tokens, 1)
        io = self.loader.stats() if self.loader is not None else {}
        pf = self.pf_loader.stats() if self.pf_loader is not None else {}
        used = self.hits + self.misses
        out = {"tokens": self.tokens, "experts_per_token": used / t, "expert_hit_rate": self.hits / used if used else 0.0,
               "experts_read_per_token": self.misses / t,
               "bytes_read_per_token": (io.get("bytes_read", 0) + pf.get("bytes_read", 0)) / t,
               "reads_per_token": (io.get("n_reads", 0) + pf.get("n_reads", 0)) / t, "ms_io_per_token": self.ns_io / t / 1e6,
               "ms_cache_per_token": self.ns_cache / t / 1e6, "ms_compute_per_token": self.ns_compute / t / 1e6,
               "cache_experts_per_layer": self.cache_experts}
        if self.prefetch:
            # guess accuracy: share of the guessed top-k the exact router also chose; prefetch hits: guessed
            # experts read ahead that the exact selection used; wasted: read ahead and not used by that token
            out.update({"prefetch_guess_accuracy": self.pf_correct / self.pf_guessed if self.pf_guessed else 0.0,
                        "prefetch_experts_read_per_token": self.pf_read / t,
                        "prefetch_hits_per_token": self.pf_used / t,
                        "prefetch_wasted_bytes_per_token": (self.pf_read - self.pf_used) * self.expert_bytes / t,
                        "prefetch_skipped_per_token": self.pf_skipped / t,
                        "ms_prefetch_per_token": self.ns_prefetch / t / 1e6,
                        "ms_prefetch_wait_per_token": self.ns_prefetch_wait / t / 1e6})
        return out

    def _fetch(self, layer, experts):
        if layer == 0:
            self.tokens += 1
            self.step += 1
            if not self.reuse:
                for c in self.caches:
                    c.reset()
        cache = self.caches[layer]
        experts = np.asarray(experts, np.int64)
        if self._inflight is not None and self._inflight[0] == layer:
            _, guess, read, scored = self._inflight
            used = int(np.isin(read, experts).sum())
            if not scored:                 # the token it was guessed for (a batch still in flight a token later
                self._inflight[3] = True   # is waited for only if that token uses it, and not counted again)
                self.pf_guessed += guess.size
                self.pf_correct += int(np.isin(guess, experts).sum())
                self.pf_read += read.size
                self.pf_used += used
            if used:                       # the exact selection needs guessed experts: wait for them
                t0 = time.perf_counter_ns()
                self._settle()
                self.ns_prefetch_wait += time.perf_counter_ns() - t0
            # else: a wrong guess is never waited for; its slots stay pinned until it lands
        t0 = time.perf_counter_ns()
        missing, slots = cache.admit(experts, self.step)
        t1 = time.perf_counter_ns()
        if len(missing):
            self.loader.read_rows(self.layer_offsets[layer], self.expert_bytes, missing, cache.rows, slots=slots)
        t2 = time.perf_counter_ns()
        self.misses += len(missing)
        self.hits += len(experts) - len(missing)
        self.ns_cache += t1 - t0
        self.ns_io += t2 - t1
        slots = cache.id_to_slot
        return [self._rows(cache.rows[slots[int(e)]]) for e in experts]

    def _decode(self, layer, x, experts, weights):
        t0, busy = time.perf_counter_ns(), self._busy()
        rows = self._fetch(layer, experts)
        if self.prefetch and self.reuse and layer + 1 < self.n_layers:
            self._prefetch_next(layer + 1, x)
        y = self._combine(x, rows, weights)
        self.ns_compute += time.perf_counter_ns() - t0 - (self._busy() - busy)
        return y

    def _busy(self):
        return self.ns_io + self.ns_cache + self.ns_prefetch + self.ns_prefetch_wait

    def _guess(self, layer, x):
        """Layer `layer`'s router on x (1, d): its top-k, most probable first."""
        return route(x, self.routers[layer], self.top_k, False)[0][0]

    def _prefetch_next(self, layer, x):
        """Guess layer `layer`'s experts from the previous layer's FFN input x (1, d) and start
        reading those it does not cache into its cache (pinned) on the prefetch loader."""
        t0 = time.perf_counter_ns()
        if self._inflight is not None:     # an earlier wrong guess still in flight: skip, never wait
            if self.pf_loader is not None and not self.pf_loader.landed:
                self.pf_skipped += 1
                self.ns_prefetch += time.perf_counter_ns() - t0
                return
            self._settle()
        limit = self.cache_experts - self.top_k
        if limit > 0:
            guess = self._guess(layer, x)
            ids, slots = self.caches[layer].prefetch(guess, self.step, limit)
            if ids.size:
                if self.pf_loader is None:
                    self.pf_loader = _loader.Loader(self.loader.path, n_threads=self.io_threads or 0)
                self.pf_loader.submit_rows(self.layer_offsets[layer], self.expert_bytes, ids,
                                           self.caches[layer].rows, slots=slots)
            self._inflight = [layer, guess, ids, False]
        self.ns_prefetch += time.perf_counter_ns() - t0

    def _prefill(self, layer, x, experts, weights):
        self._settle()                     # a prompt after decoding: the prefetch's slots must have landed
        return super()._prefill(layer, x, experts, weights)

    def _stream(self, layer, experts):
        """Each routed expert once: from the cache, else read into a free cache slot while there
        is one (the decode after the prompt starts warm), else into the staging buffer."""
        cache = self.caches[layer]
        for e in experts:
            e = int(e)
            slot = cache.id_to_slot[e]
            if slot >= 0:
                yield e, self._rows(cache.rows[slot])
                continue
            ids = np.array([e], np.int64)
            if cache.n_used < cache.capacity:
                _, slots = cache.admit(ids, self.step)
                dest = cache.rows[slots[0]:slots[0] + 1]
            else:
                dest = self._stage
            self.loader.read_rows(self.layer_offsets[layer], self.expert_bytes, ids, dest)
            yield e, self._rows(dest[0])
