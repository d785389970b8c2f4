"""Budget-aware selection (issue 13): the cache replica, the stored quality curve, the
policy's warning, gate-first scoring."""
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from flashrt._core.cache import NeuronCache
from flashrt.predictor import PredictorSet
from flashrt.predictor.lowrank import LowRankPredictor, silu
from flashrt.predictor.quality import GOOD_RATIO, WARN_RATIO, QualityCurve, replay_cache


@pytest.mark.parametrize("k,window,capacity", [(6, 1, 20), (6, 3, 20), (8, 5, 12), (10, 4, 7), (20, 2, 20)])
def test_replay_cache_matches_neuron_cache(k, window, capacity):
    """The replica computes exactly what flash mode computes: the real NeuronCache's rows after
    admit() plus the selected ids it had no room for (the overflow FlashFFN streams)."""
    rng = np.random.default_rng(k * 100 + window * 10 + capacity)
    T, n = 40, 20
    scores = rng.standard_normal((T, n)).astype(np.float32)
    scores[1::3] = scores[0::3][: len(scores[1::3])] + 0.1 * rng.standard_normal((len(scores[1::3]), n))  # overlap
    computed, n_read = replay_cache(scores, k, window, capacity)
    cache = NeuronCache(n, capacity, 4, np.float32, window)
    reads = 0
    for t in range(T):
        order = np.argsort(-scores[t], kind="stable")[:k]
        missing, _first = cache.admit(order, t)
        want = np.zeros(n, bool)
        want[cache.used_ids()] = True
        over = order[~np.isin(order, cache.used_ids())]
        want[over] = True
        np.testing.assert_array_equal(computed[t], want, err_msg=f"token {t}")
        if t < T - 1:
            reads += missing.size + over.size
    assert n_read == reads


def _curve(points, computed=0.4, read=0.01):
    """A stored curve; by default the predictors compute 40% of the FFN (a sparse model: they save work)."""
    return QualityCurve(0.5, 5, 256, [{"cache_share": s, "ratio": r, "computed": computed * s, "read": read}
                                      for s, r in points])


def test_quality_curve_interpolates_and_finds_the_good_share():
    c = _curve([(0.3, 3.0), (0.5, 1.6), (0.7, 1.2), (0.9, 1.04), (1.0, 1.03)])
    assert c.ratio_at(0.6) == pytest.approx(1.4)
    assert c.ratio_at(0.1) == pytest.approx(3.0) and c.ratio_at(1.0) == pytest.approx(1.03)
    assert c.share_for(GOOD_RATIO) == 0.9 and c.share_for(1.2) == 0.7 and c.share_for(1.0) is None
    # a bump above the ratio at a larger share: the good share is past it
    assert _curve([(0.5, 1.04), (0.7, 1.2), (1.0, 1.02)]).share_for(GOOD_RATIO) == 1.0
    assert "cache share" in c.summary() and "+60.0%" in c.summary()


def test_quality_curve_round_trips_through_predictors_npz(tmp_path):
    rng = np.random.default_rng(3)
    preds = []
    for _ in range(2):
        up = (rng.standard_normal((3, 8)).astype(np.float16), rng.standard_normal((12, 3)).astype(np.float16),
              rng.standard_normal(12).astype(np.float32))
        preds.append(LowRankPredictor("product", rng.standard_normal((4, 8)).astype(np.float16),
                                      rng.standard_normal((12, 4)).astype(np.float16), r_gate=2, keep_fraction=0.5,
                                      up=up))
    curve = _curve([(0.5, 1.5), (0.9, 1.04), (1.0, 1.02)])
    PredictorSet(preds, info={"quality_curve": curve.to_dict(),
                              "quality_curve_gate_first": _curve([(1.0, 1.01)]).to_dict()}).save(tmp_path)
    back = PredictorSet.load(tmp_path)
    assert back.quality_curve == curve
    assert back.quality_curve_gate_first.points[0]["ratio"] == 1.01
    assert back.has_up_estimates
    for a, b in zip(preds, back):
        for x, y in zip(a.up, b.up):
            np.testing.assert_array_equal(x, y)
    assert PredictorSet(preds).quality_curve is None


