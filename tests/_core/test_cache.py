"""The neuron cache (flashrt/_core/cache.pyx) against a plain-Python model.

A hypothesis state machine drives random admit sequences (random windows,
capacities, selections, resets, prefetches of right, wrong and failed guesses)
through the compiled cache and its pure-Python twin, filling the returned slots from a reference matrix as a caller would,
and checks both against a model that knows only sets and last-use steps.
"""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flashrt._core import _reference_cache
from flashrt._core import cache as ccache
from flashrt._core import loader as cloader

IMPLS = {"cython": ccache.NeuronCache, "reference": _reference_cache.NeuronCache}


class Model:
    """What the cache must hold, with no slots: id -> step of last use."""

    def __init__(self, capacity, window):
        self.capacity, self.window, self.last = capacity, window, {}

    def admit(self, selected, step):
        self.last = {i: s for i, s in self.last.items() if s > step - self.window}
        sel = list(dict.fromkeys(int(i) for i in selected))[:self.capacity]
        missing = sorted(i for i in sel if i not in self.last)
        for i in sel:
            if i in self.last:
                self.last[i] = step
        need = len(self.last) + len(missing) - self.capacity
        if need > 0:
            chosen = set(sel)
            victims = sorted((s, i) for i, s in self.last.items() if i not in chosen)[:need]
            for _, i in victims:
                del self.last[i]
        for i in missing:
            self.last[i] = step
        return missing


