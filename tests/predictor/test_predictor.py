"""Low-rank neuron predictors: scoring and selection against NumPy oracles, fitting on
planted problems (gated product and ReLU), storage round trip and corruption, the FLOP
budget at the default rank, per-layer allocation, and the recording FFN."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashrt.errors import ModelFormatError
from flashrt.predictor import (LowRankPredictor, PredictorSet, allocate_keep_fractions, data_aware_lowrank,
                               default_rank, default_ranks, ffn_macs, fit_layer, fit_predictors, predictor_macs,
                               topk_mask)
from flashrt.predictor.calibrate import (gated_layer_report, output_error_curve, relu_layer_report,
                                         relu_threshold_for_recall)
from flashrt.predictor.fit import product_loss

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/


def silu(z):
    return z / (1.0 + np.exp(-z))


def random_predictor(rng, kind, d=24, n=40, r=8, dtype=np.float32):
    A = rng.standard_normal((r, d)).astype(dtype)
    B = rng.standard_normal((n, r)).astype(dtype)
    bias = rng.standard_normal(n).astype(np.float32)
    if kind == "product":
        return LowRankPredictor("product", A, B, bias, rng.standard_normal(n).astype(np.float32), r_gate=3)
    return LowRankPredictor("relu", A, B, bias)


# -- scoring and selection --------------------------------------------------------------------
def test_scores_match_plain_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(24).astype(np.float32)
    p = random_predictor(rng, "relu")
    np.testing.assert_allclose(p.scores(x), p.B @ (p.A @ x) + p.bias, rtol=1e-5, atol=1e-5)
    q = random_predictor(rng, "product")
    A, B = q.A.astype(np.float64), q.B.astype(np.float64)
    z = A @ x
    g = B[:, :3] @ z[:3] + q.bias_gate
    u = B[:, 3:] @ z[3:] + q.bias
    np.testing.assert_allclose(q.scores(x), np.abs(silu(g) * u), rtol=1e-4, atol=1e-5)
    # the product split costs what a single rank-r predictor does
    assert q.macs == 8 * (24 + 40) == predictor_macs("relu", 8, 24, 40)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.01, 1.0))
def test_select_is_topk_in_score_order(seed, frac):
    rng = np.random.default_rng(seed)
    p = random_predictor(rng, "product")
    x = rng.standard_normal(24).astype(np.float32)
    s = p.scores(x)
    ids = p.select(x, keep_fraction=frac)
    k = max(1, int(np.ceil(frac * 40 - 1e-9)))
    assert ids.dtype == np.int64 and len(ids) == k and len(set(ids.tolist())) == k
    assert np.all(np.diff(s[ids]) <= 0)                              # highest score first
    assert s[ids].min() >= np.sort(s)[::-1][k - 1]                  # exactly the top k
    m = topk_mask(s[None], frac)[0]
    assert set(np.flatnonzero(m).tolist()) == set(ids.tolist())


def test_select_by_threshold():
    rng = np.random.default_rng(1)
    p = random_predictor(rng, "relu")
    p.threshold = 0.5
    x = rng.standard_normal(24).astype(np.float32)
    s = p.scores(x)
    ids = p.select(x)
    assert set(ids.tolist()) == set(np.flatnonzero(s > 0.5).tolist())
    assert np.all(np.diff(s[ids]) <= 0)


# -- fitting ---------------------------------------------------------------------------------------
def planted_gated(rng, T=3000, d=48, n=96, rank=4, noise=0.05):
    """Gated layer whose gate and up are rank-`rank` plus a little noise; correlated inputs."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    X = (rng.standard_normal((T, d)) @ mix).astype(np.float32)
    Wg = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(d)
          + noise * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    Wu = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(d)
          + noise * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    Wd = (rng.standard_normal((d, n)) / np.sqrt(n)).astype(np.float32)
    H = (silu(X @ Wg.T) * (X @ Wu.T)).astype(np.float32)
    return X, H, Wg, Wu, Wd


