"""The FFN on flash: selection -> window/cache -> loader -> kernel.

One object serves the model's FFN interface `ffn(layer, x (T, d)) -> (T, d)` in two modes:

  flash  decode (T == 1): the selector names the neurons the token needs, the layer's
         NeuronCache keeps those of the last `window` tokens, only the missing ones are
         read (one read per run of adjacent ids) into the cache's rows, and the kernel
         computes the FFN over the contiguous rows in use.
         prefill (T > 1): the layer's bundles are streamed with large sequential reads
         and applied to every prompt token, then the cache is seeded with the
         selections of the last `window` prompt tokens.
  naive  every token streams every layer's whole FFN from flash (the paper's baseline),
         through the same loader and kernels.
"""
from __future__ import annotations

import time

import numpy as np

from .._core import kernels
from .._core.cache import NeuronCache
from .._core.loader import Loader
from .dense import ffn_blocks
from .stats import FlashStats

STREAM_CHUNK_BYTES = 2 << 20  # prefill / naive stream each layer through a buffer this size


class FlashFFN:
    def __init__(self, files, spec, plan, mode: str, selector, window: int, n_threads: int, io_threads: int | None = None):
        assert mode in ("flash", "naive")
        self.mode = mode
        self.spec = spec
        self.plan = plan
        self.selector = selector
        self.window = window
        self.n_threads = n_threads
        self.n_layers = int(files.config["num_hidden_layers"])
        self.n_neurons = files.n_neurons
        self.dim = files.dim
        self.dtype = files.dtype             # float16/float32, or uint8 quantized blocks
        self.qtype = files.qtype             # None, or q8_0 | q4_0 | q4_1 (the kernels' qtype=)
        self.row_bytes = files.ffn_row_bytes
        self.row_elems = self.row_bytes // self.dtype.itemsize
        self.layer_offsets = [files.ffn_layer_offset(l) for l in range(self.n_layers)]
        self.loader = Loader(str(files.ffn_path), n_threads=io_threads or 0)
        self.chunk_rows = max(1, min(self.n_neurons, STREAM_CHUNK_BYTES // self.row_bytes))
        self._chunk = np.empty((self.chunk_rows, self.row_elems), self.dtype)  # stream buffer
        self._y = np.empty(self.dim, np.float32)
        self._part = np.empty(self.dim, np.float32)
        self.caches = []
        if mode == "flash":
            self.caches = [NeuronCache(self.n_neurons, plan.cache_rows, self.row_elems, self.dtype, window)
                           for _ in range(self.n_layers)]
        # temporal prior: per layer, the |h| the kernel computed at the last token for each cached
        # neuron, -1 for neurons not cached (only when the selector uses it)
        self.prior = None
        if mode == "flash" and getattr(selector, "uses_prior", False):
            self.prior = np.full((self.n_layers, self.n_neurons), -1.0, np.float32)  # (n_layers, n_neurons)
        self._h = np.empty(self.n_neurons, np.float32)  # (n_neurons,) h of the cached rows, slot order
        self.step = 0  # decode tokens seen since reset (the cache's clock)
        self.stats = FlashStats(self.n_neurons, self.n_layers)

    # ----------------------------------------------------------------- lifetime
    def reset(self) -> None:
        for c in self.caches:
            c.reset()
        if self.prior is not None:
            self.prior.fill(-1.0)
        self.step = 0

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        self.caches = []
        if hasattr(self.selector, "close"):  # the oracle's memory maps hold file descriptors
            self.selector.close()

    def start_decode(self) -> None:
        """Called after the prompt: from now on per-token figures count."""
        self.stats.start_decode()
        self.loader.reset_stats()

    def decode_stats(self) -> dict:
        return self.stats.per_token(self.loader.stats())

    def reset_run_stats(self) -> None:
        self.start_decode()

    def run_stats(self) -> dict:
        return self.stats.neuron_fractions()

    # ----------------------------------------------------------------- forward
    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (T, d) float32 -> (T, d) float32."""
        if x.shape[0] > 1:
            return self._stream(layer, x, seed_cache=self.mode == "flash")
        if self.mode == "naive":
            t0 = time.perf_counter_ns()
            y = self._stream(layer, x, seed_cache=False)
            if layer == 0:
                self.stats.begin_token()
            self.stats.add_naive(time.perf_counter_ns() - t0, self.n_neurons)
            return y
        return self._sparse(layer, x[0])[None, :]

    def _stream(self, layer: int, x: np.ndarray, seed_cache: bool) -> np.ndarray:
        """The whole layer through the chunk buffer with large sequential reads."""
        T = x.shape[0]
        out = np.zeros((T, self.dim), np.float32)
        part = np.empty((T, self.dim), np.float32)
        base = self.layer_offsets[layer]
        up_bias = self.spec.up_bias[layer] if self.spec.up_bias is not None else None
        for start in range(0, self.n_neurons, self.chunk_rows):
            m = min(self.chunk_rows, self.n_neurons - start)
            chunk = self._chunk[:m]
            self.loader.read_range(base + start * self.row_bytes, chunk)
            bias = None if up_bias is None else up_bias[start:start + m]
            if T == 1:
                kernels.ffn_rows(chunk, x[0], self._part, self.spec.gated, self.spec.act_code, bias, None, self.n_threads,
                                 self.qtype)
                out[0] += self._part
            else:
                ffn_blocks(chunk, x, part, self.spec.gated, self.spec.act, bias, None, self.n_threads, self.qtype)
                out += part
        if self.spec.down_bias is not None:
            out += self.spec.down_bias[layer]
        if seed_cache:
            self._seed(layer, x)
        return out

    def _seed(self, layer: int, x: np.ndarray) -> None:
        """Fill the layer's cache with what the last prompt tokens selected (steps -w+1 .. 0)."""
        last = x[-self.window:]
        if self.prior is not None:  # the prompt's h were not kept: no prior for the first decode token
            self.prior[layer].fill(-1.0)
        for j, xj in enumerate(last):
            self._admit(layer, xj, step=j - len(last) + 1)

    def _admit(self, layer: int, x: np.ndarray, step: int):
        cache = self.caches[layer]
        t0 = time.perf_counter_ns()
        if self.prior is None:
            ids = self.selector.select(layer, x)
        else:
            ids = self.selector.select(layer, x, prior=self.prior[layer])
        self._last_selected = ids
        t1 = time.perf_counter_ns()
        missing, first = cache.admit(ids, step)
        t2 = time.perf_counter_ns()
        if missing.size:
            self.loader.read_rows(self.layer_offsets[layer], self.row_bytes, missing,
                                  cache.rows[first:first + missing.size])
        t3 = time.perf_counter_ns()
        return ids.size, missing.size, t1 - t0, t2 - t1, t3 - t2

    def _sparse(self, layer: int, x: np.ndarray) -> np.ndarray:
        if layer == 0:
            self.step += 1
            self.stats.begin_token()
        n_selected, n_read, ns_predict, ns_cache, ns_io = self._admit(layer, x, self.step)
        t0 = time.perf_counter_ns()
        cache = self.caches[layer]
        rows = cache.used_rows()  # (n_used, row_elems): contiguous, no gather
        bias = None
        if self.spec.up_bias is not None:
            bias = self.spec.up_bias[layer][cache.used_ids()]
        h = None if self.prior is None else self._h[:rows.shape[0]]
        kernels.ffn_rows(rows, x, self._y, self.spec.gated, self.spec.act_code, bias, h, self.n_threads, self.qtype)
        if h is not None:  # the next token's prior: the true |h| of every neuron now cached
            prior = self.prior[layer]
            prior.fill(-1.0)
            prior[cache.used_ids()] = np.abs(h)
        y = self._y.copy()
        if self.spec.down_bias is not None:
            y += self.spec.down_bias[layer]
        ns_compute = time.perf_counter_ns() - t0
        n_computed = rows.shape[0]
        if n_selected > cache.capacity:  # the selection overflows the cache: stream the rest through
            ns_io_rest, ns_rest, n_rest = self._overflow(layer, x, y)
            ns_io += ns_io_rest
            ns_compute += ns_rest
            n_read += n_rest
            n_computed += n_rest
        self.stats.add_layer(n_selected, n_computed, n_read, ns_predict, ns_cache, ns_io, ns_compute)
        return y

    def _overflow(self, layer: int, x: np.ndarray, y: np.ndarray):
        """Selected neurons the cache had no room for: read them into the chunk buffer each token
        and add their share to y, so a selection larger than the cache is still computed exactly."""
        cache = self.caches[layer]
        ids = self._last_selected
        rest = np.sort(ids[cache.id_to_slot[ids] < 0])  # (n_rest,) int64
        up_bias = self.spec.up_bias[layer] if self.spec.up_bias is not None else None
        ns_io = ns_compute = 0
        for start in range(0, rest.size, self.chunk_rows):
            part_ids = rest[start:start + self.chunk_rows]
            chunk = self._chunk[:part_ids.size]
            t0 = time.perf_counter_ns()
            self.loader.read_rows(self.layer_offsets[layer], self.row_bytes, part_ids, chunk)
            t1 = time.perf_counter_ns()
            bias = None if up_bias is None else up_bias[part_ids]
            kernels.ffn_rows(chunk, x, self._part, self.spec.gated, self.spec.act_code, bias, None, self.n_threads,
                                 self.qtype)
            y += self._part
            ns_io += t1 - t0
            ns_compute += time.perf_counter_ns() - t1
        return ns_io, ns_compute, int(rest.size)
