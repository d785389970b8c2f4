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

import math
import time

import numpy as np

from .._core import cache as _cache, kernels, loader as _loader
from .dense import ffn_blocks
from .stats import FlashStats, LayerCost

STREAM_CHUNK_BYTES = 2 << 20  # prefill / naive stream each layer through two buffers this size together
ALIGNMENT = 4096              # O_DIRECT: file offsets and buffers aligned to this land without a copy
# Prefill's choice per layer (see FlashFFN.prefill_sparse): a neuron read costs a fixed overhead,
# counted as this many bytes of sequential reading, plus its bytes rounded up to whole 4 KiB
# blocks. On this machine's virtual SSD: 8 KiB rows of the sparse prompt path cost ~12 KiB of
# streaming each beyond their bytes under load (bench/bench_prefill.py, OPT-1.3B shape), 16 KiB
# random reads ~30 KiB on an idle machine (README: 0.7 against ~2 GB/s); in between.
READ_OVERHEAD_BYTES = 16 << 10
NEW_SHARE_DEFAULT = 0.3       # share of a token's selection not held from the tokens before it
# decode prefetch (FlashFFN.prefetch): at most this share of a layer's neurons is read ahead
# on a guess (the paper's OPT-6.7B reads 2.4% per token; the synthetic OPT-6.7B at half its
# size misses ~3.3% per layer, the two stream buffers held 0.8%)
PREFETCH_SHARE = 0.05
PREFETCH_MIN_HIT = 0.5        # a layer whose guesses hit less than this (running mean) pauses ...
PREFETCH_PAUSE = 8            # ... this many tokens before it guesses again


def prefetch_stage_rows(n_neurons: int, row_bytes: int) -> int:
    """Rows a decode prefetch reads ahead at most: PREFETCH_SHARE of a layer, at least the two
    stream buffers' worth. (They are read into the next layer's cache, in place; the budget
    planner, flashrt/budget.py working_bytes, still charges a stage this size.)"""
    return max(1, min(n_neurons, max(math.ceil(PREFETCH_SHARE * n_neurons),
                                      2 * stream_chunk_rows(row_bytes, n_neurons))))


