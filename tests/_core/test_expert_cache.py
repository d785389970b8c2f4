"""The MoE expert cache (cache.pyx's ExpertCache, slots that stay put) against a plain-Python
model, as test_cache.py does for the neuron cache.

A hypothesis state machine drives random admits, prefetches, unpins and resets through the
compiled cache and its pure-Python twin, filling the returned slots from a reference matrix as
the MoE FFN's loader would, and checks both against a model that knows only ids, last-use
steps and pins: the same experts cached, every expert's row in its slot, no cached expert
ever moving, LRU victims, and the hit / prefetch counters.
"""
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flashrt._core import _reference_cache
from flashrt._core import _reference_loader
from flashrt._core import cache as ccache
from flashrt._core import loader as cloader

IMPLS = {"cython": ccache.ExpertCache, "reference": _reference_cache.ExpertCache}


class Model:
    """id -> last step, the pinned ids, the prefetched ids not selected since, counters."""

    def __init__(self, capacity):
        self.capacity, self.last, self.pinned, self.spec = capacity, {}, set(), set()
        self.st = dict(hits=0, misses=0, evictions=0, dropped=0, prefetched=0, prefetch_hits=0, prefetch_wasted=0)

    def _evict(self, need, protect):
        victims = sorted((s, i) for i, s in self.last.items() if i not in protect and i not in self.pinned)[:max(need, 0)]
        for _, i in victims:
            del self.last[i]
            if i in self.spec:
                self.spec.discard(i)
                self.st["prefetch_wasted"] += 1
        self.st["evictions"] += len(victims)

    def admit(self, selected, step):
        uniq = list(dict.fromkeys(int(i) for i in selected))
        self.st["dropped"] += max(0, len(uniq) - self.capacity)
        sel = uniq[:self.capacity]
        missing = sorted(i for i in sel if i not in self.last)
        for i in sel:
            if i in self.last:
                self.last[i] = step
                self.st["hits"] += 1
                if i in self.spec:
                    self.spec.discard(i)
                    self.st["prefetch_hits"] += 1
        self._evict(len(self.last) + len(missing) - self.capacity, set(sel))
        self.st["misses"] += len(missing)
        for i in missing:
            self.last[i] = step
        return missing

    def prefetch(self, guessed, step, limit):
        guess = set(int(g) for g in guessed)
        new = [i for i in dict.fromkeys(int(g) for g in guessed) if i not in self.last][:min(limit, self.capacity)]
        kept = sum(1 for i in self.last if i in self.pinned or i in guess)   # slots no guess may take
        new = new[:self.capacity - kept]
        self._evict(len(self.last) + len(new) - self.capacity, guess)
        for i in new:
            self.last[i] = step
            self.pinned.add(i)
            self.spec.add(i)
        self.st["prefetched"] += len(new)
        return sorted(new)


