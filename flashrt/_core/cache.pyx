# cython: language_level=3
"""The per-layer neuron cache (the paper's DRAM management, "LLM in a flash" §3.3):
a preallocated matrix with one row per cached neuron bundle, id<->slot maps and
window bookkeeping.

Evicted neurons free their slots, the highest rows in use move into the free slots
below them (memcpy) and new neurons are appended, so rows[:n_used] stays one dense
matrix for the FFN kernel; a prefetch reads guessed neurons straight into slots of
their own (no staging copy).
Same API and same slot layout as the pure-Python twin _reference_cache.py.

    cache = NeuronCache(n_neurons, capacity, row_elems, np.float16, window=5)
    missing, first = cache.admit(selected, step)    # selected: priority order
    loader.read_rows(layer_offset, row_bytes, missing, cache.rows[first:first + len(missing)])
    y = ffn_rows(cache.used_rows(), x, ...)
"""
import numpy as np
cimport numpy as cnp

from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy

cnp.import_array()

# float bundles, or uint8 for quantized bundles (row_elems = row bytes)
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.uint8))
ROW_ALIGNMENT = 4096


def _aligned_rows(int64_t capacity, int64_t row_elems, dt):
    """Zeroed (capacity, row_elems) rows of dtype dt starting on a ROW_ALIGNMENT boundary, so
    O_DIRECT reads of aligned rows land in place (both caches hold their rows this way)."""
    cdef int64_t n = capacity * row_elems * dt.itemsize
    raw = np.zeros(n + ROW_ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ROW_ALIGNMENT
    return raw[start:start + n].view(dt).reshape(capacity, row_elems)


cdef struct _lru_key:
    int64_t last_used
    int64_t nid
    int64_t slot


cdef int _cmp_lru(const void* a, const void* b) noexcept nogil:
    cdef const _lru_key* x = <const _lru_key*>a
    cdef const _lru_key* y = <const _lru_key*>b
    if x.last_used != y.last_used:
        return -1 if x.last_used < y.last_used else 1
    if x.nid != y.nid:
        return -1 if x.nid < y.nid else 1
    return 0


cdef int _cmp_i64(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0], y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


cdef class NeuronCache:
    """NeuronCache(n_neurons, capacity, row_elems, dtype, window=5) for one layer.

    rows        (capacity, row_elems) dtype: rows[:n_used] are the cached neurons' bundles
    slot_to_id  (capacity,) int32: neuron id in each slot (valid for [:n_used], -1 after)
    id_to_slot  (n_neurons,) int32: slot of each neuron, -1 when absent
    last_used   (capacity,) int64: token step each slot's neuron was last selected
    window      a neuron unused for `window` steps is evicted (last_used <= step - window)

    Prefetch (decode: the next layer's guessed misses, read before its selection is known):
    prefetch(guessed, step, limit) gives the guessed neurons slots of their own, so their
    reads land in place: free slots first, then the slots of the neurons admit() would evict
    if the guess were the selection (least recently used among those not guessed); those
    neurons are displaced (their rows get overwritten). The next admit() leaves the cache
    holding exactly the neurons it would hold without the prefetch: a guessed neuron not
    selected is evicted, a displaced neuron that the window and the room still keep is read
    again (listed in `missing` with the others). Between prefetch() and admit(),
    rows[:n_used] may hold free slots (slot_to_id -1); admit() makes it dense again.
    """

    def __init__(self, int64_t n_neurons, int64_t capacity, int64_t row_elems, dtype,
                 int64_t window=5):
        dt = np.dtype(dtype)
        if dt not in DTYPES:
            raise ValueError(f"NeuronCache dtype must be float16, float32 or uint8 (quantized rows), not {dt}")
        if n_neurons < 0 or capacity < 0 or row_elems < 0:
            raise ValueError("n_neurons, capacity and row_elems must be >= 0")
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        if n_neurons >= 2**31 or capacity >= 2**31:
            raise ValueError("n_neurons and capacity must fit in int32")
        self.n_neurons = n_neurons
        self.capacity = capacity
        self.row_elems = row_elems
        self.dtype = dt
        self.window = window
        self.n_used = 0
        self.n_ghost = 0
        self.row_bytes = row_elems * dt.itemsize
        self.rows = _aligned_rows(capacity, row_elems, dt)
        self.slot_to_id = np.full(capacity, -1, np.int32)         # (capacity,)
        self.id_to_slot = np.full(n_neurons, -1, np.int32)        # (n_neurons,)
        self.last_used = np.zeros(capacity, np.int64)             # (capacity,)
        self._sel_stamp = np.zeros(n_neurons, np.int64)           # (n_neurons,)
        self._spec = np.zeros(capacity, np.uint8)                 # (capacity,) guessed, not yet selected
        self._ghost_ids = np.zeros(capacity + 1, np.int64)        # (capacity,) displaced by a guess
        self._ghost_last = np.zeros(capacity + 1, np.int64)       # (capacity,) their last use
        self._ghost_of = np.zeros(n_neurons, np.int32)            # (n_neurons,) 1 + index in _ghost_ids, 0
        self._missing = np.zeros(capacity + 1, np.int64)          # (capacity,) scratch
        self.p_rows = <char*>cnp.PyArray_DATA(self.rows)
        self.p_slot_to_id = <int32_t*>cnp.PyArray_DATA(self.slot_to_id)
        self.p_id_to_slot = <int32_t*>cnp.PyArray_DATA(self.id_to_slot)
        self.p_last_used = <int64_t*>cnp.PyArray_DATA(self.last_used)
        self.p_sel_stamp = <int64_t*>cnp.PyArray_DATA(self._sel_stamp)
        self.p_spec = <uint8_t*>cnp.PyArray_DATA(self._spec)
        self.p_ghost_ids = <int64_t*>cnp.PyArray_DATA(self._ghost_ids)
        self.p_ghost_last = <int64_t*>cnp.PyArray_DATA(self._ghost_last)
        self.p_ghost_of = <int32_t*>cnp.PyArray_DATA(self._ghost_of)
        self.p_missing = <int64_t*>cnp.PyArray_DATA(self._missing)
        self.stamp = 0
        self.reset_stats()

    @property
    def nbytes(self):
        return (self.rows.nbytes + self.slot_to_id.nbytes + self.id_to_slot.nbytes
                + self.last_used.nbytes)

    def used_rows(self):
        """rows[:n_used], a view: (n_used, row_elems), valid until the next admit."""
        return self.rows[:self.n_used]

    def used_ids(self):
        """slot_to_id[:n_used], a view: the neuron id of each used row."""
        return self.slot_to_id[:self.n_used]

    @property
    def n_prefetched(self):
        """Guessed rows in the cache that no admit() has selected yet."""
        return int(np.count_nonzero(self._spec[:self.n_used]))

    cdef void _free_slot(self, int64_t s) noexcept nogil:
        self.p_id_to_slot[self.p_slot_to_id[s]] = -1
        self.p_slot_to_id[s] = -1
        self.p_spec[s] = 0

    cdef int64_t _expire(self, int64_t step) noexcept nogil:
        """The window: evict the neurons (cached, or displaced) last used at or before
        step - window; guessed rows stay. Returns how many."""
        cdef int64_t s, g, g2 = 0, n = 0, lim = step - self.window
        for s in range(self.n_used):
            if self.p_slot_to_id[s] >= 0 and not self.p_spec[s] and self.p_last_used[s] <= lim:
                self._free_slot(s)
                n += 1
        for g in range(self.n_ghost):
            if self.p_ghost_last[g] <= lim:
                self.p_ghost_of[self.p_ghost_ids[g]] = 0
                n += 1
            else:
                self.p_ghost_ids[g2] = self.p_ghost_ids[g]
                self.p_ghost_last[g2] = self.p_ghost_last[g]
                self.p_ghost_of[self.p_ghost_ids[g2]] = <int32_t>(g2 + 1)
                g2 += 1
        self.n_ghost = g2
        return n

    cdef void _compact(self) noexcept nogil:
        """Make rows[:n_used] dense: the highest used rows move into the lowest free slots."""
        cdef int64_t lo = 0, hi = self.n_used - 1
        cdef int32_t moved
        while True:
            while lo < hi and self.p_slot_to_id[lo] >= 0:
                lo += 1
            while hi >= 0 and self.p_slot_to_id[hi] < 0:
                hi -= 1
            if lo >= hi:
                break
            moved = self.p_slot_to_id[hi]
            memcpy(self.p_rows + lo * self.row_bytes, self.p_rows + hi * self.row_bytes, self.row_bytes)
            self.p_slot_to_id[lo] = moved
            self.p_last_used[lo] = self.p_last_used[hi]
            self.p_spec[lo] = self.p_spec[hi]
            self.p_id_to_slot[moved] = <int32_t>lo
            self.p_slot_to_id[hi] = -1
            self.p_spec[hi] = 0
            self.st_moved += 1
            lo += 1
            hi -= 1
        self.n_used = hi + 1

    cdef object _ids(self, selected):
        cdef cnp.ndarray sel = np.asarray(selected)
        if sel.ndim != 1:
            raise ValueError(f"selected must be 1-D, got shape {np.shape(selected)}")
        if sel.shape[0] and not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"selected must hold integer neuron ids, not {sel.dtype}")
        sel = np.ascontiguousarray(sel, dtype=np.int64)
        cdef int64_t n_sel = sel.shape[0], i, bad = 0, n_neurons = self.n_neurons
        cdef const int64_t* ps = <const int64_t*>cnp.PyArray_DATA(sel)
        cdef bint ok = True
        with nogil:
            for i in range(n_sel):
                if ps[i] < 0 or ps[i] >= n_neurons:
                    bad = ps[i]
                    ok = False
                    break
        if not ok:
            raise IndexError(f"neuron id {bad} out of range [0, {n_neurons})")
        return sel

    def admit(self, selected, int64_t step):
        """Admit this token's selected neurons (priority order, most important first).

        (1) evict neurons whose last use is older than the window
            (last_used <= step - window); (2) mark the selected ones already
            cached as used at `step`; (3) if the missing ones do not fit, evict the
            least recently used neurons not selected now (ties: lower id first);
            selections larger than capacity keep their first `capacity` unique ids;
            (4) the highest rows in use move into the slots freed below them, and the
            missing are appended in ascending id order.
        After prefetch(): a guessed row selected now is a miss in the counters but is not
        read again; one not selected is evicted; displaced neurons that (1)-(3) keep are read
        again (in `missing`, keeping their last use).

        Returns (missing, first_slot): missing (k,) int64 ascending ids that now
        own slots first_slot .. first_slot+k-1; the caller fills those rows, e.g.
        loader.read_rows(off, row_bytes, missing, cache.rows[first_slot:first_slot+k])."""
        cdef cnp.ndarray sel = self._ids(selected)
        cdef int64_t n_sel = sel.shape[0]
        cdef const int64_t* ps = <const int64_t*>cnp.PyArray_DATA(sel)
        cdef int64_t i, s, g, nid, n_uniq = 0, n_miss = 0, n_smiss = 0, n_phit = 0, n_live = 0
        cdef int64_t need, n_cand = 0, first, n_restored = 0, cap = self.capacity
        cdef _lru_key* keys = NULL
        if self.n_used + self.n_ghost > 0:
            keys = <_lru_key*>malloc((self.n_used + self.n_ghost) * sizeof(_lru_key))
            if keys == NULL:
                raise MemoryError()
        self.stamp += 1
        cdef int64_t stamp = self.stamp
        cdef int64_t* sel_stamp = self.p_sel_stamp
        cdef int64_t* pm = self.p_missing
        with nogil:
            # (1) the window
            self.st_ev_window += self._expire(step)
            # (2) hits; unique ids in priority order, cut at capacity
            for i in range(n_sel):
                nid = ps[i]
                if sel_stamp[nid] == stamp or sel_stamp[nid] == -stamp:
                    continue                      # duplicate
                if n_uniq == cap:                 # beyond capacity: not admitted, not protected
                    sel_stamp[nid] = -stamp
                    self.st_dropped += 1
                    continue
                sel_stamp[nid] = stamp
                n_uniq += 1
                s = self.p_id_to_slot[nid]
                if s >= 0 and self.p_spec[s]:     # guessed: read already, a miss all the same
                    self.p_spec[s] = 0
                    self.p_last_used[s] = step
                    n_phit += 1
                    n_smiss += 1
                elif s >= 0:
                    self.p_last_used[s] = step
                    self.st_hits += 1
                elif self.p_ghost_of[nid]:        # displaced by a guess: a hit, read again below
                    self.p_ghost_last[self.p_ghost_of[nid] - 1] = step
                    self.st_hits += 1
                else:
                    pm[n_miss] = nid
                    n_miss += 1
                    n_smiss += 1
            self.st_misses += n_smiss
            self.st_pf_hits += n_phit
            # guessed rows not selected now leave; count what the cache would hold without guesses
            for s in range(self.n_used):
                if self.p_slot_to_id[s] >= 0:
                    if self.p_spec[s]:
                        self._free_slot(s)
                        self.st_pf_wasted += 1
                    else:
                        n_live += 1
            # (3) room: evict the least recently used not selected now (displaced ones too)
            need = n_live - n_phit + self.n_ghost + n_smiss - cap
            if need > 0:
                for s in range(self.n_used):
                    nid = self.p_slot_to_id[s]
                    if nid >= 0 and sel_stamp[nid] != stamp:
                        keys[n_cand].last_used = self.p_last_used[s]
                        keys[n_cand].nid = nid
                        keys[n_cand].slot = s
                        n_cand += 1
                for g in range(self.n_ghost):
                    nid = self.p_ghost_ids[g]
                    if sel_stamp[nid] != stamp:
                        keys[n_cand].last_used = self.p_ghost_last[g]
                        keys[n_cand].nid = nid
                        keys[n_cand].slot = -1
                        n_cand += 1
                qsort(keys, n_cand, sizeof(_lru_key), _cmp_lru)
                for i in range(need):
                    if keys[i].slot >= 0:
                        self._free_slot(keys[i].slot)
                    else:
                        self.p_ghost_of[keys[i].nid] = 0
                self.st_ev_lru += need
            # displaced neurons still kept are read again, with the missing
            for g in range(self.n_ghost):
                nid = self.p_ghost_ids[g]
                if self.p_ghost_of[nid]:
                    pm[n_miss] = nid
                    n_miss += 1
                    n_restored += 1
            self.st_restored += n_restored
            # (4) dense again, then append
            self._compact()
            qsort(pm, n_miss, sizeof(int64_t), _cmp_i64)
            first = self.n_used
            for i in range(n_miss):
                s = first + i
                nid = pm[i]
                self.p_slot_to_id[s] = <int32_t>nid
                self.p_id_to_slot[nid] = <int32_t>s
                g = self.p_ghost_of[nid]
                self.p_last_used[s] = self.p_ghost_last[g - 1] if g else step
                self.p_ghost_of[nid] = 0
            self.n_ghost = 0
            self.n_used += n_miss
        free(keys)
        return self._missing[:n_miss].copy(), first

    def prefetch(self, guessed, int64_t step, int64_t limit):
        """Give up to `limit` guessed neurons (priority order) that are not cached slots of
        their own for the admit() at `step` that follows: the window's evictions at `step`
        first, then free slots, then the slots of the least recently used neurons not
        guessed (ties: lower id first), which are displaced (see the class). Returns (ids (k,)
        int64 ascending, slots (k,) int64 ascending): the caller reads neuron ids[j] into
        rows[slots[j]] (loader.submit_rows(..., cache.rows, slots=slots)) and lets the reads
        land before the next admit(); drop_prefetched() if they fail."""
        cdef cnp.ndarray sel = self._ids(guessed)
        cdef int64_t n_sel = sel.shape[0], cap = self.capacity
        cdef const int64_t* ps = <const int64_t*>cnp.PyArray_DATA(sel)
        cdef int64_t n_max = max(0, min(n_sel, limit, cap))
        cdef cnp.ndarray ids = np.empty(n_max, np.int64)
        cdef cnp.ndarray slots = np.empty(n_max, np.int64)
        cdef int64_t* pid = <int64_t*>cnp.PyArray_DATA(ids)
        cdef int64_t* pslot = <int64_t*>cnp.PyArray_DATA(slots)
        cdef int64_t i, s, nid, n_new = 0, n_free = 0, n_cand = 0, k = 0, hi = 0
        cdef _lru_key* keys = NULL
        if self.n_used > 0:
            keys = <_lru_key*>malloc(self.n_used * sizeof(_lru_key))
            if keys == NULL:
                raise MemoryError()
        self.stamp += 1
        cdef int64_t stamp = self.stamp
        cdef int64_t* sel_stamp = self.p_sel_stamp
        with nogil:
            self.st_ev_window += self._expire(step)
            for i in range(n_sel):
                nid = ps[i]
                if sel_stamp[nid] == stamp:
                    continue
                sel_stamp[nid] = stamp            # guessed: not displaced by this prefetch
                if n_new < n_max and self.p_id_to_slot[nid] < 0 and not self.p_ghost_of[nid]:
                    pid[n_new] = nid
                    n_new += 1
            # free slots: below n_used, then above it
            for s in range(cap):
                if k == n_new:
                    break
                if s >= self.n_used or self.p_slot_to_id[s] < 0:
                    pslot[k] = s
                    k += 1
            if k < n_new:                         # displace the least recently used not guessed
                for s in range(self.n_used):
                    nid = self.p_slot_to_id[s]
                    if nid >= 0 and not self.p_spec[s] and sel_stamp[nid] != stamp:
                        keys[n_cand].last_used = self.p_last_used[s]
                        keys[n_cand].nid = nid
                        keys[n_cand].slot = s
                        n_cand += 1
                qsort(keys, n_cand, sizeof(_lru_key), _cmp_lru)
                for i in range(min(n_new - k, n_cand)):
                    s = keys[i].slot
                    self.p_ghost_ids[self.n_ghost] = keys[i].nid
                    self.p_ghost_last[self.n_ghost] = keys[i].last_used
                    self.n_ghost += 1
                    self.p_ghost_of[keys[i].nid] = <int32_t>self.n_ghost
                    self._free_slot(s)
                    pslot[k] = s
                    k += 1
                n_new = k                         # the first guesses in priority order that fit
            qsort(pid, n_new, sizeof(int64_t), _cmp_i64)
            qsort(pslot, n_new, sizeof(int64_t), _cmp_i64)
            for i in range(n_new):
                s = pslot[i]
                self.p_slot_to_id[s] = <int32_t>pid[i]
                self.p_id_to_slot[pid[i]] = <int32_t>s
                self.p_last_used[s] = step
                self.p_spec[s] = 1
                if s + 1 > hi:
                    hi = s + 1
            if hi > self.n_used:
                self.n_used = hi
            self.st_prefetched += n_new
        free(keys)
        return ids[:n_new].copy(), slots[:n_new].copy()

    def drop_prefetched(self):
        """The reads of the last prefetch() failed: forget the guessed rows (their slots
        hold whatever landed). Displaced neurons are read again by the next admit()."""
        cdef int64_t s
        for s in range(self.n_used):
            if self.p_slot_to_id[s] >= 0 and self.p_spec[s]:
                self._free_slot(s)
                self.st_pf_wasted += 1

    def reset(self):
        """Empty the cache (the counters are kept: see reset_stats)."""
        cdef int64_t s, g
        for s in range(self.n_used):
            if self.p_slot_to_id[s] >= 0:
                if self.p_spec[s]:
                    self.st_pf_wasted += 1
                self.p_id_to_slot[self.p_slot_to_id[s]] = -1
        for g in range(self.n_ghost):
            self.p_ghost_of[self.p_ghost_ids[g]] = 0
        self.n_ghost = 0
        self.slot_to_id[:] = -1
        self.last_used[:] = 0
        self._spec[:] = 0
        self.n_used = 0

    def stats(self):
        """dict(hits, misses, evictions (= window + lru), evictions_window,
        evictions_lru, dropped: selected ids beyond capacity, not admitted; the same
        with or without prefetch. prefetched: guessed rows read in place, prefetch_hits:
        of those, selected by the next admit, prefetch_wasted: not, restored: displaced
        neurons read again, moved: rows copied to keep rows[:n_used] dense)."""
        return dict(hits=self.st_hits, misses=self.st_misses,
                    evictions_window=self.st_ev_window, evictions_lru=self.st_ev_lru,
                    dropped=self.st_dropped, evictions=self.st_ev_window + self.st_ev_lru,
                    prefetched=self.st_prefetched, prefetch_hits=self.st_pf_hits,
                    prefetch_wasted=self.st_pf_wasted, restored=self.st_restored, moved=self.st_moved)

    def reset_stats(self):
        self.st_hits = 0
        self.st_misses = 0
        self.st_ev_window = 0
        self.st_ev_lru = 0
        self.st_dropped = 0
        self.st_prefetched = 0
        self.st_pf_hits = 0
        self.st_pf_wasted = 0
        self.st_restored = 0
        self.st_moved = 0

    def __repr__(self):
        return (f"NeuronCache(n_neurons={self.n_neurons}, capacity={self.capacity}, "
                f"n_used={self.n_used}, window={self.window}, dtype={self.dtype})")