def stream_chunk_rows(row_bytes: int, n_neurons: int) -> int:
    """Rows per stream chunk: half of STREAM_CHUNK_BYTES, rounded down to a multiple of the rows
    that make a whole number of 4 KiB blocks (so each chunk starts aligned) when that fits."""
    half = STREAM_CHUNK_BYTES // 2
    unit = ALIGNMENT // math.gcd(row_bytes, ALIGNMENT)
    rows = half // row_bytes
    if unit * row_bytes <= half:
        rows = rows // unit * unit
    return max(1, min(n_neurons, rows))
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
        # prefill (flash mode): "auto" picks per layer by prefill_sparse's estimate; "stream"
        # streams every layer once; "sparse" runs the prompt token by token through the cache
        self.prefill = "auto"
        self.prefill_choices = {"stream": 0, "sparse": 0}  # layers of the prompts since reset_run_stats
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
        self.chunk_rows = stream_chunk_rows(self.row_bytes, self.n_neurons)
        # two stream buffers (STREAM_CHUNK_BYTES together): chunk i+1 is read into one while
        # chunk i is computed from the other; 4096-aligned, and chunk_rows keeps every chunk's
        # file offset aligned where it can, so O_DIRECT reads land in place (no bounce copy)
        self._stage = _loader.aligned_empty((2 * self.chunk_rows, self.row_elems), self.dtype)
        self._chunks = [self._stage[:self.chunk_rows], self._stage[self.chunk_rows:]]
        # decode prefetch (predictor selection only, on by default): layer l's FFN input scores
        # layer l+1's predictor, and its guessed misses (the most likely first, at most
        # prefetch_rows) get slots in layer l+1's cache (NeuronCache.prefetch) and are read
        # straight into them by pf_loader during layer l's kernel and layer l+1's attention
        # (issued once layer l's own reads are issued); layer l+1's admit keeps the right guesses, drops the wrong ones and reads
        # again what a guess displaced and the cache still holds, so it caches and computes
        # the same neurons as without the prefetch.
        # A layer whose guesses hit less than PREFETCH_MIN_HIT pauses PREFETCH_PAUSE tokens.
        self.prefetch_possible = mode == "flash" and getattr(selector, "name", None) == "predictor"
        self.prefetch = True
        # the guesses have a Loader of their own: layer l+1's guess is read while layer l's
        # on-demand reads land and its kernel runs (the I/O time counted is the union of both)
        self.pf_loader = Loader(str(files.ffn_path), n_threads=io_threads or 0) if self.prefetch_possible else None
        self.prefetch_rows = prefetch_stage_rows(self.n_neurons, self.row_bytes)
        self._pf_hit = np.ones(self.n_layers)  # running hit rate of each layer's guesses
        self._pf_pause = np.zeros(self.n_layers, np.int64)  # no guess for the layer before this step
        self._staged = None  # (layer, k): k guessed rows read or being read into the layer's cache
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
        self._drop_staged()
        for c in self.caches:
            c.reset()
        self._pf_hit.fill(1.0)
        self._pf_pause.fill(0)
        if self.prior is not None:
            self.prior.fill(-1.0)
        self.step = 0

    def close(self) -> None:
        self._drop_staged()
        for ld in (self.loader, self.pf_loader):
            if ld is not None:
                ld.close()
        self.loader = self.pf_loader = None
        self.caches = []
        self.selector.close()  # the oracle's memory maps hold file descriptors

    def start_decode(self) -> None:
        """Called after the prompt: from now on per-token figures count."""
        self.stats.start_decode()
        self.loader.reset_stats()
        if self.pf_loader is not None:
            self.pf_loader.reset_stats()

    def io_stats(self) -> dict:
        """The loaders' counters summed (on-demand reads and guesses)."""
        io = dict(self.loader.stats())
        if self.pf_loader is not None:
            for k, v in self.pf_loader.stats().items():
                io[k] = io.get(k, 0) + v
        return io

    def decode_stats(self) -> dict:
        return self.stats.per_token(self.io_stats())

    def reset_run_stats(self) -> None:
        self.start_decode()

    def run_stats(self) -> dict:
        return self.stats.neuron_fractions()

    # ----------------------------------------------------------------- forward
    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x (T, d) float32 -> (T, d) float32."""
        if x.shape[0] > 1:
            if self.mode == "flash" and self.prefill_sparse(x.shape[0], layer, x):
                self.prefill_choices["sparse"] += 1
                return self._sparse_prompt(layer, x)
            self.prefill_choices["stream"] += self.mode == "flash"
            return self._stream(layer, x, seed_cache=self.mode == "flash")
        if self.mode == "naive":
            t0 = time.perf_counter_ns()
            y = self._stream(layer, x, seed_cache=False)
            if layer == 0:
                self.stats.begin_token()
            self.stats.add_naive(time.perf_counter_ns() - t0, self.n_neurons)
            return y
        if layer == 0:
            self.step += 1
            self.stats.begin_token()
        return self._sparse(layer, x[0], self.step)

    # ----------------------------------------------------------------- the prompt
    def _probe(self, layer: int, x: np.ndarray) -> tuple[float, float]:
        """(neurons selected per token, share of a selection the window does not hold) for this
        prompt at this layer: the selector run on its last window + 1 tokens (a few predictor
        calls, no reads). Selectors that read to select (the oracle) or select everything are
        not run: their keep fraction, and NEW_SHARE_DEFAULT."""
        name = getattr(self.selector, "name", "")
        if name == "all":
            return float(self.n_neurons), 1.0
        keep = getattr(self.selector, "keep_fraction", None)
        if name != "predictor":
            return (keep if keep is not None else 1.0) * self.n_neurons, NEW_SHARE_DEFAULT
        tail = x[-(self.window + 1):]
        sels = [self.selector.select(layer, xj, None) for xj in tail]
        k = float(np.mean([s.size for s in sels]))
        if len(sels) < 2 or k == 0:
            return k, NEW_SHARE_DEFAULT
        held = np.zeros(self.n_neurons, bool)
        for s in sels[:-1]:
            held[s] = True
        return k, float(np.count_nonzero(~held[sels[-1]])) / max(sels[-1].size, 1)

    def prefill_sparse(self, n_tokens: int, layer: int = 0, x: np.ndarray | None = None) -> bool:
        """Is a prompt of n_tokens cheaper token by token through layer's cache (sparse) than
        streaming the layer once? Reads counted as bytes of sequential reading: streaming reads
        the whole layer in large reads; the sparse path reads the first token's selection (k
        neurons) and then each token's new ones (k x the share the window does not hold), each
        read costing READ_OVERHEAD_BYTES plus its 4 KiB blocks, and what overflows the cache
        again each token; k and that share are probed on the prompt's last tokens (x). Compute
        is not counted (bench/bench_prefill.py measures both paths against the choice)."""
        if self.prefill != "auto":
            return self.prefill == "sparse"
        if not self.caches:
            return False
        n, rb = self.n_neurons, self.row_bytes
        if x is None:
            k, new = self._probe_defaults()
        else:
            k, new = self._probe(layer, x)
        # what the cache cannot hold is read again by every token (the overflow path)
        over = max(0.0, k - self.caches[layer].capacity)
        reads = k + (n_tokens - 1) * (k * new + over)
        blocks = -(-rb // ALIGNMENT) * ALIGNMENT
        return reads * (blocks + READ_OVERHEAD_BYTES) < n * rb

    def _probe_defaults(self) -> tuple[float, float]:
        keep = getattr(self.selector, "keep_fraction", None)
        if getattr(self.selector, "name", "") == "all":
            return float(self.n_neurons), 1.0
        return (keep if keep is not None else 1.0) * self.n_neurons, NEW_SHARE_DEFAULT

    def _sparse_prompt(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The prompt token by token through the layer's cache (prompt token j at step
        j - T + 1, as the seeding of the streamed path numbers them): x (T, d) -> (T, d)."""
        T = x.shape[0]
        out = np.empty((T, self.dim), np.float32)
        for j in range(T):
            out[j] = self._sparse(layer, x[j], j - T + 1, count=False)[0]
        return out

    def _stream(self, layer: int, x: np.ndarray, seed_cache: bool) -> np.ndarray:
        """The whole layer through the two chunk buffers with large sequential reads: chunk
        i + 1 is read while chunk i is computed."""
        T = x.shape[0]
        out = np.zeros((T, self.dim), np.float32)
        part = np.empty((T, self.dim), np.float32)
        base = self.layer_offsets[layer]
        up_bias = self.spec.up_bias[layer] if self.spec.up_bias is not None else None
        starts = list(range(0, self.n_neurons, self.chunk_rows))
        ld = self.loader

        def submit(i):
            m = min(self.chunk_rows, self.n_neurons - starts[i])
            ld.submit_range(base + starts[i] * self.row_bytes, self._chunks[i % 2][:m])

        try:
            submit(0)
            for i, start in enumerate(starts):
                ld.wait()  # chunk i has landed
                if i + 1 < len(starts):
                    submit(i + 1)
                m = min(self.chunk_rows, self.n_neurons - start)
                chunk = self._chunks[i % 2][:m]
                bias = None if up_bias is None else up_bias[start:start + m]
                if T == 1:
                    kernels.ffn_rows(chunk, x[0], self._part, self.spec.gated, self.spec.act_code, bias, None,
                                     self.n_threads, self.qtype, self.down_qtype, act_param=self.spec.act_param)
                    out[0] += self._part
                else:
                    ffn_blocks(chunk, x, part, self.spec.gated, self.spec.act, bias, None, self.n_threads,
                               self.qtype, self.down_qtype, self.spec.act_param)
                    out += part
        except BaseException:
            _settle(ld)
            raise
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
        staged, ns_flight = 0, 0
        if self._staged is not None:
            # the guess read for this layer flew during its attention and its selection;
            # admit may move its rows: it must have landed
            staged_layer, staged = self._staged
            self._staged = None
            try:
                ns_flight, _ = self.pf_loader.wait()
            except BaseException:
                self.caches[staged_layer].drop_prefetched()
                raise
            cost.intervals.append(_interval(self.pf_loader, ns_flight))
            if staged_layer != layer:
                self.caches[staged_layer].drop_prefetched()
                staged = 0
        t2 = time.perf_counter_ns()
        before = cache.stats() if staged else None
        missing, first = cache.admit(ids, step)
        ns_cache = time.perf_counter_ns() - t2
        if staged:
            after = cache.stats()
            cost.n_prefetched = staged
            cost.n_prefetch_hits = after["prefetch_hits"] - before["prefetch_hits"]
            cost.n_restored = after["restored"] - before["restored"]
            cost.ns_prefetch_flight = ns_flight
            cost.ns_prefetch_wait = t2 - t1
            self._rate_guess(layer, cost.n_prefetch_hits / staged, step)
        t2 = time.perf_counter_ns()
        if missing.size:
            dest = cache.rows[first:first + missing.size]
            if background:
                self.loader.submit_rows(self.layer_offsets[layer], self.row_bytes, missing, dest)
            else:
                self.loader.read_rows(self.layer_offsets[layer], self.row_bytes, missing, dest)
        t3 = time.perf_counter_ns()
        if missing.size and not background:
            cost.intervals.append((t2, t3))
        cost.n_selected, cost.n_read = ids.size, missing.size
        cost.ns_predict, cost.ns_cache = t1 - t0, ns_cache
        cost.ns_io = cost.ns_io_wait = t3 - t2  # background: the time to issue them, so far
        return ids, first, int(missing.size)

    def _rate_guess(self, layer: int, hit: float, step: int) -> None:
        """Fold one guess's hit rate into the layer's running mean; below PREFETCH_MIN_HIT the
        layer pauses (its misfires would compete with the reads that are needed), and comes
        back on probation (one good guess keeps it on)."""
        r = self._pf_hit[layer] = 0.5 * self._pf_hit[layer] + 0.5 * hit
        if r < PREFETCH_MIN_HIT:
            self._pf_pause[layer] = step + PREFETCH_PAUSE
            self._pf_hit[layer] = PREFETCH_MIN_HIT

    def _wants_prefetch(self, layer: int, count: bool) -> bool:
        """Guess layer+1 now? (decode tokens, predictor selection, the layer not paused)"""
        return (count and self.prefetch and self.prefetch_possible and self.overlap and self.reuse
                and layer + 1 < self.n_layers and self.step >= self._pf_pause[layer + 1])

    def _prefetch(self, layer: int, x: np.ndarray, cost: LayerCost) -> None:
        """Guess layer `layer`'s selection from the previous layer's FFN input x and start
        reading the guessed rows it does not cache into the prefetch stage."""
        t0 = time.perf_counter_ns()
        cache = self.caches[layer]
        guess = self.selector.select(layer, x, None if self.prior is None else self.prior[layer])
        t1 = time.perf_counter_ns()
        ids, slots = cache.prefetch(guess, self.step, self.prefetch_rows)
        if ids.size:
            try:
                self.pf_loader.submit_rows(self.layer_offsets[layer], self.row_bytes, ids, cache.rows, slots=slots)
            except BaseException:
                cache.drop_prefetched()
                raise
            self._staged = (layer, int(ids.size))
        t2 = time.perf_counter_ns()
        cost.ns_predict += t1 - t0
        cost.ns_cache += t2 - t1

    def _drop_staged(self) -> None:
        if self._staged is not None and self.pf_loader is not None:
            _settle(self.pf_loader)
            if self._staged[0] < len(self.caches):
                self.caches[self._staged[0]].drop_prefetched()
        self._staged = None

    def _sparse(self, layer: int, x: np.ndarray, step: int, count: bool = True) -> np.ndarray:
        """One token through the layer's cache at `step`: x (d,) -> (1, d) (count: add its
        costs to the decode figures).

        With `overlap` (the default) the missing rows are read in the background while the
        kernel computes over the rows already cached; the kernel waits for the reads only
        before the row chunks that hold them, and sums its chunks in the same order either
        way, so the result is bit for bit the serial one (read, then compute)."""
        cache = self.caches[layer]
        if not self.reuse:
            cache.reset()
        cost = LayerCost()
        ids, first, n_new = self._admit(layer, x, step, cost, background=self.overlap)
        t0 = time.perf_counter_ns()
        rows = cache.used_rows()  # (n_used, row_elems): contiguous, no gather
        n_used = rows.shape[0]
        bias = None
        if self.spec.up_bias is not None:
            bias = np.take(self.spec.up_bias[layer], cache.used_ids(), out=self._bias[:n_used])
        h = None if self.prior is None else self._h[:n_used]
        y = np.empty((1, self.dim), np.float32)
        pending = self.overlap and n_new > 0
        # the next layer's guess flies during this kernel too (and beside this layer's reads)
        if self._wants_prefetch(layer, count):
            self._prefetch(layer + 1, x, cost)
            t0 = time.perf_counter_ns()
        try:
            kernels.ffn_rows(rows, x, y[0], self.spec.gated, self.spec.act_code, bias, h, self.n_threads, self.qtype,
                             self.down_qtype, n_ready=first if pending else -1,
                             wait=self.loader.waiter() if pending else None, act_param=self.spec.act_param)
        finally:
            if pending:  # the reads have landed (the kernel waited); collect their errors and times
                ns_flight, ns_waited = self.loader.wait()
        if pending:
            cost.intervals.append(_interval(self.loader, ns_flight))
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
        if count:
            self.stats.add_layer(cost)
        return y

    def _overflow(self, layer: int, x: np.ndarray, ids: np.ndarray, y: np.ndarray, cost: LayerCost) -> None:
        """Selected neurons the cache had no room for: read them through the two chunk buffers
        each token (the next part read while this one is computed) and add their share to y,
        so a selection larger than the cache is still computed exactly."""
        cache = self.caches[layer]
        rest = np.sort(ids[cache.id_to_slot[ids] < 0])  # (n_rest,) int64
        up_bias = self.spec.up_bias[layer] if self.spec.up_bias is not None else None
        parts = [rest[s:s + self.chunk_rows] for s in range(0, rest.size, self.chunk_rows)]
        ld = self.loader

        def submit(i):
            ld.submit_rows(self.layer_offsets[layer], self.row_bytes, parts[i], self._chunks[i % 2][:parts[i].size])

        t0 = time.perf_counter_ns()
        try:
            if parts:
                submit(0)
            for i, part_ids in enumerate(parts):
                t1 = time.perf_counter_ns()
                ns_flight, _ = ld.wait()
                cost.intervals.append(_interval(ld, ns_flight))
                if i + 1 < len(parts):
                    submit(i + 1)
                t2 = time.perf_counter_ns()
                bias = None if up_bias is None else up_bias[part_ids]
                kernels.ffn_rows(self._chunks[i % 2][:part_ids.size], x, self._part, self.spec.gated,
                                 self.spec.act_code, bias, None, self.n_threads, self.qtype, self.down_qtype,
                                 act_param=self.spec.act_param)
                y += self._part
                cost.ns_io += ns_flight
                cost.ns_io_wait += t2 - t1 + (t1 - t0 if i == 0 else 0)
                cost.ns_compute += time.perf_counter_ns() - t2
        except BaseException:
            _settle(ld)
            raise
        cost.n_read += int(rest.size)
        cost.n_computed += int(rest.size)


def _interval(ld, ns_flight: int) -> tuple[int, int]:
    """(start, end) ns of the batch `ld` just waited for, on perf_counter_ns's clock (a loader
    without last_batch: the flight, ending now)."""
    lb = getattr(ld, "last_batch", None)
    if lb is None:
        t = time.perf_counter_ns()
        return (t - ns_flight, t)
    return lb


def _settle(ld) -> None:
    """After a failure with a read in flight: let it land (it writes into our buffers) and
    drop its own error, the first one is raised."""
    try:
        ld.wait()
    except OSError:
        pass
