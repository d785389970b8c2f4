"""FlashFFN (flashrt/ffn/flash.py) alone, against the dense FFN and a NumPy oracle over the
bundle rows: decode through the cache, the overflow path, naive streaming, prefill seeding,
no-reuse, and the temporal prior it hands the selector."""
import dataclasses

import numpy as np
import pytest

from flashrt.api import model_args
from flashrt.budget import plan_budget
from flashrt.ffn.dense import DenseFFN
from flashrt.ffn.flash import FlashFFN
from flashrt.ffn.layout import part_views
from flashrt.ffn.selection import AllSelector
from flashrt.format import ModelFiles

ATOL = 2e-5


class FixedSelector:
    """Selects a fixed random subset per (layer, call); records the priors it was handed."""

    name = "fixed"

    def __init__(self, n_neurons, keep, seed=0, uses_prior=False):
        self.rng = np.random.default_rng(seed)
        self.n, self.k = n_neurons, keep
        self.uses_prior = uses_prior
        self.calls = []  # (layer, ids, prior copy or None)

    def select(self, layer, x, prior=None):
        ids = self.rng.choice(self.n, self.k, replace=False).astype(np.int64)
        self.calls.append((layer, ids, None if prior is None else prior.copy()))
        return ids

    def close(self):
        pass


def setup(path, cache_rows=None):
    files = ModelFiles.open(path)
    family, args = model_args(files)
    weights = files.load_resident()
    spec = family.ffn_spec(args, weights)
    plan = plan_budget(files, args, "flash", None, None, args.max_position_embeddings)
    if cache_rows is not None:
        plan = dataclasses.replace(plan, cache_rows=cache_rows)
    dense = DenseFFN.from_files(files, spec, n_threads=1)
    return files, spec, plan, dense


def neuron_h(dense, layer, x):
    """h (n,) float64 of every neuron for x (d,): the NumPy oracle from the bundle rows."""
    B = dense.bundles[layer].astype(np.float64)
    parts = ("gate", "up", "down") if dense.gated else ("up", "down")
    v = part_views(B, parts, dense.dim)
    if dense.gated:
        g = v["gate"] @ x
        return g / (1 + np.exp(-g)) * (v["up"] @ x)
    pre = v["up"] @ x + dense.up_bias[layer]
    return np.maximum(pre, 0) if dense.act == "relu" else pre  # the fixtures are ReLU