class CacheMachine(RuleBasedStateMachine):
    @initialize(n_neurons=st.integers(1, 40), cap_frac=st.floats(0, 1.2),
                row_elems=st.integers(0, 5), dtype=st.sampled_from([np.float16, np.float32]),
                window=st.integers(1, 6))
    def setup(self, n_neurons, cap_frac, row_elems, dtype, window):
        capacity = int(round(cap_frac * n_neurons))
        self.n_neurons, self.capacity, self.window = n_neurons, capacity, window
        self.matrix = (np.arange(n_neurons * row_elems, dtype=np.float32)
                       .reshape(n_neurons, row_elems) + 0.5).astype(dtype)  # (n_neurons, row_elems)
        self.caches = {k: cls(n_neurons, capacity, row_elems, dtype, window=window)
                       for k, cls in IMPLS.items()}
        self.model = Model(capacity, window)
        self.step = 0

    @rule(data=st.data(), advance=st.sampled_from([0, 1, 1, 1, 2, 3, 7]),
          guess=st.sampled_from(["none", "none", "exact", "random", "failed"]))
    def admit(self, data, advance, guess):
        """One token: optionally a prefetch first (the exact selection, a random guess, or a
        guess whose reads fail), then admit. With or without the prefetch the cache ends up
        holding what the model says, with the same counters."""
        self.step += advance
        k = data.draw(st.integers(0, self.n_neurons + 3))
        selected = data.draw(st.lists(st.integers(0, self.n_neurons - 1), min_size=k, max_size=k))
        arr = np.array(selected, dtype=data.draw(st.sampled_from([np.int32, np.int64])))
        guessed = None
        if guess == "exact":
            guessed = list(selected)
        elif guess != "none":
            g = data.draw(st.integers(0, self.n_neurons + 3))
            guessed = data.draw(st.lists(st.integers(0, self.n_neurons - 1), min_size=g, max_size=g))
        limit = data.draw(st.integers(0, self.n_neurons + 2)) if guess != "exact" else self.n_neurons
        held_before = {i for i, s in self.model.last.items() if s > self.step - self.window}  # after the window
        want_missing = self.model.admit(selected, self.step)
        uniq = list(dict.fromkeys(selected))[:self.capacity]
        for name, c in self.caches.items():
            n_before_hit = c.stats()["hits"]
            read_ahead = set()
            if guessed is not None:
                ids, slots = c.prefetch(np.array(guessed, np.int64), self.step, limit)
                assert ids.tolist() == sorted(set(ids.tolist())) and len(ids) <= limit, name
                assert len(set(slots.tolist())) == len(slots) and np.all(slots < self.capacity), name
                assert not set(ids.tolist()) & held_before or guess == "random", name
                assert np.array_equal(c.slot_to_id[slots], ids) and np.all(c.id_to_slot[ids] == slots), name
                if guess == "failed":  # the reads went wrong: garbage in the slots, then forgotten
                    c.rows[slots] = -7
                    c.drop_prefetched()
                else:
                    c.rows[slots] = self.matrix[ids]
                    read_ahead = set(ids.tolist())
            missing, first = c.admit(arr, self.step)
            assert missing.dtype == np.int64
            got = missing.tolist()
            assert got == sorted(set(got)) and not set(got) & read_ahead, name
            if guessed is None:
                assert got == want_missing, name
            else:  # the misses not read ahead, and neurons a guess displaced that stay
                assert set(want_missing) - read_ahead <= set(got), name
                assert set(got) - set(want_missing) <= held_before, name
                if guess == "exact" and len(uniq) == len(set(selected)):
                    assert got == sorted(set(want_missing) - read_ahead), name  # nothing displaced for nothing
            assert first + len(missing) == c.n_used, name
            assert c.slot_to_id[first:c.n_used].tolist() == got, name
            # the caller fills the new slots
            c.rows[first:first + len(missing)] = self.matrix[missing]
            assert c.stats()["hits"] - n_before_hit == len(uniq) - len(want_missing)

    @rule(window=st.integers(1, 6))
    def change_window(self, window):
        self.window = self.model.window = window
        for c in self.caches.values():
            c.window = window

    @rule()
    def reset(self):
        self.model.last = {}
        for c in self.caches.values():
            c.reset()

    @invariant()
    def consistent(self):
        if not hasattr(self, "caches"):
            return
        ref = self.caches["reference"]
        for name, c in self.caches.items():
            n = c.n_used
            assert 0 <= n <= self.capacity
            ids = c.used_ids()
            assert sorted(ids.tolist()) == sorted(self.model.last), name
            # maps are inverse of each other, absent neurons are -1
            assert np.array_equal(c.id_to_slot[ids], np.arange(n)), name
            absent = np.setdiff1d(np.arange(self.n_neurons), ids)
            assert np.all(c.id_to_slot[absent] == -1), name
            assert np.all(c.slot_to_id[n:] == -1), name
            # rows[:n_used] hold exactly each id's row, contiguously
            np.testing.assert_array_equal(c.used_rows(), self.matrix[ids])
            assert c.used_rows().flags.c_contiguous and c.used_rows().shape[0] == n
            if c.rows.size:
                assert np.shares_memory(c.rows[:max(n, 1)], c.used_rows()) or n == 0
                assert c.rows.ctypes.data % 4096 == 0
            # last-use steps as the model says
            assert [int(c.last_used[s]) for s in range(n)] == [self.model.last[int(i)] for i in ids]
            # compiled and reference agree slot by slot
            assert np.array_equal(c.slot_to_id, ref.slot_to_id), name
            assert c.stats() == ref.stats(), name


CacheMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestCacheMachine = CacheMachine.TestCase