def take_rows(src, idx, out):
    """out[j] = src[idx[j]] for whole rows, one memcpy each without the GIL (np.take along
    axis 0 copies element by element: ~10x slower for 16 KiB float16 rows).

    src: (n, ...) C-contiguous                                                    # IN
    idx: (m,) integers in [0, n)                                                  # IN
    out: (m, ...) C-contiguous, rows the size of src's, same dtype                # OUT
    Returns out."""
    sa, oa = np.asarray(src), np.asarray(out)
    if not (sa.flags.c_contiguous and oa.flags.c_contiguous and oa.flags.writeable):
        raise ValueError("take_rows: src and out must be C-contiguous (out writable)")
    if sa.dtype != oa.dtype or sa.ndim < 1 or oa.ndim != sa.ndim or oa.shape[1:] != sa.shape[1:]:
        raise ValueError(f"take_rows: out {oa.dtype}{oa.shape[1:]} rows do not match src {sa.dtype}{sa.shape[1:]}")
    cdef cnp.ndarray s = sa, o = oa
    cdef cnp.ndarray ix = np.ascontiguousarray(idx, dtype=np.int64)
    cdef int64_t m = ix.shape[0], n = s.shape[0], j, bad = -1
    if o.shape[0] != m:
        raise ValueError(f"take_rows: out has {o.shape[0]} rows for {m} indices")
    cdef const int64_t* pi = <const int64_t*>cnp.PyArray_DATA(ix)
    cdef int64_t rb = s.nbytes // n if n else 0
    cdef char* ps = <char*>cnp.PyArray_DATA(s)
    cdef char* po = <char*>cnp.PyArray_DATA(o)
    with nogil:
        for j in range(m):
            if pi[j] < 0 or pi[j] >= n:
                bad = j
                break
        if bad < 0:
            for j in range(m):
                memcpy(po + j * rb, ps + pi[j] * rb, rb)
    if bad >= 0:
        raise IndexError(f"take_rows: index {idx[bad]} out of range [0, {n})")
    return out


