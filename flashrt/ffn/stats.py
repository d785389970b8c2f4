"""Per-token figures of the flash FFN: neurons selected / computed / read, time split, bytes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerCost:
    """What one layer cost one decode token (FlashFFN fills one and adds it to FlashStats)."""

    n_selected: int = 0  # neurons the selector asked for
    n_computed: int = 0  # neurons the kernel ran over (the window's rows in the cache, and any overflow)
    n_read: int = 0  # neurons read from flash on demand
    n_overlapped: int = 0  # cached neurons computed while the reads were in flight
    n_prefetched: int = 0  # rows the previous layer's guess read for this one
    n_prefetch_hits: int = 0  # of which this layer then missed (read ahead in place, not read again)
    n_restored: int = 0  # neurons a guess displaced that the cache kept: read again (counted in n_read)
    ns_prefetch_flight: int = 0  # the guess's reads in flight
    ns_prefetch_wait: int = 0  # time this layer waited for the guess's reads
    ns_predict: int = 0
    ns_cache: int = 0
    ns_io: int = 0  # reads in flight
    ns_io_wait: int = 0  # of which the token waited (== ns_io when reads are not overlapped)
    ns_compute: int = 0
    intervals: list = field(default_factory=list)  # (start, end) ns of each batch of reads waited for


def busy_ns(intervals) -> int:
    """The time covered by the union of (start, end) intervals."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


@dataclass
class FlashStats:
    n_neurons: int
    n_layers: int
    tokens: int = 0
    selected: int = 0  # neuron-layers the selector asked for
    computed: int = 0  # neuron-layers the kernel ran over (the window's rows in the cache)
    read: int = 0  # neuron-layers read from flash (on demand and prefetched)
    overlapped: int = 0  # neuron-layers computed while reads were in flight
    prefetched: int = 0  # neuron-layers read ahead on a guess
    prefetch_hits: int = 0  # of which were then needed
    restored: int = 0  # neuron-layers a guess displaced and read again (counted in read)
    ns_prefetch_wait: int = 0
    ns_predict: int = 0
    ns_cache: int = 0
    ns_io: int = 0  # time reads were in flight, summed over batches
    ns_io_busy: int = 0  # time any read was in flight (the union of the batches: two loaders overlap)
    n_intervals: int = 0
    _pending: list = field(default_factory=list)  # this token's batch intervals, not yet folded in
    ns_io_wait: int = 0  # time the token waited for reads
    ns_compute: int = 0

    def start_decode(self) -> None:
        self.tokens = self.selected = self.computed = self.read = self.overlapped = 0
        self.prefetched = self.prefetch_hits = self.restored = self.ns_prefetch_wait = 0
        self.ns_predict = self.ns_cache = self.ns_io = self.ns_io_wait = self.ns_compute = 0
        self.ns_io_busy = self.n_intervals = 0
        self._pending = []

    def _fold(self) -> None:
        if self._pending:  # a token's batches have all landed before the next token starts
            self.ns_io_busy += busy_ns(self._pending)
            self.n_intervals += len(self._pending)
            self._pending = []

    def begin_token(self) -> None:
        self._fold()
        self.tokens += 1

    def add_layer(self, cost: LayerCost) -> None:
        self.selected += cost.n_selected
        self.computed += cost.n_computed
        self.read += cost.n_read + cost.n_prefetched  # read on demand, and read ahead on a guess
        self.overlapped += cost.n_overlapped
        self.prefetched += cost.n_prefetched
        self.prefetch_hits += cost.n_prefetch_hits
        self.restored += cost.n_restored
        self.ns_prefetch_wait += cost.ns_prefetch_wait
        self.ns_predict += cost.ns_predict
        self.ns_cache += cost.ns_cache
        self.ns_io += cost.ns_io + cost.ns_prefetch_flight
        self._pending.extend(cost.intervals)
        self.ns_io_wait += cost.ns_io_wait + cost.ns_prefetch_wait
        self.ns_compute += cost.ns_compute

    def add_naive(self, ns_total: int, n_neurons: int) -> None:
        self.selected += n_neurons
        self.computed += n_neurons
        self.read += n_neurons
        self.ns_io += ns_total  # naive: read + compute of the streamed chunks, counted as I/O-bound time
        self.ns_io_wait += ns_total

    def neuron_fractions(self) -> dict:
        denom = max(self.tokens, 1) * self.n_layers * self.n_neurons
        return {
            "neurons_selected_per_token": self.selected / denom,
            "neurons_computed_per_token": self.computed / denom,
            "neurons_read_per_token": self.read / denom,
        }

    def per_token(self, io: dict | None = None) -> dict:
        """Means per decoded token; `io` = the loader's counters since decoding started."""
        n = max(self.tokens, 1)
        self._fold()
        out = {"decode_tokens": self.tokens}
        if io:
            out["bytes_read_per_token"] = io["bytes_read"] / n
            out["reads_per_token"] = io["n_reads"] / n
            out["mean_read_bytes"] = io["bytes_read"] / max(io["n_reads"], 1)
            out["flash_MBps"] = io["bytes_read"] / max(io["ns_io"], 1) * 1e3
        out.update(self.neuron_fractions())
        out.update({
            "ms_predict_per_token": self.ns_predict / n / 1e6,
            "ms_cache_per_token": self.ns_cache / n / 1e6,
            # reads in flight: the union of the batches' flights where they were recorded
            "ms_io_per_token": (self.ns_io_busy if self.n_intervals else self.ns_io) / n / 1e6,
            "ms_io_sum_per_token": self.ns_io / n / 1e6,        # the batches' flights summed
            "ms_io_wait_per_token": self.ns_io_wait / n / 1e6,  # of which the token waited
            "neurons_overlapped_per_token": self.overlapped / (n * self.n_layers * self.n_neurons),
            "ms_ffn_compute_per_token": self.ns_compute / n / 1e6,
        })
        if self.prefetched:
            out.update({
                "neurons_prefetched_per_token": self.prefetched / (n * self.n_layers * self.n_neurons),
                "prefetch_hit_rate": self.prefetch_hits / self.prefetched,  # the rest was read for nothing
                "neurons_restored_per_token": self.restored / (n * self.n_layers * self.n_neurons),
                "ms_prefetch_wait_per_token": self.ns_prefetch_wait / n / 1e6,
            })
        return out