@pytest.mark.parametrize("impl", IMPLS)
def test_window_and_lru_by_hand(impl):
    c = IMPLS[impl](10, 4, 2, np.float32, window=2)
    m, f = c.admit([5, 1, 7], step=0)
    assert m.tolist() == [1, 5, 7] and f == 0 and c.n_used == 3
    c.rows[:3] = [[1, 1], [5, 5], [7, 7]]
    m, f = c.admit([7, 2], step=1)               # 2 appended; nothing expired yet
    assert m.tolist() == [2] and f == 3
    c.rows[3] = [2, 2]
    # step 2: 1 and 5 (last used 0 <= 2-2) expire; 7 and 2 stay
    m, f = c.admit([3], step=2)
    assert sorted(c.used_ids().tolist()) == [2, 3, 7] and m.tolist() == [3]
    assert c.stats()["evictions_window"] == 2
    # the expired slot 0 got the last row (2) moved in: rows stay dense and right
    assert {int(i): c.used_rows()[s][0] for s, i in enumerate(c.used_ids()) if i != 3} == {7: 7, 2: 2}
    c.rows[f] = [3, 3]
    # full: 4 slots would be needed for [4, 8] + 3 held + ... -> LRU among unselected
    m, f = c.admit([4, 8, 3], step=2)
    assert m.tolist() == [4, 8]
    # victims: unselected {2 (used 1), 7 (used 1)} -> oldest first, ties by lower id: 2
    assert sorted(c.used_ids().tolist()) == [3, 4, 7, 8]
    assert c.stats()["evictions_lru"] == 1
    # bigger than capacity: first 4 unique in priority order
    m, f = c.admit([9, 9, 0, 6, 1, 3, 2], step=3)
    assert sorted(c.used_ids().tolist()) == [0, 1, 6, 9]
    assert m.tolist() == [0, 1, 6, 9] and c.stats()["dropped"] == 2
    c.reset()
    assert c.n_used == 0 and np.all(c.id_to_slot == -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    c = IMPLS[impl](10, 4, 2, np.float16)
    with pytest.raises(IndexError):
        c.admit([1, 10], 0)
    with pytest.raises(IndexError):
        c.admit([-1], 0)
    with pytest.raises(ValueError):
        c.admit(np.array([1.0, 2.0]), 0)
    with pytest.raises(ValueError):
        IMPLS[impl](10, 4, 2, np.int8)
    with pytest.raises(ValueError):
        IMPLS[impl](10, 4, 2, np.float16, window=0)
    m, f = c.admit(np.array([], np.int64), 0)
    assert m.tolist() == [] and f == 0


def test_filled_by_loader(tmp_path):
    """The intended use: cache.admit -> loader.read_rows into rows[first:first+k]."""
    rng = np.random.default_rng(3)
    n, d = 300, 3 * 64
    bundles = rng.standard_normal((n, d)).astype(np.float16)    # (n_neurons, 3 * dim)
    path = tmp_path / "ffn.bin"
    layer_offset = 8192
    with open(path, "wb") as f:
        f.write(b"\0" * layer_offset)
        f.write(bundles.tobytes())
    c = ccache.NeuronCache(n, 120, d, np.float16, window=3)
    with cloader.Loader(path, n_threads=2) as ld:
        for step in range(40):
            sel = rng.permutation(n)[:rng.integers(20, 140)]
            missing, first = c.admit(sel, step)
            ld.read_rows(layer_offset, d * 2, missing, c.rows[first:first + len(missing)])
            np.testing.assert_array_equal(c.used_rows().view(np.uint16),
                                          bundles[c.used_ids()].view(np.uint16))
            kept = list(dict.fromkeys(sel.tolist()))[:120]
            assert np.all(c.id_to_slot[kept] >= 0)     # every admitted selected neuron is there
    st_ = c.stats()
    assert st_["hits"] > 0 and st_["misses"] > 0 and st_["evictions"] > 0


@pytest.mark.parametrize("mod", [ccache, _reference_cache], ids=["cython", "reference"])
@pytest.mark.parametrize("dtype,width", [(np.float16, 24), (np.float32, 7), (np.uint8, 36)])
def test_take_rows_gathers_whole_rows(mod, dtype, width):
    """take_rows (the prefetch stage -> cache copy) against fancy indexing, and its refusals."""
    rng = np.random.default_rng(5)
    src = (rng.standard_normal((40, width)) * 50).astype(dtype)
    idx = rng.permutation(40)[:17]
    out = np.zeros((17, width), dtype)
    assert mod.take_rows(src, idx, out) is out
    np.testing.assert_array_equal(out, src[idx])
    mod.take_rows(src, idx[:0], out[:0])  # nothing to copy
    with pytest.raises(IndexError, match="out of range"):
        mod.take_rows(src, np.array([3, 40]), out[:2])
    with pytest.raises(ValueError, match="rows"):
        mod.take_rows(src, idx, out[:5])
    with pytest.raises(ValueError, match="do not match"):
        mod.take_rows(src, idx, np.zeros((17, width + 1), dtype))
    with pytest.raises(ValueError, match="C-contiguous"):
        mod.take_rows(src, idx[:3], np.zeros((17, 2 * width), dtype)[:3, ::2])