def test_data_aware_lowrank_is_exact_on_low_rank_weights():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((500, 20)).astype(np.float32)
    W = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    A, B = data_aware_lowrank(X, W, 3)
    np.testing.assert_allclose(X @ A.T @ B.T, X @ W.T, rtol=1e-3, atol=1e-3)


def test_fit_product_planted_pattern():
    rng = np.random.default_rng(3)
    X, H, Wg, Wu, Wd = planted_gated(rng)
    Xf, Hf, Xt, Ht = X[:2400], H[:2400], X[2400:], H[2400:]
    # start from a deliberately poor rank split of the init (gate gets rank 2 of 4) and fit
    init, _ = fit_layer(Xf, Hf, (Wg, Wu), rank=8, r_gate=4, epochs=0)
    pred, hist = fit_layer(Xf, Hf, (Wg, Wu), rank=8, r_gate=4, epochs=6, lr=3e-3)
    assert hist[-1] < hist[0]
    assert product_loss(pred, Xt, Ht) <= product_loss(init, Xt, Ht) + 1e-6
    rep = gated_layer_report(pred.scores_batch(Xt), Ht, 0.5, Wd)
    assert rep["topk_recall"] >= 0.95, rep
    assert rep["mass_captured"] >= 0.97 * rep["oracle_mass_captured"], rep


def test_fit_product_beats_its_init_when_rank_is_short():
    # rank 4 + 4 cannot hold rank-6 weights: fitting must still lower the held-out h error
    rng = np.random.default_rng(4)
    X, H, Wg, Wu, Wd = planted_gated(rng, rank=6, noise=0.3)
    init, _ = fit_layer(X[:2400], H[:2400], (Wg, Wu), rank=8, epochs=0)
    pred, hist = fit_layer(X[:2400], H[:2400], (Wg, Wu), rank=8, epochs=8, lr=3e-3)
    assert hist[-1] < hist[0]
    assert product_loss(pred, X[2400:], H[2400:]) < product_loss(init, X[2400:], H[2400:])


def synthetic_relu_layer(rng, T, d=64, n=256, latent=12, sparsity=0.93):
    """A ReLU FFN layer with realistic activation sparsity: inputs on a few latent factors plus
    noise, up rows aligned with those factors, biases set so ~`sparsity` of neurons are off."""
    basis = rng.standard_normal((latent, d)) / np.sqrt(latent)
    X = (rng.standard_normal((T, latent)) @ basis * 3.0 + 0.3 * rng.standard_normal((T, d))).astype(np.float32)
    Wu = (rng.standard_normal((n, latent)) @ basis + 0.1 * rng.standard_normal((n, d))).astype(np.float32)
    pre = X @ Wu.T
    b = -np.quantile(pre, sparsity, axis=0).astype(np.float32)       # (n,) per-neuron firing rate ~ 1 - sparsity
    return X, Wu, b, np.maximum(X @ Wu.T + b, 0).astype(np.float32)


def test_relu_synthetic_recall():
    rng = np.random.default_rng(5)
    X, Wu, b, H = synthetic_relu_layer(rng, 6000)
    assert 0.04 < (H > 0).mean() < 0.10                               # realistic sparsity
    fit_X, fit_H = X[:4000], H[:4000]
    val_X, val_H = X[4000:5000], H[4000:5000]
    test_X, test_H = X[5000:], H[5000:]
    pred, hist = fit_layer(fit_X, fit_H, Wu, rank=16, bias_init=b, epochs=6)
    assert hist[-1] < hist[0]
    t = relu_threshold_for_recall(pred.scores_batch(val_X), val_H > 0, 0.97)
    rep = relu_layer_report(pred.scores_batch(test_X), test_H > 0, t)
    print("relu synthetic:", rep)
    assert rep["recall"] >= 0.95, rep
    assert rep["fp_rate"] < 0.10, rep
    assert rep["predicted_fraction"] < 0.25, rep