def oracle(dense, layer, x, ids):
    """The FFN output over the neurons `ids` only, (d,) float64."""
    B = dense.bundles[layer].astype(np.float64)
    h = neuron_h(dense, layer, x)
    y = h[ids] @ B[ids, (2 if dense.gated else 1) * dense.dim:]
    if dense.down_bias[layer] is not None:
        y = y + dense.down_bias[layer]
    return y


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_decode_with_every_neuron_equals_dense(tiny_models, name):
    files, spec, plan, dense = setup(tiny_models[name])
    ffn = FlashFFN(files, spec, plan, "flash", AllSelector(files.n_neurons), 2, 1)
    rng = np.random.default_rng(1)
    try:
        for _ in range(3):
            for layer in range(files.n_layers):
                x = rng.standard_normal((1, files.dim)).astype(np.float32)
                np.testing.assert_allclose(ffn(layer, x), dense(layer, x), atol=ATOL, rtol=0)
        s = ffn.run_stats()
        assert s["neurons_selected_per_token"] == s["neurons_computed_per_token"] == 1.0
        assert 0.0 < s["neurons_read_per_token"] < 1.0  # read once, then held by the window
    finally:
        ffn.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_a_selection_larger_than_the_cache_is_still_exact(tiny_models, name):
    """cache_rows < selection: the rest streams through the chunk buffer (_overflow)."""
    files, spec, plan, dense = setup(tiny_models[name], cache_rows=5)
    n = files.n_neurons
    ffn = FlashFFN(files, spec, plan, "flash", AllSelector(n), 1, 1)
    rng = np.random.default_rng(2)
    try:
        ffn.start_decode()
        for layer in range(files.n_layers):
            x = rng.standard_normal((1, files.dim)).astype(np.float32)
            np.testing.assert_allclose(ffn(layer, x), dense(layer, x), atol=ATOL, rtol=0)
        assert all(c.n_used == 5 for c in ffn.caches)
        s = ffn.decode_stats()
        assert s["decode_tokens"] == 1
        assert s["neurons_computed_per_token"] == 1.0  # 5 cached + n - 5 streamed
        assert s["neurons_read_per_token"] == 1.0      # all of them read this first token
    finally:
        ffn.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_window_one_computes_exactly_the_selection(tiny_models, name):
    files, spec, plan, dense = setup(tiny_models[name])
    sel = FixedSelector(files.n_neurons, files.n_neurons // 3, seed=3)
    ffn = FlashFFN(files, spec, plan, "flash", sel, 1, 1)
    rng = np.random.default_rng(3)
    try:
        for _ in range(3):
            for layer in range(files.n_layers):
                x = rng.standard_normal(files.dim).astype(np.float32)
                y = ffn(layer, x[None, :])
                ids = sel.calls[-1][1]
                assert y.shape == (1, files.dim) and y.dtype == np.float32
                np.testing.assert_allclose(y[0], oracle(dense, layer, x, ids), atol=ATOL, rtol=0)
                assert sorted(ffn.caches[layer].used_ids().tolist()) == sorted(ids.tolist())
    finally:
        ffn.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_naive_streams_every_neuron_every_token(tiny_models, name):
    files, spec, plan, dense = setup(tiny_models[name])
    plan = dataclasses.replace(plan, cache_rows=0)
    ffn = FlashFFN(files, spec, plan, "naive", AllSelector(files.n_neurons), 1, 1)
    rng = np.random.default_rng(4)
    try:
        ffn.start_decode()
        for layer in range(files.n_layers):
            x = rng.standard_normal((1, files.dim)).astype(np.float32)
            np.testing.assert_allclose(ffn(layer, x), dense(layer, x), atol=ATOL, rtol=0)
        s = ffn.decode_stats()
        assert s["neurons_read_per_token"] == 1.0
        assert s["bytes_read_per_token"] == files.ffn_bytes  # the whole FFN, once
        assert ffn.caches == []
    finally:
        ffn.close()


def test_prefill_streams_and_seeds_the_cache_with_the_last_window(tiny_models):
    files, spec, plan, dense = setup(tiny_models["llama"])
    sel = FixedSelector(files.n_neurons, 4, seed=5)
    ffn = FlashFFN(files, spec, plan, "flash", sel, 2, 1)
    x = np.random.default_rng(5).standard_normal((6, files.dim)).astype(np.float32)
    try:
        np.testing.assert_allclose(ffn(0, x), dense(0, x), atol=ATOL, rtol=0)  # every neuron, every token
        assert len(sel.calls) == 2  # the selections of the last `window` prompt tokens
        want = set(sel.calls[0][1].tolist()) | set(sel.calls[1][1].tolist())
        assert set(ffn.caches[0].used_ids().tolist()) == want
        ffn.reset()
        assert ffn.caches[0].n_used == 0 and ffn.step == 0
    finally:
        ffn.close()


def test_without_reuse_every_token_reads_all_it_selects(tiny_models):
    files, spec, plan, dense = setup(tiny_models["opt"])
    n = files.n_neurons
    ffn = FlashFFN(files, spec, plan, "flash", AllSelector(n), 5, 1)
    ffn.reuse = False
    x = np.random.default_rng(6).standard_normal((1, files.dim)).astype(np.float32)
    try:
        ffn.start_decode()
        for _ in range(3):
            np.testing.assert_allclose(ffn(0, x), dense(0, x), atol=ATOL, rtol=0)
        assert ffn.stats.read == ffn.stats.selected == 3 * n
    finally:
        ffn.close()


def test_the_prior_is_the_last_true_magnitude_of_each_cached_neuron(tiny_models):
    files, spec, plan, dense = setup(tiny_models["llama"])
    n = files.n_neurons
    sel = FixedSelector(n, n // 2, seed=7, uses_prior=True)
    ffn = FlashFFN(files, spec, plan, "flash", sel, 1, 1)
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((2, files.dim)).astype(np.float32)
    try:
        ffn(0, xs[:1])
        ffn(0, xs[1:])
        (_, ids0, prior0), (_, _, prior1) = sel.calls
        assert (prior0 == -1.0).all()  # nothing cached yet
        cached = np.zeros(n, bool)
        cached[ids0] = True
        np.testing.assert_allclose(prior1[cached], np.abs(neuron_h(dense, 0, xs[0].astype(np.float64)))[cached],
                                   atol=ATOL, rtol=1e-5)
        assert (prior1[~cached] == -1.0).all()
    finally:
        ffn.close()
