"""The selectors (flashrt/ffn/selection.py): one `select(layer, x, prior=None)` each, checked
against NumPy over the model's own bundle rows (oracle) or against what they pass on (predictor)."""
import numpy as np
import pytest

from flashrt.api import model_args
from flashrt.ffn.layout import part_views
from flashrt.ffn.selection import AllSelector, OracleSelector, PredictorSelector
from flashrt.format import ModelFiles


def true_h(files, spec, layer, x):
    """Every neuron's h for x, float64, from ffn.bin read with NumPy."""
    B = files.read_ffn_layer(layer).astype(np.float64)
    v = part_views(B, files.ffn_parts, files.dim)
    if spec.gated:
        g = v["gate"] @ x
        return g / (1 + np.exp(-g)) * (v["up"] @ x)
    return np.maximum(v["up"] @ x + spec.up_bias[layer], 0)


def opened(path):
    files = ModelFiles.open(path)
    family, args = model_args(files)
    return files, family.ffn_spec(args, files.load_resident())


def test_all_selects_every_neuron_whatever_the_prior():
    s = AllSelector(7)
    x = np.zeros(4, np.float32)
    for prior in (None, np.full(7, -1.0, np.float32)):
        ids = s.select(0, x, prior)
        assert ids.dtype == np.int64 and ids.tolist() == list(range(7))
    assert not s.uses_prior
    s.close()


def test_oracle_on_relu_is_the_positive_set_best_first(tiny_models):
    files, spec = opened(tiny_models["opt"])
    s = OracleSelector(files, spec.gated, spec.act_code, spec.up_bias, None, 1)
    rng = np.random.default_rng(0)
    try:
        for layer in range(files.n_layers):
            x = rng.standard_normal(files.dim).astype(np.float32)
            h = true_h(files, spec, layer, x.astype(np.float64))
            ids = s.select(layer, x)
            assert ids.dtype == np.int64
            assert set(ids.tolist()) == set(np.flatnonzero(h > 0).tolist())
            assert (np.diff(h[ids]) <= 1e-6).all()  # most important first
    finally:
        s.close()


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_oracle_on_gated_keeps_the_top_fraction_by_magnitude(tiny_models, keep):
    files, spec = opened(tiny_models["llama"])
    s = OracleSelector(files, spec.gated, spec.act_code, spec.up_bias, keep, 1)
    n = files.n_neurons
    rng = np.random.default_rng(1)
    try:
        x = rng.standard_normal(files.dim).astype(np.float32)
        mag = np.abs(true_h(files, spec, 0, x.astype(np.float64)))
        ids = s.select(0, x, prior=np.zeros(n, np.float32))  # the prior is ignored
        k = round(keep * n)
        assert ids.size == k and len(set(ids.tolist())) == k
        kth = np.sort(mag)[::-1][k - 1]
        assert mag[ids].min() >= kth - 1e-5  # the k largest, up to float32 ties
        assert (np.diff(mag[ids]) <= 1e-5).all()
    finally:
        s.close()


def test_oracle_on_a_smooth_ungated_ffn_keeps_the_top_fraction(tiny_models):
    """Phi-2's FFN (fc1 -> tanh GELU -> fc2) is never exactly zero: the oracle keeps the share
    asked for, by |h| (not every non-zero neuron, which would be all of them)."""
    files, spec = opened(tiny_models["phi"])
    assert not spec.gated and spec.act == "gelu_tanh"
    s = OracleSelector(files, spec.gated, spec.act_code, spec.up_bias, 0.25, 1)
    try:
        x = np.random.default_rng(2).standard_normal(files.dim).astype(np.float32)
        B = files.read_ffn_layer(0).astype(np.float64)
        u = part_views(B, files.ffn_parts, files.dim)["up"] @ x + spec.up_bias[0]
        mag = np.abs(0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3))))
        ids = s.select(0, x)
        k = round(0.25 * files.n_neurons)
        assert ids.size == k and mag[ids].min() >= np.sort(mag)[::-1][k - 1] - 1e-5
    finally:
        s.close()


class FakePredictor:
    def __init__(self, prior_weight):
        self.prior_weight = prior_weight
        self.calls = []

    def select(self, x, keep_fraction=None, prior=None):
        self.calls.append((keep_fraction, prior))
        return [3, 1, 2]


@pytest.mark.parametrize("weights, uses", [((0.0, 0.0), False), ((0.0, 0.3), True)])
def test_predictor_passes_keep_fraction_and_prior_through(weights, uses):
    preds = [FakePredictor(w) for w in weights]
    s = PredictorSelector(preds, 0.4)
    assert s.uses_prior is uses
    prior = np.ones(5, np.float32)
    ids = s.select(1, np.zeros(4, np.float32), prior)
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 2]
    assert preds[1].calls == [(0.4, prior)] and preds[0].calls == []
    s.select(0, np.zeros(4, np.float32))
    assert preds[0].calls == [(0.4, None)]
    s.close()