# -- storage -------------------------------------------------------------------------------------
def make_set(rng, kind="product", L=3, dtype=np.float32):
    preds = [random_predictor(rng, kind, r=6 + 2 * l, dtype=dtype) for l in range(L)]
    for l, p in enumerate(preds):
        p.keep_fraction = 0.4 + 0.1 * l if kind == "product" else None
        p.threshold = 0.25 * l
    return PredictorSet(preds, info={"sparsity": 0.5, "layers": [{"recall": 0.9}] * L})


@pytest.mark.parametrize("kind,dtype", [("product", np.float32), ("product", np.float16), ("relu", np.float32)])
def test_store_round_trip(tmp_path, kind, dtype):
    rng = np.random.default_rng(6)
    pset = make_set(rng, kind, dtype=dtype)
    path = pset.save(tmp_path)
    assert path.name == "predictors.npz"
    assert sorted(os.listdir(tmp_path)) == ["predictors.npz"]        # no temp file left behind
    back = PredictorSet.load(tmp_path, dim=24, n_neurons=40, n_layers=3)
    assert back.kind == kind and back.info["sparsity"] == 0.5
    x = rng.standard_normal(24).astype(np.float32)
    for p, q in zip(pset, back):
        assert q.A.dtype == dtype and q.rank == p.rank and q.r_gate == p.r_gate
        assert q.keep_fraction == p.keep_fraction and q.threshold == p.threshold
        np.testing.assert_array_equal(q.scores(x), p.scores(x))
        np.testing.assert_array_equal(q.select(x), p.select(x))


def test_store_rejects_corruption(tmp_path):
    rng = np.random.default_rng(7)
    path = make_set(rng).save(tmp_path)
    good = path.read_bytes()
    # a flipped byte inside an array's data: the zip still opens, the checksum catches it
    with np.load(path) as z:
        assert "l1.B" in z.files
    off = good.find(b"l1.B.npy")
    assert off > 0
    bad = bytearray(good)
    bad[off + 300] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ModelFormatError, match="checksum|cannot read"):
        PredictorSet.load(tmp_path)
    path.write_bytes(good[: len(good) // 2])                          # truncated
    with pytest.raises(ModelFormatError):
        PredictorSet.load(tmp_path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFormatError):
        PredictorSet.load(tmp_path)
    path.write_bytes(good)
    PredictorSet.load(tmp_path)                                       # intact again
    with pytest.raises(ModelFormatError, match="dim"):
        PredictorSet.load(tmp_path, dim=25)
    os.unlink(path)
    with pytest.raises(ModelFormatError, match="calibrate"):
        PredictorSet.load(tmp_path)


def test_store_rejects_other_version(tmp_path):
    rng = np.random.default_rng(8)
    path = make_set(rng).save(tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    header["version"] = 99
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ModelFormatError, match="version"):
        PredictorSet.load(tmp_path)


# -- budget ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated,d,n", [(True, 576, 1536),        # SmolLM2-135M
                                       (False, 4096, 16384)])    # OPT-6.7B