cdef class ExpertCache:
    """ExpertCache(n_ids, capacity, row_elems, dtype) for one MoE layer: slots that stay put.

    One row per cached expert (its whole bundle, megabytes); an evicted expert's slot is
    overwritten in place by the read of the expert that replaces it, so eviction copies
    nothing (the neuron cache's swap-with-last would move a whole expert). The kernels
    take each selected expert's rows by its slot, so the used rows need not be contiguous.

    rows        (capacity, row_elems) dtype, 4096-aligned
    slot_to_id  (capacity,) int32: expert in each slot, -1 for a free slot
    id_to_slot  (n_ids,) int32: slot of each expert, -1 when absent
    last_used   (capacity,) int64: step each slot's expert was last selected (or prefetched)
    pinned      (capacity,) uint8: 1 while a prefetch is reading into the slot (never evicted)

    Policy: least recently used among the experts not selected now (ties: lower id first),
    no window; selections larger than capacity keep their first `capacity` unique ids.

        missing, slots = cache.admit(selected, step)
        loader.read_rows(layer_offset, expert_bytes, missing, cache.rows, slots=slots)
        guess, slots = cache.prefetch(guessed, step, limit)     # pinned until unpin()
        loader.submit_rows(layer_offset, expert_bytes, guess, cache.rows, slots=slots)
    """

    def __init__(self, int64_t n_ids, int64_t capacity, int64_t row_elems, dtype):
        dt = np.dtype(dtype)
        if dt not in DTYPES:
            raise ValueError(f"ExpertCache dtype must be float16, float32 or uint8 (quantized rows), not {dt}")
        if n_ids < 0 or capacity < 0 or row_elems < 0:
            raise ValueError("n_ids, capacity and row_elems must be >= 0")
        if n_ids >= 2**31 or capacity >= 2**31:
            raise ValueError("n_ids and capacity must fit in int32")
        self.n_ids = n_ids
        self.capacity = capacity
        self.row_elems = row_elems
        self.dtype = dt
        self.n_used = 0
        self.rows = _aligned_rows(capacity, row_elems, dt)
        self.slot_to_id = np.full(capacity, -1, np.int32)         # (capacity,)
        self.id_to_slot = np.full(n_ids, -1, np.int32)            # (n_ids,)
        self.last_used = np.zeros(capacity, np.int64)             # (capacity,)
        self.pinned = np.zeros(capacity, np.uint8)                # (capacity,)
        self._spec = np.zeros(capacity, np.uint8)                 # (capacity,) prefetched, not yet selected
        self._sel_stamp = np.zeros(n_ids, np.int64)               # (n_ids,)
        self.p_slot_to_id = <int32_t*>cnp.PyArray_DATA(self.slot_to_id)
        self.p_id_to_slot = <int32_t*>cnp.PyArray_DATA(self.id_to_slot)
        self.p_last_used = <int64_t*>cnp.PyArray_DATA(self.last_used)
        self.p_pinned = <uint8_t*>cnp.PyArray_DATA(self.pinned)
        self.p_spec = <uint8_t*>cnp.PyArray_DATA(self._spec)
        self.p_sel_stamp = <int64_t*>cnp.PyArray_DATA(self._sel_stamp)
        self.stamp = 0
        self.reset_stats()

    @property
    def nbytes(self):
        return (self.rows.nbytes + self.slot_to_id.nbytes + self.id_to_slot.nbytes
                + self.last_used.nbytes + self.pinned.nbytes)

    def used_ids(self):
        """The cached expert ids, ascending."""
        ids = self.slot_to_id[self.slot_to_id >= 0]
        return np.sort(ids)

    cdef int64_t _evict_lru(self, int64_t need, int64_t stamp, bint protect_selected) noexcept nogil:
        """Free `need` slots: the least recently used unpinned experts (not selected at this
        stamp when protect_selected; ties lower id first). Returns how many were freed."""
        cdef int64_t s, n_cand = 0, i, nid, got = 0
        cdef _lru_key* keys
        if need <= 0:
            return 0
        keys = <_lru_key*>malloc(self.capacity * sizeof(_lru_key) + 1)
        if keys == NULL:
            return 0
        for s in range(self.capacity):
            nid = self.p_slot_to_id[s]
            if nid < 0 or self.p_pinned[s]:
                continue
            if protect_selected and self.p_sel_stamp[nid] == stamp:
                continue
            keys[n_cand].last_used = self.p_last_used[s]
            keys[n_cand].nid = nid
            keys[n_cand].slot = s
            n_cand += 1
        qsort(keys, n_cand, sizeof(_lru_key), _cmp_lru)
        for i in range(min(need, n_cand)):
            s = keys[i].slot
            self.p_id_to_slot[self.p_slot_to_id[s]] = -1
            self.p_slot_to_id[s] = -1
            if self.p_spec[s]:
                self.st_pf_wasted += 1
                self.p_spec[s] = 0
            self.n_used -= 1
            got += 1
        free(keys)
        return got

    cdef void _place(self, int64_t* ids, int64_t n, int64_t step, int64_t* slots_out,
                     bint spec) noexcept nogil:
        """Put ids (ascending) in the free slots, ascending."""
        cdef int64_t s = 0, i
        for i in range(n):
            while self.p_slot_to_id[s] >= 0:
                s += 1
            self.p_slot_to_id[s] = <int32_t>ids[i]
            self.p_id_to_slot[ids[i]] = <int32_t>s
            self.p_last_used[s] = step
            self.p_spec[s] = spec
            if spec:
                self.p_pinned[s] = 1
            slots_out[i] = s
            s += 1
        self.n_used += n

    cdef object _ids(self, selected):
        cdef cnp.ndarray sel = np.asarray(selected)
        if sel.ndim != 1:
            raise ValueError(f"selected must be 1-D, got shape {np.shape(selected)}")
        if sel.shape[0] and not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"selected must hold integer expert ids, not {sel.dtype}")
        sel = np.ascontiguousarray(sel, dtype=np.int64)
        if sel.shape[0] and (sel.min() < 0 or sel.max() >= self.n_ids):
            bad = sel[(sel < 0) | (sel >= self.n_ids)][0]
            raise IndexError(f"expert id {bad} out of range [0, {self.n_ids})")
        return sel

    def admit(self, selected, int64_t step):
        """Admit one token's selected experts (priority order) at `step`.

        Hits are marked used at step; the missing ones take free slots, else the slots of the
        least recently used unpinned experts not selected now. Returns (missing (k,) int64
        ascending, slots (k,) int64 ascending): the caller reads expert missing[j] into
        rows[slots[j]]. Raises RuntimeError when pinned slots leave no room."""
        cdef cnp.ndarray sel = self._ids(selected)
        cdef int64_t n_sel = sel.shape[0], cap = self.capacity
        cdef const int64_t* ps = <const int64_t*>cnp.PyArray_DATA(sel)
        cdef cnp.ndarray missing = np.empty(min(n_sel, cap), np.int64)
        cdef cnp.ndarray slots = np.empty(min(n_sel, cap), np.int64)
        cdef int64_t* pm = <int64_t*>cnp.PyArray_DATA(missing)
        cdef int64_t* pslot = <int64_t*>cnp.PyArray_DATA(slots)
        cdef int64_t i, s, nid, n_uniq = 0, n_miss = 0, need, freed = 0
        self.stamp += 1
        cdef int64_t stamp = self.stamp
        cdef int64_t* sel_stamp = self.p_sel_stamp
        with nogil:
            for i in range(n_sel):
                nid = ps[i]
                if sel_stamp[nid] == stamp or sel_stamp[nid] == -stamp:
                    continue
                if n_uniq == cap:
                    sel_stamp[nid] = -stamp
                    self.st_dropped += 1
                    continue
                sel_stamp[nid] = stamp
                n_uniq += 1
                s = self.p_id_to_slot[nid]
                if s >= 0:
                    self.p_last_used[s] = step
                    self.st_hits += 1
                    if self.p_spec[s]:
                        self.p_spec[s] = 0
                        self.st_pf_hits += 1
                else:
                    pm[n_miss] = nid
                    n_miss += 1
            need = self.n_used + n_miss - cap
            if need > 0:
                freed = self._evict_lru(need, stamp, True)
        if need > 0 and freed < need:
            raise RuntimeError(f"ExpertCache: {cap - self.n_used} free slots for {n_miss} missing experts: "
                               f"pinned slots (prefetches in flight) leave no room")
        self.st_misses += n_miss
        self.st_evictions += max(need, 0)
        with nogil:
            qsort(pm, n_miss, sizeof(int64_t), _cmp_i64)
            self._place(pm, n_miss, step, pslot, False)
        return missing[:n_miss].copy(), slots[:n_miss].copy()

    def prefetch(self, guessed, int64_t step, int64_t limit):
        """Insert up to `limit` guessed experts (priority order) that are not cached, as used
        at `step`, pinned until unpin(): they take free slots, else the slots of the least
        recently used unpinned experts not guessed (fewer when too few such slots are left). Returns
        (ids (k,) int64 ascending, slots (k,) int64) for the caller to read into."""
        cdef cnp.ndarray sel = self._ids(guessed)
        cdef int64_t n_sel = sel.shape[0], cap = self.capacity
        cdef const int64_t* ps = <const int64_t*>cnp.PyArray_DATA(sel)
        cdef int64_t n_max = max(0, min(n_sel, limit, cap))
        cdef cnp.ndarray ids = np.empty(n_max, np.int64)
        cdef cnp.ndarray slots = np.empty(n_max, np.int64)
        cdef int64_t* pm = <int64_t*>cnp.PyArray_DATA(ids)
        cdef int64_t* pslot = <int64_t*>cnp.PyArray_DATA(slots)
        cdef int64_t i, nid, n_new = 0, need, room, s
        self.stamp += 1
        cdef int64_t stamp = self.stamp
        cdef int64_t* sel_stamp = self.p_sel_stamp
        with nogil:
            for i in range(n_sel):
                nid = ps[i]
                if sel_stamp[nid] == stamp:
                    continue
                sel_stamp[nid] = stamp           # guessed: not a victim of this prefetch
                if n_new < n_max and self.p_id_to_slot[nid] < 0:
                    pm[n_new] = nid
                    n_new += 1
            room = 0
            for s in range(cap):
                nid = self.p_slot_to_id[s]
                if nid < 0 or (not self.p_pinned[s] and sel_stamp[nid] != stamp):
                    room += 1
            n_new = min(n_new, room)            # the first in priority order that fit
            need = self.n_used + n_new - cap
            if need > 0:
                self.st_evictions += self._evict_lru(need, stamp, True)
            qsort(pm, n_new, sizeof(int64_t), _cmp_i64)
            self._place(pm, n_new, step, pslot, True)
            self.st_prefetched += n_new
        return ids[:n_new].copy(), slots[:n_new].copy()

    def unpin(self):
        """The prefetch reads have landed: their slots may be evicted again."""
        self.pinned[:] = 0

    def reset(self):
        """Empty the cache (counters kept; prefetched experts never selected count as wasted)."""
        self.st_pf_wasted += int(np.count_nonzero(self._spec[self.slot_to_id >= 0]))
        self.id_to_slot[:] = -1
        self.slot_to_id[:] = -1
        self.last_used[:] = 0
        self.pinned[:] = 0
        self._spec[:] = 0
        self.n_used = 0

    def stats(self):
        """dict(hits, misses, evictions, dropped: selected ids beyond capacity, prefetched:
        experts a prefetch inserted, prefetch_hits: of those, selected before eviction,
        prefetch_wasted: evicted or reset unselected)."""
        return dict(hits=self.st_hits, misses=self.st_misses, evictions=self.st_evictions,
                    dropped=self.st_dropped, prefetched=self.st_prefetched,
                    prefetch_hits=self.st_pf_hits, prefetch_wasted=self.st_pf_wasted)

    def reset_stats(self):
        self.st_hits = 0
        self.st_misses = 0
        self.st_evictions = 0
        self.st_dropped = 0
        self.st_prefetched = 0
        self.st_pf_hits = 0
        self.st_pf_wasted = 0

    def __repr__(self):
        return (f"ExpertCache(n_ids={self.n_ids}, capacity={self.capacity}, n_used={self.n_used}, "
                f"dtype={self.dtype})")
