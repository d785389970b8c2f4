"""The pipelined parts of FlashFFN (flashrt/ffn/flash.py) against the plain paths:
double-buffered streaming (prefill, naive, overflow) against the dense FFN with many small
chunks; prefill's per-layer choice (the estimate, and the sparse prompt against the same
tokens fed one at a time through decode); prefetch across layers against no prefetch (the
same neurons cached and computed, the same outputs up to the order of the sums)."""
import dataclasses

import numpy as np
import pytest

import flashrt.ffn.flash as flash_mod
from flashrt.ffn.flash import FlashFFN, stream_chunk_rows
from flashrt.ffn.selection import AllSelector

from test_flash import ATOL, FixedSelector, oracle, setup


class ProjectionSelector:
    """A stand-in for the predictors: per layer the top `keep` neurons of |P_l x| for a fixed
    random P_l (deterministic in x, as the predictors are). Named "predictor", so FlashFFN
    prefetches with it."""

    name = "predictor"
    uses_prior = False

    def __init__(self, n_layers, n_neurons, dim, keep, seed=0):
        rng = np.random.default_rng(seed)
        self.P = rng.standard_normal((n_layers, n_neurons, dim)).astype(np.float32)
        self.keep_fraction = keep / n_neurons
        self.k = keep

    def select(self, layer, x, prior=None):
        s = np.abs(self.P[layer] @ x)
        top = np.argpartition(-s, self.k - 1)[:self.k]
        return top[np.argsort(-s[top], kind="stable")].astype(np.int64)

    def close(self):
        pass


@pytest.fixture
def small_stream(monkeypatch):
    """Stream chunks of a few rows: the tiny layers go through both buffers many times."""
    monkeypatch.setattr(flash_mod, "STREAM_CHUNK_BYTES", 4 * 4096)


