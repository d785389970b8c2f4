"""Pure-Python twin of flashrt/_core/cache.pyx (same API, same slot layout
after every call): the oracle for tests and a fallback without the compiled core.

One layer's neuron cache (the paper's DRAM management, "LLM in a flash" §3.3):
a preallocated matrix with one row per cached neuron and two index maps.
Evicted neurons free their slots, the highest rows in use move into the free ones
below them and new neurons are appended, so rows[:n_used] is a dense matrix over the
cached neurons after every admit; prefetch() reads guessed neurons in place.
"""
import numpy as np

# float bundles, or uint8 for quantized bundles (row_elems = row bytes)
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.uint8))


def _check_args(n_neurons, capacity, row_elems, dtype, window):
    dt = np.dtype(dtype)
    if dt not in DTYPES:
        raise ValueError(f"NeuronCache dtype must be float16, float32 or uint8 (quantized rows), not {dt}")
    if n_neurons < 0 or capacity < 0 or row_elems < 0:
        raise ValueError("n_neurons, capacity and row_elems must be >= 0")
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    if n_neurons >= 2**31 or capacity >= 2**31:
        raise ValueError("n_neurons and capacity must fit in int32")
    return dt


def _prepare_selected(selected, n_neurons, capacity):
    """Unique ids in priority order (first occurrence wins), cut to capacity.
    Returns (ids as a Python list, number dropped for lack of capacity)."""
    sel = np.asarray(selected)
    if sel.ndim != 1:
        raise ValueError(f"selected must be 1-D, got shape {sel.shape}")
    if sel.size and not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"selected must hold integer neuron ids, not {sel.dtype}")
    sel = sel.astype(np.int64, copy=False)
    if sel.size and (sel.min() < 0 or sel.max() >= n_neurons):
        bad = sel[(sel < 0) | (sel >= n_neurons)][0]
        raise IndexError(f"neuron id {bad} out of range [0, {n_neurons})")
    seen, out = set(), []
    for i in sel.tolist():
        if i not in seen:
            seen.add(i)
            out.append(i)
    dropped = max(0, len(out) - capacity)
    return out[:capacity], dropped


