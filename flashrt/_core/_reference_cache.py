"""Pure-Python twin of flashrt/_core/cache.pyx (same API, same slot layout
after every call): the oracle for tests and a fallback without the compiled core.

One layer's neuron cache (the paper's DRAM management, "LLM in a flash" §3.3):
a preallocated matrix with one row per cached neuron and two index maps.
Deleting a neuron moves the last used row into its slot, new neurons are
appended, so rows[:n_used] is always a dense matrix over the cached neurons.
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
        self.n_used = 0
        self.reset_stats()

    @property
    def nbytes(self):
        return (self.rows.nbytes + self.slot_to_id.nbytes + self.id_to_slot.nbytes
                + self.last_used.nbytes)

    def used_rows(self):
        return self.rows[:self.n_used]

    def used_ids(self):
        return self.slot_to_id[:self.n_used]

    def _evict_slots(self, flags):
        """Evict every used slot whose flag is set; the last used slot moves into
        each freed one. Returns how many were evicted."""
        n_ev = 0
        i = 0
        while i < self.n_used:
            while self.n_used > 0 and flags[self.n_used - 1]:      # drop from the end: no move
                last = self.n_used - 1
                self.id_to_slot[self.slot_to_id[last]] = -1
                self.slot_to_id[last] = -1
                flags[last] = False
                self.n_used -= 1
                n_ev += 1
            if i >= self.n_used:
                break
            if flags[i]:
                last = self.n_used - 1
                self.id_to_slot[self.slot_to_id[i]] = -1
                moved = self.slot_to_id[last]
                self.rows[i] = self.rows[last]
                self.slot_to_id[i] = moved
                self.last_used[i] = self.last_used[last]
                self.id_to_slot[moved] = i
                flags[i] = flags[last]
                self.slot_to_id[last] = -1
                flags[last] = False
                self.n_used -= 1
                n_ev += 1
            i += 1
        return n_ev

    def admit(self, selected, step):
        """Admit this token's selected neurons (priority order, most important first).

        Returns (missing, first_slot): missing (k,) int64 ascending ids that were
        not cached and now own slots first_slot .. first_slot+k-1, whose rows the
        caller must fill (e.g. loader.read_rows(off, row_bytes, missing,
        cache.rows[first_slot:first_slot+k]))."""
        step = int(step)
        sel, dropped = _prepare_selected(selected, self.n_neurons, self.capacity)
        self.st["dropped"] += dropped
        # (1) the window: evict neurons not used in the last `window` steps
        flags = [False] * self.capacity
        for s in range(self.n_used):
            flags[s] = bool(self.last_used[s] <= step - self.window)
        self.st["evictions_window"] += self._evict_slots(flags)
        # (2) hits
        sel_set = set(sel)
        missing = []
        for i in sel:
            s = self.id_to_slot[i]
            if s >= 0:
                self.last_used[s] = step
                self.st["hits"] += 1
            else:
                missing.append(i)
        self.st["misses"] += len(missing)
        # (3) room for the missing: evict least recently used, not selected now
        need = self.n_used + len(missing) - self.capacity
        if need > 0:
            cand = sorted((int(self.last_used[s]), int(self.slot_to_id[s]), s)
                          for s in range(self.n_used) if int(self.slot_to_id[s]) not in sel_set)
            flags = [False] * self.capacity
            for _, _, s in cand[:need]:
                flags[s] = True
            self.st["evictions_lru"] += self._evict_slots(flags)
        # (4) append the missing in ascending id order
        missing.sort()
        first = self.n_used
        for k, i in enumerate(missing):
            s = first + k
            self.slot_to_id[s] = i
            self.id_to_slot[i] = s
            self.last_used[s] = step
        self.n_used += len(missing)
        return np.array(missing, dtype=np.int64), first

    def reset(self):
        """Empty the cache (the counters are kept: see reset_stats)."""
        self.id_to_slot[self.slot_to_id[:self.n_used]] = -1
        self.slot_to_id[:] = -1
        self.last_used[:] = 0
        self.n_used = 0

    def stats(self):
        d = dict(self.st)
        d["evictions"] = d["evictions_window"] + d["evictions_lru"]
        return d

    def reset_stats(self):
        self.st = dict(hits=0, misses=0, evictions_window=0, evictions_lru=0, dropped=0)

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