def _cached_pages(path):
    """Pages of a file in the page cache (mincore(2) over a read-only mapping), or None where
    the libc call is unavailable."""
    import ctypes
    import mmap
    size = os.path.getsize(path)
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "mincore"):
        return None
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)   # writable view, never written
        anchor = ctypes.c_char.from_buffer(m)
        try:
            vec = (ctypes.c_ubyte * n)()
            ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vec) == 0
            return sum(v & 1 for v in vec) if ok else None
        finally:
            del anchor
            m.close()


def test_loading_the_predictors_leaves_none_of_the_file_in_the_page_cache(tmp_path):
    """The factors are copied out of predictors.npz: its pages would be charged to the budget a
    second time (page cache counts in a memory cgroup), so the load drops them."""
    rng = np.random.default_rng(4)
    preds = [LowRankPredictor("product", rng.standard_normal((64, 256)).astype(np.float16),
                              rng.standard_normal((512, 64)).astype(np.float16), r_gate=32, keep_fraction=0.5)
             for _ in range(4)]
    path = PredictorSet(preds).save(tmp_path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())              # written pages are dirty until flushed: not droppable
        f.read()                          # every page cached
    before = _cached_pages(path)
    if before is None:
        pytest.skip("mincore is not available here")
    assert before > 0
    PredictorSet.load(tmp_path)
    assert _cached_pages(path) == 0


def test_gate_first_scores_are_exact_gate_times_up_estimate():
    rng = np.random.default_rng(5)
    d, n = 8, 12
    A, B = rng.standard_normal((4, d)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32)
    up = (rng.standard_normal((3, d)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32),
          rng.standard_normal(n).astype(np.float32))
    Wg = rng.standard_normal((n, d)).astype(np.float32)
    p = LowRankPredictor("product", A, B, r_gate=2, up=up)
    X = rng.standard_normal((5, d)).astype(np.float32)
    g = X @ Wg.T
    want = np.abs(g / (1 + np.exp(-g)) * (X @ up[0].T @ up[1].T + up[2]))
    np.testing.assert_allclose(p.scores_batch(X, gate=g), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p.select(X[0], 0.5, gate=g[0]), np.argsort(-want[0], kind="stable")[:6])
    # without the separate estimate: the product predictor's own up half
    q = LowRankPredictor("product", A, B, r_gate=2)
    np.testing.assert_allclose(q.scores_batch(X, gate=g), np.abs(silu(g) * (X @ A[2:].T @ B[:, 2:].T)), rtol=1e-5,
                               atol=1e-6)


# -- on a tiny calibrated Llama: the stored curve, the policy and its warning ----------------------------------
@pytest.fixture(scope="module")
def calibrated_llama(tmp_path_factory):
    from conftest import tiny_model
    from flashrt.calibration import calibrate
    out = tiny_model("llama", tmp_path_factory.mktemp("quality") / "llama")
    t0 = time.process_time()          # CPU seconds: the machine running the suite may be shared
    report = calibrate(out, texts=None, n_tokens=600, sparsity=0.5, rank=16, progress=False, ctx=64, epochs=3,
                       curve_tokens=64)
    seconds = time.process_time() - t0
    return out, report, seconds


def test_calibration_stores_the_curve_and_second_domain_recall_quickly(calibrated_llama):
    out, report, seconds = calibrated_llama
    assert seconds < 30, seconds
    pset = PredictorSet.load(out)
    curve, curve_g = pset.quality_curve, pset.quality_curve_gate_first
    assert curve is not None and curve_g is not None and pset.has_up_estimates
    assert [p["cache_share"] for p in curve.points] == sorted(p["cache_share"] for p in curve.points)
    full = curve.points[-1]
    assert full["cache_share"] == 1.0 and full["ratio"] > 0.5 and 0.5 <= full["computed"] <= 1.0
    assert report.second_domain and all("second_topk_recall" in r and "gate_first_topk_recall" in r
                                        for r in report.layers)
    text = report.summary()
    assert "quality vs neuron cache" in text and report.second_domain in text