def test_default_rank_under_5_percent_of_ffn(gated, d, n):
    r = default_rank(gated, d, n)
    kind = "product" if gated else "relu"
    assert predictor_macs(kind, r, d, n) < 0.05 * ffn_macs(gated, d, n)
    assert predictor_macs(kind, r + 8, d, n) >= 0.05 * ffn_macs(gated, d, n)   # and not needlessly small
    if gated:
        assert 48 <= r <= 62
    # the cost formula is the work scores() does: A (r, d) then B (n, r)
    p = LowRankPredictor(kind, np.zeros((r, 8), np.float16), np.zeros((16, r), np.float16),
                         r_gate=r // 2 if gated else 0)
    assert p.macs == p.A.size + p.B.size == predictor_macs(kind, r, 8, 16)


@pytest.mark.parametrize("gated,L,d,n", [(True, 30, 576, 1536),       # SmolLM2-135M
                                         (False, 32, 4096, 16384),    # OPT-6.7B
                                         (True, 32, 4096, 14336),     # Llama-3-8B / Mistral-7B shape
                                         (True, 4, 16, 32)])          # tiny fixture
def test_default_ranks_total_under_5_percent_and_front_loaded_for_gated(gated, L, d, n):
    ranks = default_ranks(gated, L, d, n)
    kind = "product" if gated else "relu"
    total = sum(predictor_macs(kind, r, d, n) for r in ranks)
    assert len(ranks) == L and all(1 <= r <= min(d, n) for r in ranks)
    if min(ranks) > 4:        # the tiny shape is below the smallest rank's cost; only checks it runs
        assert total < 0.05 * L * ffn_macs(gated, d, n)
        assert total > 0.04 * L * ffn_macs(gated, d, n)              # and does not waste the budget
    if gated and L >= 8:
        assert ranks[0] > ranks[1] > ranks[-1] and ranks[1:].count(ranks[-1]) == L - 1 - L // 7
    elif not gated:
        assert ranks == [default_rank(gated, d, n)] * L


# -- allocation and the calibration core ----------------------------------------------------------
def test_allocation_meets_target_and_favours_sensitive_layers():
    grid = np.round(np.arange(0.1, 1.0001, 0.05), 4)
    curves = np.stack([np.exp(-grid * a) - np.exp(-a) for a in (2.0, 4.0, 8.0, 16.0)])
    curves[0] *= 10.0                                                   # layer 0 is the most sensitive
    f = allocate_keep_fractions(curves, 0.5, grid)
    assert abs(f.mean() - 0.5) < 1e-9
    assert f.max() <= 1.0 and f.min() >= 0.25 - 1e-9
    assert f[0] == f.max()
    uniform = sum(np.interp(0.5, grid, c) for c in curves)
    chosen = sum(np.interp(fi, grid, c) for fi, c in zip(f, curves))
    assert chosen < uniform


def test_output_error_curve_matches_direct():
    rng = np.random.default_rng(9)
    X, H, Wg, Wu, Wd = planted_gated(rng, T=200, d=16, n=32)
    s = np.abs(H) + 0.1 * rng.standard_normal(H.shape).astype(np.float32)
    grid = np.array([0.25, 0.5, 1.0])
    curve = output_error_curve(s, H, Wd, grid)
    for f, c in zip(grid, curve):
        keep = topk_mask(s, f)
        direct = np.sum(((H * ~keep) @ Wd.T) ** 2) / np.sum((H @ Wd.T) ** 2)
        assert c == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert curve[-1] == 0.0


def test_fit_predictors_gated_end_to_end(tmp_path):
    rng = np.random.default_rng(10)
    layers = [planted_gated(rng, T=1500, d=32, n=64, rank=3, noise=0.02) for _ in range(3)]
    pset, report = fit_predictors([l[0] for l in layers], [l[1] for l in layers],
                                  [(l[2], l[3], l[4]) for l in layers], gated=True, sparsity=0.5,
                                  rank=8, epochs=3, dtype=np.float16, prior_weight=0.25)
    assert report.kind == "product" and len(report.layers) == 3
    assert [p.prior_weight for p in pset] == [0.25] * 3
    assert abs(np.mean(pset.keep_fractions()) - 0.5) < 1e-6
    for r in report.layers:
        assert r["topk_recall"] > 0.9 and 0 < r["precision"] <= 1
    assert "layer" in report.summary()
    pset.save(tmp_path)
    back = PredictorSet.load(tmp_path)
    assert back[0].A.dtype == np.float16 and back.info["layers"][0]["recall"] == report.layers[0]["recall"]


# -- recording ------------------------------------------------------------------------------------------
class _FakeDense:
    """Gated FFN over float32 weights with the DenseFFN h_out contract (a NumPy oracle)."""

    def __init__(self, layers):
        self.layers = layers

    def n_neurons(self, layer):
        return self.layers[layer][0].shape[0]

    def __call__(self, layer, x, h_out=None):
        Wg, Wu, Wd = self.layers[layer]
        h = silu(x @ Wg.T) * (x @ Wu.T)
        if h_out is not None:
            h_out[...] = h
        return h @ Wd.T


def test_recording_ffn_records_inputs_and_outputs():
    from flashrt.calibration import RecordingFFN
    rng = np.random.default_rng(11)
    layers = [planted_gated(rng, T=1, d=16, n=24)[2:] for _ in range(2)]
    inner = _FakeDense(layers)
    rec = RecordingFFN(inner, token_fraction=0.5, seed=3, dtype=np.float32)
    xs = [rng.standard_normal((10, 16)).astype(np.float32) for _ in range(3)]
    for x in xs:                                  # one "forward": layer 0 then layer 1
        y0 = rec(0, x)
        np.testing.assert_allclose(y0, inner(0, x), rtol=1e-6)
        rec(1, x + 1)
    X0, H0 = rec.arrays(0)
    X1, H1 = rec.arrays(1)
    assert 0 < len(X0) < 30 and len(X0) == len(X1)          # same token subset at every layer
    np.testing.assert_allclose(X1, X0 + 1)
    np.testing.assert_allclose(H0, silu(X0 @ layers[0][0].T) * (X0 @ layers[0][1].T), rtol=1e-5, atol=1e-6)
    rec2 = RecordingFFN(inner, max_tokens=12)
    for x in xs:
        rec2(0, x)
    assert rec2.n_recorded(0) == 12 and rec2.arrays(0)[0].shape == (12, 16)


# -- calibrate() on tiny converted checkpoints (random weights: checks the wiring, not quality) ----
@pytest.mark.filterwarnings("ignore::UserWarning")          # "no tokenizer.json" from the converter
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_calibrate_tiny_model(tmp_path, name):
    from flashrt.convert.hf import convert_hf
    from flashrt.calibration import calibrate
    src = os.path.join(TESTS, "fixtures", "hf", name)
    out = tmp_path / name
    convert_hf(src, out, dtype="float32", progress=False)
    report = calibrate(out, texts=None, n_tokens=600, sparsity=0.5, rank=16, progress=False, ctx=64, epochs=3)
    pset = PredictorSet.load(out)
    assert report.path == str(out / "predictors.npz")
    assert len(report.layers) == pset.n_layers == json.loads((out / "manifest.json").read_text())["config"][
        "num_hidden_layers"]
    assert pset.info["source"]["kind"] == "sampled" and report.n_tokens == 600
    if name == "opt":
        assert pset.kind == "relu"
        for r in report.layers:
            assert r["recall"] >= 0.85 and 0.0 <= r["fp_rate"] <= 1.0, r
    else:
        assert pset.kind == "product"
        assert abs(np.mean(pset.keep_fractions()) - 0.5) < 1e-6
        for r in report.layers:
            assert r["mass_captured"] > 0.5, r


# -- temporal prior: the last |h| of the cached neurons, blended into the next token's scores -------------
def test_prior_blend_changes_selection_as_specified():
    rng = np.random.default_rng(12)
    p = random_predictor(rng, "product")
    x = rng.standard_normal(24).astype(np.float32)
    s = p.scores(x)
    prior = np.abs(rng.standard_normal(40)).astype(np.float32) * 3
    prior[rng.random(40) < 0.4] = -1.0                      # not cached: unknown
    # off (weight 0, or no prior given): the plain top-k
    np.testing.assert_array_equal(p.select(x, 0.3, prior=prior), p.select(x, 0.3))
    p.prior_weight = 0.4
    np.testing.assert_array_equal(p.select(x, 0.3, prior=None), p.select(x, 0.3, prior=np.full(40, -1.0, np.float32)))
    want = np.where(prior >= 0, 0.6 * s + 0.4 * prior, s)   # plain formula
    k = int(np.ceil(0.3 * 40))
    got = p.select(x, 0.3, prior=prior)
    np.testing.assert_array_equal(got, np.argsort(-want, kind="stable")[:k])
    assert set(got) != set(p.select(x, 0.3))                # the prior did change the selection here
    with pytest.raises(ValueError):
        LowRankPredictor("product", p.A, p.B, p.bias, p.bias_gate, r_gate=3, prior_weight=1.0)


def test_store_keeps_prior_weight(tmp_path):
    pset = make_set(np.random.default_rng(13))
    pset.set_prior_weight([0.0, 0.25, 0.5])
    pset.save(tmp_path)
    assert [p.prior_weight for p in PredictorSet.load(tmp_path)] == [0.0, 0.25, 0.5]
    with pytest.raises(ValueError):
        pset.set_prior_weight(1.5)


@pytest.mark.filterwarnings("ignore::UserWarning")          # "no tokenizer.json" from the converter
def test_flash_feeds_back_the_true_h_of_cached_neurons(tmp_path):
    """Decode through flash mode with a prior: each select() gets the |h| (NumPy oracle from the
    bundle file) of exactly the neurons the cache held at the previous token, -1 for the others,
    and returns the top-k of the blended score."""
    import flashrt
    from flashrt.convert.hf import convert_hf
    from flashrt.format.reader import ModelFiles
    src = os.path.join(TESTS, "fixtures", "hf", "llama")
    out = tmp_path / "llama"
    convert_hf(src, out, dtype="float32", progress=False)
    files = ModelFiles.open(out)
    L, d, n = files.n_layers, files.dim, files.n_neurons
    raw = np.fromfile(files.ffn_path, dtype=np.float32)
    bundles = [raw[files.ffn_layer_offset(l) // 4:][: n * 3 * d].reshape(n, 3 * d).astype(np.float64)
               for l in range(L)]
    rng = np.random.default_rng(14)
    preds = [LowRankPredictor("product", rng.standard_normal((6, d)).astype(np.float32) * 0.3,
                              rng.standard_normal((n, 6)).astype(np.float32) * 0.3, r_gate=3,
                              keep_fraction=0.4, prior_weight=0.5) for _ in range(L)]
    PredictorSet(preds).save(out)
    calls = []
    with flashrt.Generator(out, mode="flash", select="predictor", sparsity=0.6, window=2, threads=1) as g:
        sel = g.ffn.selector
        assert sel.uses_prior
        g.ffn.prefetch = False  # its guesses call select() too (tests/ffn/test_pipeline.py checks them)
        inner = sel.select

        def spy(layer, x, prior=None):
            cached = g.ffn.caches[layer].used_ids().copy()
            ids = inner(layer, x, prior=prior)
            calls.append((layer, x.copy(), None if prior is None else prior.copy(), cached, ids))
            return ids

        sel.select = spy
        g._reset()
        for t in [1, 5, 9, 2, 7, 3]:
            g.model.forward(np.array([t], dtype=np.int64), g.kv)
    assert len(calls) == 6 * L
    k = int(np.ceil(0.4 * n))
    changed = 0
    for i, (layer, x, prior, cached, ids) in enumerate(calls):
        assert prior is not None
        if i < L:                                           # first token: nothing known yet
            assert np.all(prior == -1.0)
        else:
            B = bundles[layer]
            x_prev = calls[i - L][1]                        # same layer, previous token
            h = silu(B[:, :d] @ x_prev) * (B[:, d:2 * d] @ x_prev)
            want = np.full(n, -1.0)
            want[cached] = np.abs(h[cached])
            np.testing.assert_allclose(prior, want, rtol=1e-4, atol=1e-5)
            assert cached.size >= k                         # the window (2) holds more than one selection
        s = preds[layer].scores(x)
        blended = np.where(prior >= 0, 0.5 * s + 0.5 * prior, s)
        np.testing.assert_array_equal(np.sort(ids), np.sort(np.argsort(-blended, kind="stable")[:k]))
        changed += set(ids) != set(np.argsort(-s, kind="stable")[:k])
    assert changed > 0


@pytest.mark.filterwarnings("ignore::UserWarning")          # "no tokenizer.json" from the converter
def test_calibrate_tiny_opt_reaches_target_recall_on_held_out_tokens(tmp_path):
    """The ReLU check of issue 4 on a transformers-made OPT: thresholds set for 95% recall on one
    held-out half keep >= 95% recall on the other half (random weights, so false positives are
    many; the figure is printed, not bounded). Fewer calibration tokens leave the threshold noisy:
    at 2000 tokens recall lands near 0.91-0.93."""
    from flashrt.convert.hf import convert_hf
    from flashrt.calibration import calibrate
    out = tmp_path / "opt"
    convert_hf(os.path.join(TESTS, "fixtures", "hf", "opt"), out, dtype="float32",
               progress=False)
    report = calibrate(out, texts=None, n_tokens=8000, rank=16, progress=False, ctx=64, epochs=3,
                       target_recall=0.95)
    for r in report.layers:
        print("tiny OPT layer: recall %.3f, false-positive rate %.3f, selected %.3f (truly active %.3f)"
              % (r["recall"], r["fp_rate"], r["predicted_fraction"], r["true_fraction"]))
        assert r["recall"] >= 0.95, r
        assert r["predicted_fraction"] < 1.0


def test_smollm2_flash_greedy_text_stays_coherent(smollm2_dir, tmp_path):
    """Calibrated from the model's own samples, flash mode at 50% selected writes text the dense
    model finds about as likely as its own greedy text (the dense model is the judge)."""
    import flashrt
    from flashrt.calibration import calibrate

    model = tmp_path / "smollm2"
    model.mkdir()
    for f in Path(smollm2_dir).iterdir():                       # calibrate a linked copy, not the cache
        if f.name != "predictors.npz":
            (model / f.name).symlink_to(f.resolve())
    # no second domain, no quality curve: this test is about the text (tests/test_policy.py covers those)
    calibrate(model, texts=None, n_tokens=768, progress=False, ctx=256, epochs=4, second_text=None, curve_tokens=0)
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]

    def greedy_ids(**kw):
        with flashrt.Generator(model, progress=False, **kw) as g:
            prompt = g.tokenizer.encode(g.tokenizer.apply_chat_template(messages))
            text = g.chat(messages, 40, temperature=0)
            return np.array(prompt), g.tokenizer.encode(text)

    prompt, dense_ids = greedy_ids(mode="dense")
    _, flash_ids = greedy_ids(mode="flash", select="predictor", sparsity=0.5)

    with flashrt.Generator(model, mode="dense", progress=False) as judge:
        def nll(ids):                                           # mean -log p(continuation | prompt), nats
            seq = np.concatenate([prompt, ids]).astype(np.int64)
            z = judge.logits(seq)[len(prompt) - 1:-1].astype(np.float64)
            z -= z.max(1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(1, keepdims=True))
            return float(-lp[np.arange(len(ids)), ids].mean())
        nll_dense, nll_flash = nll(np.array(dense_ids)), nll(np.array(flash_ids))
        nll_shuffled = nll(np.random.default_rng(0).permutation(np.array(dense_ids)))   # the judge's control
    print(f"dense greedy {nll_dense:.2f} nats/token, flash greedy {nll_flash:.2f}, shuffled {nll_shuffled:.2f}")
    assert len(flash_ids) >= 30
    assert nll_shuffled > 4.0                                   # the judge tells word salad from text
    assert nll_flash < nll_dense + 1.0 and nll_flash < 2.0