class NeuronCache:
    """NeuronCache(n_neurons, capacity, row_elems, dtype, window=5) for one layer.

    rows        (capacity, row_elems) dtype: rows[:n_used] are the cached neurons' bundles
    slot_to_id  (capacity,) int32: neuron id in each slot (valid for [:n_used], -1 after)
    id_to_slot  (n_neurons,) int32: slot of each neuron, -1 when absent
    last_used   (capacity,) int64: token step each slot's neuron was last selected
    prefetch() / admit() / drop_prefetched(): see cache.pyx (same slots after every call).
    """

    def __init__(self, n_neurons, capacity, row_elems, dtype, window=5):
        dt = _check_args(n_neurons, capacity, row_elems, dtype, window)
        self.n_neurons = int(n_neurons)
        self.capacity = int(capacity)
        self.row_elems = int(row_elems)
        self.dtype = dt
        self.window = int(window)
        row_bytes = row_elems * dt.itemsize                     # 4096-aligned like the compiled one
        raw = np.zeros(capacity * row_bytes + 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096
        self.rows = raw[start:start + capacity * row_bytes].view(dt).reshape(capacity, row_elems)
        self.slot_to_id = np.full(capacity, -1, np.int32)      # (capacity,)
        self.id_to_slot = np.full(n_neurons, -1, np.int32)     # (n_neurons,)
        self.last_used = np.zeros(capacity, np.int64)          # (capacity,)
        self._spec = np.zeros(capacity, np.uint8)              # (capacity,) guessed, not yet selected
        self._ghosts = {}                                      # displaced neuron -> its last use (in order)
        self.n_used = 0
        self.reset_stats()

    @property
    def nbytes(self):
        return (self.rows.nbytes + self.slot_to_id.nbytes + self.id_to_slot.nbytes
                + self.last_used.nbytes)

    @property
    def n_ghost(self):
        return len(self._ghosts)

    @property
    def n_prefetched(self):
        return int(np.count_nonzero(self._spec[:self.n_used]))

    def used_rows(self):
        return self.rows[:self.n_used]

    def used_ids(self):
        return self.slot_to_id[:self.n_used]

    def _free(self, s):
        self.id_to_slot[self.slot_to_id[s]] = -1
        self.slot_to_id[s] = -1
        self._spec[s] = 0

    def _live(self):
        return [s for s in range(self.n_used) if self.slot_to_id[s] >= 0]

    def _expire(self, step):
        lim = step - self.window
        n = 0
        for s in self._live():
            if not self._spec[s] and self.last_used[s] <= lim:
                self._free(s)
                n += 1
        for i, last in list(self._ghosts.items()):
            if last <= lim:
                del self._ghosts[i]
                n += 1
        return n

    def _compact(self):
        """The highest used rows move into the lowest free slots."""
        lo, hi = 0, self.n_used - 1
        while True:
            while lo < hi and self.slot_to_id[lo] >= 0:
                lo += 1
            while hi >= 0 and self.slot_to_id[hi] < 0:
                hi -= 1
            if lo >= hi:
                break
            moved = int(self.slot_to_id[hi])
            self.rows[lo] = self.rows[hi]
            self.slot_to_id[lo], self.last_used[lo], self._spec[lo] = moved, self.last_used[hi], self._spec[hi]
            self.id_to_slot[moved] = lo
            self.slot_to_id[hi], self._spec[hi] = -1, 0
            self.st["moved"] += 1
            lo, hi = lo + 1, hi - 1
        self.n_used = hi + 1

    def admit(self, selected, step):
        """Admit this token's selected neurons (priority order, most important first).

        Returns (missing, first_slot): missing (k,) int64 ascending ids that were
        not cached and now own slots first_slot .. first_slot+k-1, whose rows the
        caller must fill (e.g. loader.read_rows(off, row_bytes, missing,
        cache.rows[first_slot:first_slot+k]))."""
        step = int(step)
        sel, dropped = _prepare_selected(selected, self.n_neurons, self.capacity)
        self.st["dropped"] += dropped
        # (1) the window
        self.st["evictions_window"] += self._expire(step)
        # (2) hits
        sel_set = set(sel)
        missing, n_phit, n_smiss = [], 0, 0
        for i in sel:
            s = self.id_to_slot[i]
            if s >= 0 and self._spec[s]:
                self._spec[s] = 0
                self.last_used[s] = step
                n_phit += 1
                n_smiss += 1
            elif s >= 0:
                self.last_used[s] = step
                self.st["hits"] += 1
            elif i in self._ghosts:
                self._ghosts[i] = step
                self.st["hits"] += 1
            else:
                missing.append(i)
                n_smiss += 1
        self.st["misses"] += n_smiss
        self.st["prefetch_hits"] += n_phit
        n_live = 0
        for s in self._live():
            if self._spec[s]:
                self._free(s)
                self.st["prefetch_wasted"] += 1
            else:
                n_live += 1
        # (3) room: evict the least recently used not selected now (displaced ones too)
        need = n_live - n_phit + len(self._ghosts) + n_smiss - self.capacity
        if need > 0:
            cand = [(int(self.last_used[s]), int(self.slot_to_id[s]), s) for s in self._live()
                    if int(self.slot_to_id[s]) not in sel_set]
            cand += [(last, i, -1) for i, last in self._ghosts.items() if i not in sel_set]
            for _, i, s in sorted(cand)[:need]:
                if s >= 0:
                    self._free(s)
                else:
                    del self._ghosts[i]
            self.st["evictions_lru"] += need
        restored = dict(self._ghosts)
        self.st["restored"] += len(restored)
        missing += list(restored)
        self._ghosts = {}
        # (4) dense again, then append in ascending id order
        self._compact()
        missing.sort()
        first = self.n_used
        for k, i in enumerate(missing):
            s = first + k
            self.slot_to_id[s] = i
            self.id_to_slot[i] = s
            self.last_used[s] = restored.get(i, step)
        self.n_used += len(missing)
        return np.array(missing, dtype=np.int64), first

    def prefetch(self, guessed, step, limit):
        """(ids ascending, slots ascending) for up to `limit` guessed neurons; see cache.pyx."""
        step = int(step)
        guess, _ = _prepare_selected(guessed, self.n_neurons, self.n_neurons)
        self.st["evictions_window"] += self._expire(step)
        n_max = max(0, min(len(guessed), limit, self.capacity))
        new = [i for i in guess if self.id_to_slot[i] < 0 and i not in self._ghosts][:n_max]
        slots = [s for s in range(self.capacity) if s >= self.n_used or self.slot_to_id[s] < 0][:len(new)]
        if len(slots) < len(new):
            gset = set(guess)
            cand = sorted((int(self.last_used[s]), int(self.slot_to_id[s]), s) for s in self._live()
                          if not self._spec[s] and int(self.slot_to_id[s]) not in gset)
            for last, i, s in cand[:len(new) - len(slots)]:
                self._ghosts[i] = last
                self._free(s)
                slots.append(s)
            new = new[:len(slots)]
        new, slots = sorted(new), sorted(slots)
        for i, s in zip(new, slots):
            self.slot_to_id[s], self.id_to_slot[i], self.last_used[s], self._spec[s] = i, s, step, 1
        if slots:
            self.n_used = max(self.n_used, slots[-1] + 1)
        self.st["prefetched"] += len(new)
        return np.array(new, np.int64), np.array(slots, np.int64)

    def drop_prefetched(self):
        for s in self._live():
            if self._spec[s]:
                self._free(s)
                self.st["prefetch_wasted"] += 1

    def reset(self):
        """Empty the cache (the counters are kept: see reset_stats)."""
        for s in self._live():
            if self._spec[s]:
                self.st["prefetch_wasted"] += 1
            self.id_to_slot[self.slot_to_id[s]] = -1
        self._ghosts = {}
        self.slot_to_id[:] = -1
        self.last_used[:] = 0
        self._spec[:] = 0
        self.n_used = 0

    def stats(self):
        d = dict(self.st)
        d["evictions"] = d["evictions_window"] + d["evictions_lru"]
        return d

    def reset_stats(self):
        self.st = dict(hits=0, misses=0, evictions_window=0, evictions_lru=0, dropped=0, prefetched=0,
                       prefetch_hits=0, prefetch_wasted=0, restored=0, moved=0)

    def __repr__(self):
        return (f"NeuronCache(n_neurons={self.n_neurons}, capacity={self.capacity}, "
                f"n_used={self.n_used}, window={self.window}, dtype={self.dtype})")


def take_rows(src, idx, out):
    """out[j] = src[idx[j]] for whole rows (the twin of cache.pyx's take_rows)."""
    src, out = np.asarray(src), np.asarray(out)
    if not (src.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("take_rows: src and out must be C-contiguous (out writable)")
    if src.dtype != out.dtype or src.ndim < 1 or out.ndim != src.ndim or out.shape[1:] != src.shape[1:]:
        raise ValueError(f"take_rows: out {out.dtype}{out.shape[1:]} rows do not match src {src.dtype}{src.shape[1:]}")
    idx = np.asarray(idx, dtype=np.int64)
    if out.shape[0] != idx.shape[0]:
        raise ValueError(f"take_rows: out has {out.shape[0]} rows for {idx.shape[0]} indices")
    bad = np.flatnonzero((idx < 0) | (idx >= src.shape[0]))
    if bad.size:
        raise IndexError(f"take_rows: index {idx[bad[0]]} out of range [0, {src.shape[0]})")
    np.take(src, idx, axis=0, out=out)
    return out


class ExpertCache:
    """Twin of cache.pyx's ExpertCache: one MoE layer's experts in slots that stay put
    (an evicted expert's slot is overwritten in place by the read of its replacement).

    rows (capacity, row_elems), slot_to_id (capacity,) int32 (-1 free), id_to_slot (n_ids,)
    int32, last_used (capacity,) int64, pinned (capacity,) uint8 (a prefetch reading in)."""

    def __init__(self, n_ids, capacity, row_elems, dtype):
        dt = np.dtype(dtype)
        if dt not in DTYPES:
            raise ValueError(f"ExpertCache dtype must be float16, float32 or uint8 (quantized rows), not {dt}")
        if n_ids < 0 or capacity < 0 or row_elems < 0:
            raise ValueError("n_ids, capacity and row_elems must be >= 0")
        if n_ids >= 2**31 or capacity >= 2**31:
            raise ValueError("n_ids and capacity must fit in int32")
        self.n_ids, self.capacity, self.row_elems, self.dtype = int(n_ids), int(capacity), int(row_elems), dt
        row_bytes = row_elems * dt.itemsize
        raw = np.zeros(capacity * row_bytes + 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096
        self.rows = raw[start:start + capacity * row_bytes].view(dt).reshape(capacity, row_elems)
        self.slot_to_id = np.full(capacity, -1, np.int32)
        self.id_to_slot = np.full(n_ids, -1, np.int32)
        self.last_used = np.zeros(capacity, np.int64)
        self.pinned = np.zeros(capacity, np.uint8)
        self._spec = np.zeros(capacity, np.uint8)
        self.n_used = 0
        self.reset_stats()

    @property
    def nbytes(self):
        return (self.rows.nbytes + self.slot_to_id.nbytes + self.id_to_slot.nbytes
                + self.last_used.nbytes + self.pinned.nbytes)

    def used_ids(self):
        return np.sort(self.slot_to_id[self.slot_to_id >= 0])

    def _ids(self, selected):
        sel = np.asarray(selected)
        if sel.ndim != 1:
            raise ValueError(f"selected must be 1-D, got shape {sel.shape}")
        if sel.size and not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"selected must hold integer expert ids, not {sel.dtype}")
        sel = sel.astype(np.int64, copy=False)
        if sel.size and (sel.min() < 0 or sel.max() >= self.n_ids):
            bad = sel[(sel < 0) | (sel >= self.n_ids)][0]
            raise IndexError(f"expert id {bad} out of range [0, {self.n_ids})")
        return list(dict.fromkeys(sel.tolist()))

    def _evict_lru(self, need, protect):
        cand = sorted((int(self.last_used[s]), int(self.slot_to_id[s]), s) for s in range(self.capacity)
                      if self.slot_to_id[s] >= 0 and not self.pinned[s] and int(self.slot_to_id[s]) not in protect)
        for _, i, s in cand[:max(need, 0)]:
            self.id_to_slot[i] = -1
            self.slot_to_id[s] = -1
            if self._spec[s]:
                self.st["prefetch_wasted"] += 1
                self._spec[s] = 0
            self.n_used -= 1
        return min(max(need, 0), len(cand))

    def _place(self, ids, step, spec):
        free = [s for s in range(self.capacity) if self.slot_to_id[s] < 0][:len(ids)]
        for i, s in zip(ids, free):
            self.slot_to_id[s], self.id_to_slot[i], self.last_used[s] = i, s, step
            self._spec[s] = spec
            if spec:
                self.pinned[s] = 1
        self.n_used += len(ids)
        return np.array(ids, np.int64), np.array(free, np.int64)

    def admit(self, selected, step):
        """(missing ascending, their slots ascending); see cache.pyx."""
        uniq = self._ids(selected)
        self.st["dropped"] += max(0, len(uniq) - self.capacity)
        sel = uniq[:self.capacity]
        missing = []
        for i in sel:
            s = self.id_to_slot[i]
            if s >= 0:
                self.last_used[s] = step
                self.st["hits"] += 1
                if self._spec[s]:
                    self._spec[s] = 0
                    self.st["prefetch_hits"] += 1
            else:
                missing.append(i)
        need = self.n_used + len(missing) - self.capacity
        if need > 0 and self._evict_lru(need, set(sel)) < need:
            raise RuntimeError(f"ExpertCache: {self.capacity - self.n_used} free slots for {len(missing)} missing "
                               f"experts: pinned slots (prefetches in flight) leave no room")
        self.st["misses"] += len(missing)
        self.st["evictions"] += max(need, 0)
        return self._place(sorted(missing), int(step), 0)

    def prefetch(self, guessed, step, limit):
        """(ids ascending, slots): up to `limit` guessed experts not cached, pinned; see cache.pyx."""
        guess = self._ids(guessed)
        new = [i for i in guess if self.id_to_slot[i] < 0][:max(0, min(limit, self.capacity))]
        room = sum(1 for s in range(self.capacity) if self.slot_to_id[s] < 0
                   or (not self.pinned[s] and int(self.slot_to_id[s]) not in guess))
        new = new[:room]
        need = self.n_used + len(new) - self.capacity
        if need > 0:
            self.st["evictions"] += self._evict_lru(need, set(guess))
        self.st["prefetched"] += len(new)
        return self._place(sorted(new), int(step), 1)

    def unpin(self):
        self.pinned[:] = 0

    def reset(self):
        self.st["prefetch_wasted"] += int(np.count_nonzero(self._spec[self.slot_to_id >= 0]))
        self.id_to_slot[:] = -1
        self.slot_to_id[:] = -1
        self.last_used[:] = 0
        self.pinned[:] = 0
        self._spec[:] = 0
        self.n_used = 0

    def stats(self):
        return dict(self.st)

    def reset_stats(self):
        self.st = dict(hits=0, misses=0, evictions=0, dropped=0, prefetched=0, prefetch_hits=0, prefetch_wasted=0)

    def __repr__(self):
        return (f"ExpertCache(n_ids={self.n_ids}, capacity={self.capacity}, n_used={self.n_used}, "
                f"dtype={self.dtype})")