class ExpertCacheMachine(RuleBasedStateMachine):
    @initialize(n_ids=st.integers(1, 24), capacity=st.integers(0, 26), row_elems=st.integers(0, 4),
                dtype=st.sampled_from([np.float16, np.float32, np.uint8]))
    def setup(self, n_ids, capacity, row_elems, dtype):
        self.n_ids, self.capacity = n_ids, capacity
        self.matrix = (np.arange(n_ids * row_elems).reshape(n_ids, row_elems) % 250 + 1).astype(dtype)
        self.caches = {k: cls(n_ids, capacity, row_elems, dtype) for k, cls in IMPLS.items()}
        self.model = Model(capacity)
        self.slot_of = {}  # id -> slot, as long as it stays cached (must never change)
        self.step = 0

    def _fill(self, ids, slots):
        for name, c in self.caches.items():
            got_ids, got_slots = ids[name], slots[name]
            assert got_ids.dtype == np.int64 and got_slots.dtype == np.int64
            c.rows[got_slots] = self.matrix[got_ids]

    @precondition(lambda self: hasattr(self, "caches"))
    @rule(data=st.data(), advance=st.sampled_from([0, 1, 1, 2, 5]))
    def admit(self, data, advance):
        self.step += advance
        room = self.capacity - len(self.model.pinned)   # the FFN never selects more than the unpinned room
        k = data.draw(st.integers(0, max(0, min(self.n_ids + 2, room + 2 if room == self.capacity else room))))
        selected = data.draw(st.lists(st.integers(0, self.n_ids - 1), min_size=k, max_size=k))
        arr = np.array(selected, dtype=data.draw(st.sampled_from([np.int32, np.int64])))
        want = self.model.admit(selected, self.step)
        ids, slots = {}, {}
        for name, c in self.caches.items():
            ids[name], slots[name] = c.admit(arr, self.step)
            assert ids[name].tolist() == want, name
            assert np.all(np.diff(slots[name]) > 0), name
            assert [int(c.id_to_slot[i]) for i in want] == slots[name].tolist(), name
        assert slots["cython"].tolist() == slots["reference"].tolist()
        self._fill(ids, slots)

    @precondition(lambda self: hasattr(self, "caches"))
    @rule(data=st.data(), limit=st.integers(0, 10))
    def prefetch(self, data, limit):
        guessed = data.draw(st.lists(st.integers(0, self.n_ids - 1), max_size=self.n_ids + 2))
        want = self.model.prefetch(guessed, self.step, limit)
        ids, slots = {}, {}
        for name, c in self.caches.items():
            ids[name], slots[name] = c.prefetch(np.array(guessed, np.int64), self.step, limit)
            assert ids[name].tolist() == want, name
            assert all(c.pinned[s] == 1 for s in slots[name]), name
        assert slots["cython"].tolist() == slots["reference"].tolist()
        self._fill(ids, slots)

    @precondition(lambda self: hasattr(self, "caches"))
    @rule()
    def unpin(self):
        self.model.pinned = set()
        for c in self.caches.values():
            c.unpin()

    @precondition(lambda self: hasattr(self, "caches"))
    @rule()
    def reset(self):
        self.model.st["prefetch_wasted"] += len(self.model.spec)
        self.model.last, self.model.pinned, self.model.spec = {}, set(), set()
        self.slot_of = {}
        for c in self.caches.values():
            c.reset()

    @invariant()
    def consistent(self):
        if not hasattr(self, "caches"):
            return
        for name, c in self.caches.items():
            ids = c.used_ids()
            assert sorted(ids.tolist()) == sorted(self.model.last), name
            assert c.n_used == len(ids) <= self.capacity, name
            slots = c.id_to_slot[ids]
            assert np.array_equal(c.slot_to_id[slots], ids), name            # the maps are inverse
            assert np.count_nonzero(c.slot_to_id >= 0) == len(ids), name
            absent = np.setdiff1d(np.arange(self.n_ids), ids)
            assert np.all(c.id_to_slot[absent] == -1), name
            np.testing.assert_array_equal(c.rows[slots], self.matrix[ids])   # each expert's row in its slot
            assert [int(c.last_used[s]) for s in slots] == [self.model.last[int(i)] for i in ids], name
            assert sorted(int(c.slot_to_id[s]) for s in np.nonzero(c.pinned)[0]) == sorted(self.model.pinned), name
            assert c.stats() == self.model.st, name
            if c.rows.size:
                assert c.rows.ctypes.data % 4096 == 0
        ref = self.caches["reference"]
        for c in self.caches.values():
            assert np.array_equal(c.slot_to_id, ref.slot_to_id)
        # slot stability: an expert that stays cached never moves
        now = {int(i): int(ref.id_to_slot[i]) for i in ref.used_ids()}
        for i, s in now.items():
            if i in self.slot_of:
                assert self.slot_of[i] == s, (i, self.slot_of[i], s)
        self.slot_of = now


ExpertCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestExpertCacheMachine = ExpertCacheMachine.TestCase