def test_stream_chunks_start_on_block_boundaries():
    for rb in (3456, 2304, 1000, 16384, 8192, 1332, 4097):
        rows = stream_chunk_rows(rb, 1 << 20)
        assert rows >= 1 and rows * rb <= flash_mod.STREAM_CHUNK_BYTES // 2 or rows == 1
        if 4096 // np.gcd(rb, 4096) * rb <= flash_mod.STREAM_CHUNK_BYTES // 2:
            assert rows * rb % 4096 == 0, rb
    assert stream_chunk_rows(3456, 10) == 10


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_double_buffered_streams_equal_dense(tiny_models, small_stream, name):
    files, spec, plan, dense = setup(tiny_models[name])
    rng = np.random.default_rng(11)
    x1 = rng.standard_normal((1, files.dim)).astype(np.float32)
    xT = rng.standard_normal((7, files.dim)).astype(np.float32)
    naive = FlashFFN(files, spec, dataclasses.replace(plan, cache_rows=0), "naive", AllSelector(files.n_neurons), 1, 1)
    try:
        assert files.n_neurons // naive.chunk_rows >= 4   # many chunks through the two buffers
        for layer in range(files.n_layers):
            np.testing.assert_allclose(naive(layer, x1), dense(layer, x1), atol=ATOL, rtol=0)
            np.testing.assert_allclose(naive(layer, xT), dense(layer, xT), atol=ATOL, rtol=0)
        assert naive.loader.stats()["n_async"] > 0
    finally:
        naive.close()
    # the overflow path: a selection of every neuron through a cache of a quarter of them
    n = files.n_neurons
    ffn = FlashFFN(files, spec, dataclasses.replace(plan, cache_rows=n // 4), "flash", AllSelector(n), 1, 1)
    try:
        for layer in range(files.n_layers):
            np.testing.assert_allclose(ffn(layer, x1), dense(layer, x1), atol=ATOL, rtol=0)
    finally:
        ffn.close()


def test_prefill_estimate_picks_sparse_for_short_prompts_only(tiny_models):
    files, spec, plan, dense = setup(tiny_models["llama"])
    n = files.n_neurons
    sel = ProjectionSelector(files.n_layers, n, files.dim, max(1, n // 64))
    ffn = FlashFFN(files, spec, plan, "flash", sel, 2, 1)
    try:
        picks = [ffn.prefill_sparse(t) for t in (2, 4, 16, 64, 1024)]
        # per layer, streaming reads n rows; the sparse path k + (T-1) k new rows at a
        # fixed cost per read: cheaper for few tokens, never for many
        assert picks[0] and not picks[-1]
        assert picks == sorted(picks, reverse=True)     # once streaming wins, it keeps winning
        # with the prompt at hand the selection size and the window's new share are probed
        # on its last tokens: a prompt repeating one input has nothing new after its first token
        x = np.random.default_rng(14).standard_normal((1, files.dim)).astype(np.float32)
        same = np.repeat(x, 300, axis=0)
        assert ffn._probe(0, same) == (sel.k, 0.0)
        assert ffn.prefill_sparse(300, 0, same) and not ffn.prefill_sparse(300)
        ffn.prefill = "stream"
        assert not ffn.prefill_sparse(2)
        ffn.prefill = "sparse"
        assert ffn.prefill_sparse(1024)
    finally:
        ffn.close()
    every = FlashFFN(files, spec, plan, "flash", AllSelector(n), 2, 1)
    try:  # every neuron each token: one sequential pass is always cheaper
        assert not any(every.prefill_sparse(t) for t in (2, 4, 64))
    finally:
        every.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_sparse_prompt_is_the_decode_path_token_by_token(tiny_models, name):
    """prefill="sparse": prompt token j runs through the layer's cache at step j - T + 1,
    exactly as the same inputs fed one by one through decode do (same selections, same
    cache, same outputs); the cache then holds what decoding would hold."""
    files, spec, plan, dense = setup(tiny_models[name])
    n = files.n_neurons
    xs = np.random.default_rng(12).standard_normal((6, files.dim)).astype(np.float32)
    a = FlashFFN(files, spec, plan, "flash", ProjectionSelector(files.n_layers, n, files.dim, n // 3), 2, 1)
    b = FlashFFN(files, spec, plan, "flash", ProjectionSelector(files.n_layers, n, files.dim, n // 3), 2, 1)
    a.prefill = "sparse"
    try:
        ya = a(1, xs)
        b.step = -len(xs)  # decode steps -T+1 .. 0, as the prompt numbers them
        yb = np.concatenate([b._sparse(1, x, j - len(xs) + 1, count=False) for j, x in enumerate(xs)])
        assert np.array_equal(ya, yb)
        assert a.prefill_choices == {"stream": 0, "sparse": 1}
        np.testing.assert_array_equal(a.caches[1].used_ids(), b.caches[1].used_ids())
        # and each output is the FFN over the neurons the window held at that token
        ids = a.selector.select(1, xs[-1])
        held = set(ids.tolist()) | set(a.selector.select(1, xs[-2]).tolist())
        assert set(a.caches[1].used_ids().tolist()) == held
        np.testing.assert_allclose(ya[-1], oracle(dense, 1, xs[-1].astype(np.float64), sorted(held)), atol=ATOL)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_prefetch_computes_the_same_neurons(tiny_models, name):
    """With prefetch the next layer's guessed misses are read ahead into its cache, in
    place: every token caches and computes the same neurons as without it,
    the outputs agree up to the order of the sums, and the guesses are counted."""
    files, spec, plan, dense = setup(tiny_models[name])
    n, L = files.n_neurons, files.n_layers
    runs = {}
    for pf in (False, True):
        sel = ProjectionSelector(L, n, files.dim, n // 4, seed=3)
        ffn = FlashFFN(files, spec, dataclasses.replace(plan, cache_rows=n // 2), "flash", sel, 3, 1)
        ffn.prefetch = pf
        rng = np.random.default_rng(13)
        outs, cached = [], []
        try:
            ffn.start_decode()
            for t in range(8):
                # every layer sees a small step from the previous layer's input, as a residual
                # stream does: the guesses are partly right
                x = rng.standard_normal((1, files.dim)).astype(np.float32)
                for layer in range(L):
                    outs.append(ffn(layer, x)[0])
                    cached.append(np.sort(ffn.caches[layer].used_ids()))
                    x = x + 0.3 * rng.standard_normal((1, files.dim)).astype(np.float32)
            runs[pf] = (np.array(outs), cached, ffn.decode_stats(), ffn.io_stats())
        finally:
            ffn.close()
    (o0, c0, s0, io0), (o1, c1, s1, io1) = runs[False], runs[True]
    for a, b in zip(c0, c1):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(o1, o0, atol=1e-5, rtol=1e-5)
    assert s0["neurons_computed_per_token"] == s1["neurons_computed_per_token"]
    assert "prefetch_hit_rate" not in s0
    assert s1["neurons_prefetched_per_token"] > 0 and 0 < s1["prefetch_hit_rate"] <= 1
    # a hit is a row not read again on demand; every prefetched row counts as read, and so
    # does a neuron a guess displaced that the cache kept (read again)
    hits = s1["prefetch_hit_rate"] * s1["neurons_prefetched_per_token"]
    extra = s1["neurons_prefetched_per_token"] - hits + s1["neurons_restored_per_token"]
    assert s1["neurons_read_per_token"] == pytest.approx(s0["neurons_read_per_token"] + extra)
    assert io1["bytes_useful"] == pytest.approx(
        io0["bytes_useful"] + extra * s1["decode_tokens"] * L * n * files.ffn_row_bytes)


@pytest.mark.parametrize("related", [True, False])
def test_prefetch_pauses_a_layer_whose_guesses_miss(tiny_models, related):
    """A layer whose guesses keep missing (the next layer's input unrelated to this one's)
    stops being guessed for PREFETCH_PAUSE tokens; one whose guesses hit is guessed every
    token. Either way every guessed row is counted as read, and the outputs are those of the
    FFN over the cached neurons (the same as without prefetch)."""
    files, spec, plan, dense = setup(tiny_models["opt"])
    n, L = files.n_neurons, files.n_layers
    outs = {}
    for pf in (False, True):
        sel = ProjectionSelector(L, n, files.dim, n // 4, seed=4)
        ffn = FlashFFN(files, spec, dataclasses.replace(plan, cache_rows=n // 2), "flash", sel, 1, 1)
        ffn.prefetch = pf
        guesses = []
        real = ffn._prefetch
        ffn._prefetch = lambda layer, x, cost: (guesses.append((ffn.step, layer)), real(layer, x, cost))
        rng = np.random.default_rng(21)
        got = []
        try:
            ffn.start_decode()
            for t in range(20):
                x = rng.standard_normal((1, files.dim)).astype(np.float32)
                for layer in range(L):
                    got.append(ffn(layer, x)[0])
                    if not related:
                        x = rng.standard_normal((1, files.dim)).astype(np.float32)
            st = ffn.decode_stats()
        finally:
            ffn.close()
        outs[pf] = np.array(got)
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    per_layer = [sum(1 for _, l in guesses if l == layer) for layer in range(1, L)]
    if related:  # the same input: every guess hits, every token guesses every next layer
        assert per_layer == [20] * (L - 1)
        assert st["prefetch_hit_rate"] == 1.0
    else:  # a window of 1 token and unrelated inputs: most guesses miss, the layers pause
        assert st["prefetch_hit_rate"] < flash_mod.PREFETCH_MIN_HIT
        assert all(3 <= k <= 20 // flash_mod.PREFETCH_PAUSE + 4 for k in per_layer), per_layer


class FailingPrefetchLoader:
    """Delegates to a real Loader (FlashFFN's pf_loader); the `fail`-th batch read into
    whole-cache slots (a prefetch) lands garbage in its rows and raises from wait(), as a
    failed read would."""

    def __init__(self, inner, fail):
        self.inner, self.fail, self.n_pf, self.bad = inner, fail, 0, None

    def submit_rows(self, layer_offset, row_bytes, ids, dest, slots=None):
        self.inner.submit_rows(layer_offset, row_bytes, ids, dest, slots=slots)
        if slots is not None:
            self.n_pf += 1
            if self.n_pf == self.fail:
                self.bad = (dest, slots)

    def wait(self):
        r = self.inner.wait()
        if self.bad is not None:
            dest, slots = self.bad
            self.bad = None
            dest[slots] = 7  # what a torn read might leave
            raise OSError(5, "injected read error")
        return r

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_a_failed_prefetch_leaves_no_bad_rows(tiny_models, name):
    """A guess whose reads fail raises from the layer that waits for it; the rows it left
    behind are never computed: every later output is the FFN over exactly the neurons the
    cache then holds, read from the file (the displaced ones read again)."""
    files, spec, plan, dense = setup(tiny_models[name])
    n, L = files.n_neurons, files.n_layers
    sel = ProjectionSelector(L, n, files.dim, n // 4, seed=5)
    ffn = FlashFFN(files, spec, dataclasses.replace(plan, cache_rows=n // 3), "flash", sel, 2, 1)
    ffn.pf_loader = FailingPrefetchLoader(ffn.pf_loader, fail=2 * (L - 1) + 3)
    rng = np.random.default_rng(8)
    raised = checked = 0
    try:
        ffn.start_decode()
        for t in range(6):
            x = rng.standard_normal((1, files.dim)).astype(np.float32)
            for layer in range(L):
                try:
                    y = ffn(layer, x)[0]
                except OSError:
                    raised += 1
                    continue
                ids = np.sort(ffn.caches[layer].used_ids())
                np.testing.assert_allclose(y, oracle(dense, layer, x[0].astype(np.float64), ids), atol=ATOL)
                checked += 1
                x = x + 0.3 * rng.standard_normal((1, files.dim)).astype(np.float32)
        st = [c.stats() for c in ffn.caches]
    finally:
        ffn.close()
    assert raised == 1 and checked == 6 * L - 1
    assert sum(s["prefetched"] for s in st) > 0 and sum(s["prefetch_wasted"] for s in st) > 0
