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

from .._core import cache as _cache, kernels, loader as _loader
from .dense import ffn_blocks
from .stats import FlashStats, LayerCost

STREAM_CHUNK_BYTES = 2 << 20  # prefill / naive stream each layer through a buffer this size
NeuronCache = _cache.NeuronCache  # module names, so a test can put a faulty Loader in their place
Loader = _loader.Loader


class FlashFFN:
    """The FFN interface `ffn(layer, x (T, d)) -> (T, d)` over a model directory's ffn.bin.

    files: the opened ModelFiles; spec: the family's FFNSpec; plan: the BudgetPlan (its
    cache_rows per layer); mode: "flash" | "naive"; selector: an object with
    `select(layer, x (d,), prior=None) -> int64 ids` (flashrt/ffn/selection.py); window:
    tokens a neuron stays cached; reuse: False makes every token forget the cache (the
    paper's "predictor only" row, for benchmarks); overlap: False reads a token's missing
    rows before computing instead of during (the serial baseline); loader: swap in another Loader-like
    object (benchmarks) through the attribute.
    """

    def __init__(self, files, spec, plan, mode: str, selector, window: int, n_threads: int,
                 io_threads: int | None = None):
        assert mode in ("flash", "naive")
        self.mode = mode
        self.spec = spec
        self.plan = plan
        self.selector = selector
        self.window = window
        self.reuse = True
        self.overlap = True  # decode: read the missing rows while computing over the cached ones
        self.n_threads = n_threads
        self.n_layers = files.n_layers
        self.n_neurons = files.n_neurons
        self.dim = files.dim
        self.dtype = files.dtype             # float16/float32, or uint8 quantized blocks
        self.qtype = files.qtype             # None, or q8_0 | q4_0 | q4_1 (the kernels' qtype=)
        self.down_qtype = files.down_qtype if files.down_qtype != files.qtype else None
        self.row_bytes = files.ffn_row_bytes
        self.row_elems = self.row_bytes // self.dtype.itemsize
        self.layer_offsets = [files.ffn_layer_offset(l) for l in range(self.n_layers)]
        self.loader = Loader(str(files.ffn_path), n_threads=io_threads or 0)
        self.chunk_rows = max(1, min(self.n_neurons, STREAM_CHUNK_BYTES // self.row_bytes))
        self._chunk = np.empty((self.chunk_rows, self.row_elems), self.dtype)  # stream buffer
        self._part = np.empty(self.dim, np.float32)
        self.caches = []
        if mode == "flash":
            self.caches = [NeuronCache(self.n_neurons, plan.cache_rows, self.row_elems, self.dtype, window)
                           for _ in range(self.n_layers)]
        # temporal prior: per layer, the |h| the kernel computed at the last token for each cached
        # neuron, -1 for neurons not cached (only when the selector uses it)
        self.prior = None
        if mode == "flash" and selector.uses_prior:
            self.prior = np.full((self.n_layers, self.n_neurons), -1.0, np.float32)  # (n_layers, n_neurons)
        self._h = np.empty(self.n_neurons, np.float32)  # (n_neurons,) h of the cached rows, slot order
        self._bias = np.empty(self.n_neurons, np.float32)  # (n_neurons,) up biases of the cached rows
        self.step = 0  # decode tokens seen since reset (the cache's clock)
        self.stats = FlashStats(self.n_neurons, self.n_layers)

    # ----------------------------------------------------------------- the FFN protocol
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
        self.selector.close()  # the oracle's memory maps hold file descriptors

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
        return self._sparse(layer, x[0])

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
                                 self.qtype, self.down_qtype)
                out[0] += self._part
            else:
                ffn_blocks(chunk, x, part, self.spec.gated, self.spec.act, bias, None, self.n_threads,
                           self.qtype, self.down_qtype)
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
            self._admit(layer, xj, j - len(last) + 1, LayerCost())

    def _admit(self, layer: int, x: np.ndarray, step: int, cost: LayerCost, background: bool = False):
        """Select for x, admit the selection into the layer's cache, read what is missing
        (background: only issue the reads; the caller computes meanwhile and waits).
        Returns (selected ids, first slot being read, rows being read); counts and times go
        into `cost`."""
        cache = self.caches[layer]
        t0 = time.perf_counter_ns()
        ids = self.selector.select(layer, x, None if self.prior is None else self.prior[layer])
        t1 = time.perf_counter_ns()
        missing, first = cache.admit(ids, step)
        t2 = time.perf_counter_ns()
        if missing.size:
            dest = cache.rows[first:first + missing.size]
            if background:
                self.loader.submit_rows(self.layer_offsets[layer], self.row_bytes, missing, dest)
            else:
                self.loader.read_rows(self.layer_offsets[layer], self.row_bytes, missing, dest)
        t3 = time.perf_counter_ns()
        cost.n_selected, cost.n_read = ids.size, missing.size
        cost.ns_predict, cost.ns_cache = t1 - t0, t2 - t1
        cost.ns_io = cost.ns_io_wait = t3 - t2  # background: the time to issue them, so far
        return ids, first, int(missing.size)

    def _sparse(self, layer: int, x: np.ndarray) -> np.ndarray:
        """One decode token through the layer's cache: x (d,) -> (1, d).

        With `overlap` (the default) the missing rows are read in the background while the
        kernel computes over the rows already cached; the kernel waits for the reads only
        before the row chunks that hold them, and sums its chunks in the same order either
        way, so the result is bit for bit the serial one (read, then compute)."""
        if layer == 0:
            self.step += 1
            self.stats.begin_token()
        cache = self.caches[layer]
        if not self.reuse:
            cache.reset()
        cost = LayerCost()
        ids, first, n_new = self._admit(layer, x, self.step, cost, background=self.overlap)
        t0 = time.perf_counter_ns()
        rows = cache.used_rows()  # (n_used, row_elems): contiguous, no gather
        n_used = rows.shape[0]
        bias = None
        if self.spec.up_bias is not None:
            bias = np.take(self.spec.up_bias[layer], cache.used_ids(), out=self._bias[:n_used])
        h = None if self.prior is None else self._h[:n_used]
        y = np.empty((1, self.dim), np.float32)
        pending = self.overlap and n_new > 0
        try:
            kernels.ffn_rows(rows, x, y[0], self.spec.gated, self.spec.act_code, bias, h, self.n_threads, self.qtype,
                             self.down_qtype, n_ready=first if pending else -1,
                             wait=self.loader.waiter() if pending else None)
        finally:
            if pending:  # the reads have landed (the kernel waited); collect their errors and times
                ns_flight, ns_waited = self.loader.wait()
        if pending:
            cost.ns_io = ns_flight
            cost.ns_io_wait += ns_waited
            cost.n_overlapped = kernels.ffn_ready_rows(n_used, self.dim, self.spec.gated, first)
            t0 += ns_waited  # compute time excludes the time the kernel sat waiting
        if h is not None:  # the next token's prior: the true |h| of every neuron now cached
            prior = self.prior[layer]
            prior.fill(-1.0)
            prior[cache.used_ids()] = np.abs(h, out=h)
        if self.spec.down_bias is not None:
            y += self.spec.down_bias[layer]
        cost.ns_compute = time.perf_counter_ns() - t0
        cost.n_computed = n_used
        if ids.size > cache.capacity:  # the selection overflows the cache: stream the rest through
            self._overflow(layer, x, ids, y[0], cost)
        self.stats.add_layer(cost)
        return y

    def _overflow(self, layer: int, x: np.ndarray, ids: np.ndarray, y: np.ndarray, cost: LayerCost) -> None:
        """Selected neurons the cache had no room for: read them into the chunk buffer each token
        and add their share to y, so a selection larger than the cache is still computed exactly."""
        cache = self.caches[layer]
        rest = np.sort(ids[cache.id_to_slot[ids] < 0])  # (n_rest,) int64
        up_bias = self.spec.up_bias[layer] if self.spec.up_bias is not None else None
        for start in range(0, rest.size, self.chunk_rows):
            part_ids = rest[start:start + self.chunk_rows]
            chunk = self._chunk[:part_ids.size]
            t0 = time.perf_counter_ns()
            self.loader.read_rows(self.layer_offsets[layer], self.row_bytes, part_ids, chunk)
            t1 = time.perf_counter_ns()
            bias = None if up_bias is None else up_bias[part_ids]
            kernels.ffn_rows(chunk, x, self._part, self.spec.gated, self.spec.act_code, bias, None, self.n_threads,
                                 self.qtype, self.down_qtype)
            y += self._part
            cost.ns_io += t1 - t0
            cost.ns_io_wait += t1 - t0
            cost.ns_compute += time.perf_counter_ns() - t1
        cost.n_read += int(rest.size)
        cost.n_computed += int(rest.size)