@pytest.mark.parametrize("impl", IMPLS)
def test_lru_in_place_by_hand(impl):
    c = IMPLS[impl](8, 3, 2, np.float32)
    m, s = c.admit([5, 1], step=0)
    assert m.tolist() == [1, 5] and s.tolist() == [0, 1]
    m, s = c.admit([1, 7], step=1)
    assert m.tolist() == [7] and s.tolist() == [2]
    m, s = c.admit([2, 7], step=2)               # full: 5 (used at 0) is the LRU, its slot 1 is reused
    assert m.tolist() == [2] and s.tolist() == [1]
    assert c.id_to_slot[[1, 2, 7]].tolist() == [0, 1, 2] and c.id_to_slot[5] == -1
    g, s = c.prefetch([7, 4, 6], step=2, limit=2)  # 7 is cached; 4 and 6 wanted, both unpinned slots go LRU
    assert g.tolist() == [4, 6] and sorted(s.tolist()) == [0, 1] and c.pinned.sum() == 2
    with pytest.raises(RuntimeError, match="pinned"):
        c.admit([0, 3], step=3)                  # two missing, one unpinned slot (7's)
    c.unpin()
    c.reset_stats()
    m, s = c.admit([4, 3], step=4)
    assert m.tolist() == [3] and c.stats()["prefetch_hits"] == 1 and c.stats()["hits"] == 1
    c.reset()
    assert c.n_used == 0 and np.all(c.id_to_slot == -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    c = IMPLS[impl](10, 4, 2, np.float16)
    with pytest.raises(IndexError):
        c.admit([1, 10], 0)
    with pytest.raises(IndexError):
        c.prefetch([-1], 0, 2)
    with pytest.raises(ValueError):
        c.admit(np.array([1.0, 2.0]), 0)
    with pytest.raises(ValueError):
        IMPLS[impl](10, 4, 2, np.int8)
    m, s = c.admit(np.array([], np.int64), 0)
    assert m.tolist() == [] and s.tolist() == []


@pytest.mark.parametrize("loader", [cloader.Loader, _reference_loader.Loader])
def test_read_into_slots(tmp_path, loader):
    """The intended use: admit -> read_rows(..., cache.rows, slots=slots), O_DIRECT in place,
    and submit_rows for a prefetch; every cached expert's bytes match the file."""
    rng = np.random.default_rng(5)
    n, row = 40, 3 * 4096
    experts = rng.integers(0, 256, (n, row), dtype=np.uint8)      # (n_experts, expert bytes)
    path = tmp_path / "ffn.bin"
    offset = 8192
    path.write_bytes(b"\0" * offset + experts.tobytes())
    c = ccache.ExpertCache(n, 9, row, np.uint8)
    with loader(str(path), n_threads=2) as ld:
        for step in range(30):
            sel = rng.permutation(n)[:4]
            missing, slots = c.admit(sel, step)
            ld.read_rows(offset, row, missing, c.rows, slots=slots)
            guess, gslots = c.prefetch(rng.permutation(n)[:3], step, 3)
            ld.submit_rows(offset, row, guess, c.rows, slots=gslots)
            for _ in range(10000):           # landed: polled without blocking, True once the batch is read
                if ld.landed:
                    break
                time.sleep(0.001)
            assert ld.landed
            ld.wait()
            assert ld.landed
            c.unpin()
            ids = c.used_ids()
            np.testing.assert_array_equal(c.rows[c.id_to_slot[ids]], experts[ids])
        with pytest.raises(ValueError, match="slots"):
            ld.read_rows(offset, row, np.array([1, 2]), c.rows, slots=np.array([3, 3]))
        with pytest.raises(ValueError, match="slots"):
            ld.read_rows(offset, row, np.array([1]), c.rows, slots=np.array([9]))
    assert c.stats()["evictions"] > 0 and c.stats()["prefetched"] > 0