def _budget_for_share(plan, files, share):
    """The budget whose plan (otherwise like `plan`) caches `share` of each layer's neurons."""
    from flashrt.budget import UNITEMIZED_SHARE
    fixed = plan.total - plan.cache_bytes
    need = fixed + int(np.ceil(share * files.n_neurons)) * files.ffn_row_bytes * files.n_layers
    return int(np.ceil(need / (1 - UNITEMIZED_SHARE))) + 1     # the planner keeps UNITEMIZED_SHARE back


def test_warning_fires_below_the_ten_percent_point_and_not_above(calibrated_llama, tmp_path, monkeypatch):
    """With a stored curve whose +10% point is at a cache share of 0.7, a Generator at a budget
    giving share 0.5 warns once (naming the budget that reaches +5%) and, with the default
    selection, computes every neuron; at share 0.8 (+7%) it computes every neuron silently; at
    share 0.95 (+3%) it stays silent and uses the predictors."""
    import shutil

    import flashrt
    from flashrt.format.reader import ModelFiles
    src, _report, _s = calibrated_llama
    # the tokenizer's charge is measured from RSS growth, which varies by hundreds of KB between
    # Generators; on this tiny model that is several cache shares: hold it fixed
    monkeypatch.setattr("flashrt.api._tokenizer_bytes", lambda tokenizer_dir, measured: 100_000)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    pset = PredictorSet.load(model)
    pset.info["quality_curve"] = _curve([(0.3, 2.0), (0.5, 1.5), (0.7, WARN_RATIO), (0.9, 1.04), (1.0, 1.02)]).to_dict()
    pset.info.pop("quality_curve_gate_first")
    pset.save(model)
    files = ModelFiles.open(model)
    kw = dict(mode="flash", max_context=64, progress=False)
    with flashrt.Generator(model, **kw) as g:                  # no budget: everything cached, no warning
        assert g.select == "predictor" and g.plan.cache_share == 1.0
        plan = g.plan
    low = _budget_for_share(plan, files, 0.5)
    mid = _budget_for_share(plan, files, 0.8)
    high = _budget_for_share(plan, files, 0.95)
    with pytest.warns(UserWarning, match=r"measured the predictors at \+50% perplexity.*lets the predictors run at "
                                         r"\+5%") as rec:
        with flashrt.Generator(model, memory_budget=low, **kw) as g:
            assert g.select == "all"
            g.generate("ab", max_new_tokens=2)
    assert len([w for w in rec if "perplexity" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match=r"\+50% perplexity.*reaches \+5% with them"):
        with flashrt.Generator(model, memory_budget=low, select="predictor", **kw) as g:
            assert g.select == "predictor"                  # asked for explicitly: kept, but warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flashrt.Generator(model, memory_budget=high, **kw) as g:   # measured +3%: the predictors
            assert g.select == "predictor" and g.policy.expected_ratio <= GOOD_RATIO
        with flashrt.Generator(model, memory_budget=mid, **kw) as g:    # +7%: exact instead, no warning
            assert g.select == "all"
    # predictors that never save work (a dense-gated FFN like SmolLM2's: the window's union computes more
    # than the FFN): the default computes every neuron at any budget, so the low budget stays silent too
    # (a hint to raise the budget would not make it use them)
    pset.info["quality_curve"] = _curve([(0.3, 2.0), (0.5, 1.5), (0.7, WARN_RATIO), (0.9, 1.04), (1.0, 1.02)],
                                        computed=1.3, read=1.0).to_dict()
    pset.save(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flashrt.Generator(model, memory_budget=low, **kw) as g:
            assert g.select == "all"
    with pytest.warns(UserWarning, match=r"\+50% perplexity.*reaches \+5% with them"):
        with flashrt.Generator(model, memory_budget=low, select="predictor", **kw) as g:
            assert g.select == "predictor"
    files.close()


def test_a_budget_too_small_for_the_predictors_computes_every_neuron(calibrated_llama, monkeypatch):
    """Below what the predictors take in DRAM the default selection reads every neuron (exact)
    instead of refusing a budget select='all' runs in; asked for, the predictors still refuse it."""
    import flashrt
    from flashrt.budget import plan_budget
    from flashrt.errors import BudgetError
    from flashrt.format.reader import ModelFiles
    from flashrt.predictor.store import predictor_ram_bytes
    monkeypatch.setattr("flashrt.api._tokenizer_bytes", lambda tokenizer_dir, measured: 100_000)
    model = calibrated_llama[0]
    files = ModelFiles.open(model)
    from flashrt.api import model_args
    margs = model_args(files)[1]
    pred = predictor_ram_bytes(model / "predictors.npz", files.dim, files.n_neurons)
    n_ctx = int(files.config["max_position_embeddings"])
    def fits(b, predictor_bytes=0):
        try:
            plan_budget(files, margs, "flash", b, 64, n_ctx, predictor_bytes, 100_000)
            return True
        except BudgetError:
            return False
    lo, hi = 10 ** 5, 2 * 10 ** 7                # the smallest budget select='all' runs in (to 1 KB)
    assert not fits(lo) and fits(hi)
    while hi - lo > 1000:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    budget = hi
    assert pred > 2000
    with pytest.raises(BudgetError):             # the predictors do not fit there
        plan_budget(files, margs, "flash", budget, 64, n_ctx, pred, 100_000)
    kw = dict(mode="flash", memory_budget=budget, max_context=64, progress=False)
    # ... and never loads them there: a load the policy then drops sat beside the resident tensors
    # until the open ended, over the budget (OPT-1.3B q4_0: 64 MB, OOM-killed in a cgroup of the budget)
    from flashrt.predictor.store import PredictorSet
    loads = []
    real_load = PredictorSet.load
    monkeypatch.setattr(PredictorSet, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with flashrt.Generator(model, **kw) as g:
        assert g.select == "all" and g.plan.predictor_bytes == 0
        g.generate("ab", max_new_tokens=2)
    assert loads == []
    with pytest.raises(BudgetError):
        flashrt.Generator(model, select="predictor", **kw)
    assert loads == []
    with flashrt.Generator(model, mode="flash", max_context=64, progress=False) as g:  # no budget: they are used
        assert g.select == "predictor"
    assert len(loads) == 1
    files.close()


def test_the_default_computes_every_neuron_where_the_predictors_save_no_work(calibrated_llama, tmp_path,
                                                                            monkeypatch):
    """Within +5% the default selection still takes select='all' where that does no more work on
    either count (SmolLM2: the window computes ~92% of the FFN, the scoring comes on top, and it
    decoded 2.5x slower than 'all' with every neuron cached); where the predictors read less than
    'all' must (its cache short of the layer) or compute less, they stay."""
    import shutil

    import flashrt
    from flashrt.format.reader import ModelFiles
    from flashrt.policy import all_does_less, predictor_work
    monkeypatch.setattr("flashrt.api._tokenizer_bytes", lambda tokenizer_dir, measured: 100_000)
    src = calibrated_llama[0]
    kw = dict(mode="flash", max_context=64, progress=False)

    def model_with(name, computed, read):
        model = tmp_path / name
        shutil.copytree(src, model)
        pset = PredictorSet.load(model)
        pset.info["quality_curve"] = _curve([(0.5, 1.04), (1.0, 1.02)], computed, read).to_dict()
        pset.info.pop("quality_curve_gate_first")
        pset.save(model)
        return model, PredictorSet.load(model)

    dense_like, pset = model_with("dense-like", 0.95, 0.02)
    computed, read = predictor_work(pset, False, 1.0)
    scoring = sum(p.macs for p in pset) / (len(pset) * 3 * pset[0].dim * pset[0].n_neurons)
    assert computed == pytest.approx(0.95 + scoring) and read == pytest.approx(0.02)
    assert all_does_less(pset, False, 1.0, 1.0) and not all_does_less(pset, False, 1.0, 0.9)
    with flashrt.Generator(dense_like, **kw) as g:             # everything cached: 'all' reads nothing
        assert g.select == "all" and g.plan.cache_share == 1.0
    with flashrt.Generator(dense_like, select="predictor", **kw) as g:   # asked for: kept
        assert g.select == "predictor"
    files = ModelFiles.open(dense_like)
    with flashrt.Generator(dense_like, **kw) as g:
        half = _budget_for_share(g.plan, files, 0.5)
    files.close()
    with flashrt.Generator(dense_like, memory_budget=half, **kw) as g:   # 'all' must read half the FFN
        assert g.select == "predictor" and g.policy.expected_ratio <= GOOD_RATIO
    sparse, pset = model_with("sparse", 0.4, 0.02)
    assert not all_does_less(pset, False, 1.0, 1.0)
    with flashrt.Generator(sparse, **kw) as g:                 # computes 40%: the predictors
        assert g.select == "predictor"


def test_gate_first_selector_matches_numpy(calibrated_llama):
    from flashrt.ffn.selection import GateFirstSelector
    from flashrt.format.reader import ModelFiles
    out, _r, _s = calibrated_llama
    files = ModelFiles.open(out)
    pset = PredictorSet.load(out)
    gates = GateFirstSelector.read_gates(files)
    w = files.load_resident()
    from flashrt.api import model_args
    from flashrt.ffn.dense import DenseFFN
    fam, margs = model_args(files)
    dense = DenseFFN.from_files(files, fam.ffn_spec(margs, w), n_threads=1)
    sel = GateFirstSelector(pset, gates, 0.5, 1)
    rng = np.random.default_rng(0)
    for layer in range(files.n_layers):
        x = rng.standard_normal(files.dim).astype(np.float32)
        g = dense.bundles[layer][:, :files.dim].astype(np.float64) @ x
        want = pset[layer].select(x, 0.5, gate=g.astype(np.float32))
        np.testing.assert_array_equal(np.sort(sel.select(layer, x)), np.sort(want))
    files.close()


# -- quantized bundles: calibration fits the dequantized rows, gate-first runs the stored blocks -----------------
@pytest.fixture(scope="module")
def quantized_pair(tmp_path_factory):
    """(q8_0 model, float32 model holding exactly its values dequantized), both with a byte tokenizer."""
    import shutil
    import warnings as w

    from conftest import FIXTURES, byte_tokenizer_json
    from flashrt.convert import convert
    from flashrt.format.reader import ModelFiles
    from flashrt.format.writer import ModelWriter
    from flashrt.quant import QMatrix
    root = tmp_path_factory.mktemp("qcal")
    src = root / "src"
    shutil.copytree(FIXTURES / "hf" / "llama", src)
    (src / "tokenizer.json").write_text(byte_tokenizer_json())
    with w.catch_warnings():
        w.simplefilter("ignore")
        q = convert(src, root / "q8", dtype="q8_0", progress=False)
    files = ModelFiles.open(q)
    with ModelWriter(root / "f32", files.architecture, files.config, "float32") as wr:
        for name, a in files.load_resident().items():
            wr.add_resident(name, a.dequantize() if isinstance(a, QMatrix) else a.astype(np.float32))
        for l in range(files.n_layers):
            B = files.read_ffn_layer(l)
            n, d = B.shape[0], files.dim
            wr.add_ffn_layer(l, _gguf_dequantize(B.reshape(n * 3, -1), "q8_0").reshape(n, 3 * d))
        wr.add_tokenizer((files.tokenizer_dir / "tokenizer.json").read_text(), {})
    files.close()
    q, f = Path(q), root / "f32"
    text = " ".join(f"the {a} of {b} is {i}" for i, (a, b) in enumerate(zip(["cat", "sea", "code"] * 60,
                                                                              ["town", "rain", "ink"] * 60)))
    from flashrt.calibration import calibrate
    kw = dict(texts=text, n_tokens=1500, sparsity=0.5, rank=16, progress=False, ctx=64, epochs=3, curve_tokens=64)
    return q, f, calibrate(q, **kw), calibrate(f, **kw)


def _gguf_dequantize(blocks, qtype):
    """The independent oracle: gguf's NumPy port of ggml's dequantization."""
    from gguf import GGMLQuantizationType as G
    from gguf.quants import dequantize
    return dequantize(blocks, {"q8_0": G.Q8_0, "q4_0": G.Q4_0, "q4_1": G.Q4_1}[qtype]).astype(np.float32)


def _dense(model):
    from flashrt.api import model_args
    from flashrt.ffn.dense import DenseFFN
    from flashrt.format.reader import ModelFiles
    files = ModelFiles.open(model)
    fam, margs = model_args(files)
    return files, DenseFFN.from_files(files, fam.ffn_spec(margs, files.load_resident()), n_threads=1)


def test_calibration_fits_the_dequantized_rows_of_quantized_bundles(quantized_pair):
    """The weights calibration fits with (gate, up, down per layer) are the quantized blocks'
    values (gguf's dequantization), not the blocks' bytes; calibrated on the same text, the
    q8_0 model and its float32 copy get the same per-layer recall and the same quality curve."""
    from flashrt.calibration import FitWeights
    q, f, rq, rf = quantized_pair
    (fq, dq), (ff, df) = _dense(q), _dense(f)
    for l in range(fq.n_layers):
        for a, b in zip(FitWeights(dq)[l], FitWeights(df)[l]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
    fq.close()
    ff.close()
    for a, b in zip(rq.layers, rf.layers):
        assert a["topk_recall"] == pytest.approx(b["topk_recall"], abs=0.02)
        assert a["gate_first_topk_recall"] == pytest.approx(b["gate_first_topk_recall"], abs=0.02)
    for cq, cf in ((rq.quality_curve, rf.quality_curve), (rq.quality_curve_gate_first, rf.quality_curve_gate_first)):
        assert cq is not None and len(cq.points) == len(cf.points)
        for a, b in zip(cq.points, cf.points):
            assert a["ratio"] == pytest.approx(b["ratio"], rel=0.02)


def test_gate_first_on_quantized_bundles_keeps_the_blocks_and_matches_numpy(quantized_pair):
    """Gate-first on a q8_0 model holds the gate rows as the stored blocks (34 bytes per 32
    weights, not float16) and its gate.x is the dequantized gate rows times x, up to the int8
    copy of x the quantized GEMV makes; its selection is the predictor's on that gate."""
    import flashrt
    from flashrt.ffn.selection import GateFirstSelector
    from flashrt.policy import gate_bytes
    q = quantized_pair[0]
    files, dense = _dense(q)
    pset = PredictorSet.load(q)
    gates = GateFirstSelector.read_gates(files)
    assert gates[0].dtype == np.uint8 and gates[0].shape == (files.n_neurons, files.dim // 32 * 34)
    assert gate_bytes(files) == sum(g.nbytes for g in gates)
    sel = GateFirstSelector(pset, gates, 0.5, 1, files.qtype)
    rng = np.random.default_rng(1)
    for layer in range(files.n_layers):
        x = rng.standard_normal(files.dim).astype(np.float32)
        want_g = dense.part_f32(layer, "gate") @ x
        ids = sel.select(layer, x)
        np.testing.assert_allclose(sel._g, want_g, rtol=0.02, atol=0.02 * np.abs(want_g).max())
        want = pset[layer].select(x, 0.5, gate=sel._g.copy())
        np.testing.assert_array_equal(np.sort(ids), np.sort(want))
    files.close()
    with flashrt.Generator(q, mode="flash", scoring="gate-first", sparsity=0.5, max_context=64,
                           progress=False) as g:
        assert g.policy.gate_first and g.generate("the cat", max_new_tokens=4) is not None
