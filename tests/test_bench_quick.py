"""CI smoke test of the benchmarks: the I/O table (paper Table 2) with --quick on the tiny
synthetic shape, checked against what the model's own geometry says each row must read."""
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHRT_BENCH_WORK", str(tmp_path / "work"))
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "table_io", "make_synthetic"):
        sys.modules.pop(name, None)
    return importlib.import_module("table_io")


def test_table_io_quick_tiny(bench, tmp_path):
    t0 = time.perf_counter()
    out = bench.main(["--quick", "--shape", "tiny", "--results", str(tmp_path / "res"), "--keep-page-cache"])
    assert time.perf_counter() - t0 < 60
    res, mb = out["results"], out["model"]
    text = (tmp_path / "res" / "table_io_tiny-quick.md").read_text()
    for row in ("naive", "+ predictor", "+ windowing", "+ bundling"):
        assert f"| {row} |" in text
        assert len(res[row]) == 2  # --quick: 2 repeats
    n_cells = mb["n_layers"] * mb["n_neurons"]
    for r in res["naive"]:  # naive streams every layer's whole FFN per token
        assert r["bytes_read_per_token"] == mb["ffn"]
        assert r["neurons_read_per_token"] == 1.0
    for r in res["+ predictor"]:  # unbundled: one read per FFN part (up, down) per neuron, no coalescing
        assert r["reads_per_token"] == pytest.approx(2 * r["neurons_read_per_token"] * n_cells)
        # no reuse: everything selected (capped by the cache) is read again
        assert r["neurons_read_per_token"] == pytest.approx(min(r["neurons_selected_per_token"],
                                                                 r["neurons_computed_per_token"]))
    for row in ("+ windowing", "+ bundling"):  # the window re-reads less than no-reuse does
        w = np.median([r["neurons_read_per_token"] for r in res[row]])
        p = np.median([r["neurons_read_per_token"] for r in res["+ predictor"]])
        assert w < p
    for r in res["+ bundling"]:  # bundled reads: at most one read per neuron (coalescing merges runs)
        assert r["reads_per_token"] <= r["neurons_read_per_token"] * n_cells + 1e-9
        assert r["bytes_read_per_token"] < mb["ffn"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["oracle", "predictor", "gate-first"])
def test_predictor_curve_replica_matches_the_real_flash_path(tmp_path, monkeypatch, mode):
    """bench/predictor_curve.py replays flash mode teacher-forced; its perplexity must be what the
    real decode path (Generator + flashrt.perplexity, one token at a time) measures."""
    import flashrt
    from conftest import tiny_model
    from flashrt.perplexity import perplexity
    from flashrt.calibration import calibrate

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("predictor_curve", None)
    curve = importlib.import_module("predictor_curve")
    model = tiny_model("llama", tmp_path / "llama")
    calibrate(model, texts=None, n_tokens=400, sparsity=0.5, rank=8, progress=False, ctx=64, epochs=2)
    text_file = tmp_path / "held_out.txt"
    text_file.write_text("Now is the winter of our discontent made glorious summer by this sun of York; " * 3)
    out = tmp_path / "curve"
    curve.main([str(model), "--text", str(text_file), "--tokens", "200", "--ctx", "64", "--keep", "0.5",
                "--window", "3", "--modes", mode, "--out", str(out)])
    (row,) = __import__("json").loads(out.with_suffix(".json").read_text())["rows"]
    select = "oracle" if mode == "oracle" else "predictor"
    scoring = {"predictor": "product", "gate-first": "gate-first"}.get(mode)
    with flashrt.Generator(model, mode="flash", select=select, sparsity=0.5, window=3, threads=1,
                           progress=False, scoring=scoring) as g:
        real = perplexity(g, text_file.read_text(), context=64, max_tokens=200, progress=False)
    assert row["ppl"] == pytest.approx(real["perplexity"], rel=1e-4)
    assert row["computed"] == pytest.approx(real["neurons_computed_per_token"], abs=1e-6)
    assert "| " + mode + " |" in out.with_suffix(".md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:             # bench-only dependency
        assert out.with_suffix(".png").stat().st_size > 0


def test_drelu_synthetic_tiny_is_a_sparse_bamboo_model(tmp_path, monkeypatch):
    """make_synthetic.py's dReLU-Llama miniature (the drelu-llama-7b bench at 2 layers): a Llama-
    family model (model_type bamboo, relu on gate and up) whose decode walks the vocabulary
    (v -> v + 1: consecutive tokens share their latent state, so the window pays), with most of
    its neurons exactly zero per token (the oracle's exact set, through the runtime) and
    constructed fire / no-fire predictors that find >= 94% of the firing neurons."""
    import json

    import flashrt

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("make_synthetic", None)
    out = importlib.import_module("make_synthetic").build(tmp_path / "m", "drelu-tiny", quiet=True)
    with flashrt.Generator(out, progress=False) as g:
        assert g.files.architecture == "llama" and g.files.config["model_type"] == "bamboo"
        ids = list(g.stream_tokens(g.tokenizer.encode("w10 w11 w12"), max_new_tokens=16, temperature=1.0, seed=0))
    assert np.mean(np.diff(ids) == 1) > 0.8
    with flashrt.Generator(out, mode="flash", select="oracle", progress=False) as g:
        g.generate("w10 w11 w12", max_new_tokens=16, temperature=1.0, seed=0)
        active = g.stats.ffn["neurons_selected_per_token"]
    assert 0.03 < active < 0.2
    design = json.loads((out / "synthetic.json").read_text())["summary_on_64_designed_tokens"]
    assert design["recall"] >= 0.94 and design["active"] < 0.15 and design["selected"] < 0.5
    with flashrt.Generator(out, mode="flash", progress=False) as g:      # the predictors, by default
        assert g.select == "predictor"
        g.generate("w10 w11 w12", max_new_tokens=8, temperature=1.0, seed=0)
        assert active < g.stats.ffn["neurons_selected_per_token"] < 0.6


def test_synthetic_moe_tiny_flashrt_and_gguf_agree(tmp_path):
    """bench/make_synthetic_moe.py's tiny shape: the flashrt directory runs in flash mode equal to
    dense, and its GGUF converts back to the same routers, embeddings and experts' gate/up rows."""
    import warnings

    import flashrt
    from flashrt.format.reader import ModelFiles

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    moe = importlib.import_module("make_synthetic_moe")
    s = moe.SHAPES["tiny"]
    stats = moe.simulate_routing(0, s, n_tokens=300, caches=(2, 8))
    assert stats["token_to_token_expert_reuse"] > stats["chance_reuse_would_be"]
    assert stats["top10pct_experts_share_of_routes"] > stats["uniform_share_would_be"]
    assert stats["lru_hit_rate_by_cache_experts"][8] > stats["lru_hit_rate_by_cache_experts"][2]
    out = moe.write_flashrt(tmp_path / "tiny", s, 0, progress=False)
    gguf = moe.write_gguf(tmp_path / "tiny.gguf", s, 0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = flashrt.convert(gguf, tmp_path / "back", dtype="q4_0", progress=False)
        ids = [5, 9, 9, 300, 17]
        with flashrt.Generator(out, progress=False) as g:
            want = g.decode_logits(ids)
        with flashrt.Generator(out, mode="flash", memory_budget="130MB", progress=False) as g:
            np.testing.assert_array_equal(g.decode_logits(ids), want)
    a, b = ModelFiles.open(out), ModelFiles.open(back)
    ra, rb = a.load_resident(), b.load_resident()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.v_proj.weight"):
        np.testing.assert_array_equal(ra[name].data, rb[name].data)
    np.testing.assert_array_equal(ra["model.layers.0.block_sparse_moe.gate.weight"],
                                  rb["model.layers.0.block_sparse_moe.gate.weight"])
    cut = 2 * (s["dim"] // 32) * 18                               # gate and up blocks of each neuron row
    np.testing.assert_array_equal(a.read_ffn_layer(1)[:, :cut], b.read_ffn_layer(1)[:, :cut])


def test_scaling_peer_gguf_is_a_llama_of_the_opt_shapes_size(tmp_path, monkeypatch):
    """bench/figure_scaling.py's llama.cpp peer: a Llama GGUF with the OPT shape's parameter count
    (to within n_ff's rounding to q4_0 blocks), which flashrt's own GGUF importer reads back to the
    blocks that were written."""
    import warnings

    import flashrt
    from flashrt.format.reader import ModelFiles

    monkeypatch.syspath_prepend(str(BENCH))
    fs = importlib.import_module("figure_scaling")
    ms = importlib.import_module("make_synthetic")
    moe = importlib.import_module("make_synthetic_moe")
    for name in ("opt-1.3b", "opt-6.7b", "opt-13b"):
        sh, ls = ms.SHAPES[name], fs.llama_shape(name)
        d, L = sh["dim"], sh["n_layers"]
        opt = L * (4 * d * d + 2 * d * sh["n_neurons"])          # OPT: fc1 + fc2 per layer
        llama = L * (4 * d * d + 3 * d * ls["n_ff"])             # Llama: gate + up + down
        assert ls["n_ff"] % 32 == 0 and abs(llama - opt) / opt < 0.002, (name, llama, opt)
    out = fs.write_gguf("tiny", tmp_path / "tiny.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = flashrt.convert(out, tmp_path / "back", dtype="q4_0", progress=False)
    files = ModelFiles.open(back)
    d = ms.SHAPES["tiny"]["dim"]
    assert (files.n_layers, files.dim, files.n_neurons) == (2, d, fs.llama_shape("tiny")["n_ff"])
    v = files.load_resident()["model.layers.1.self_attn.v_proj.weight"].data
    want = moe.random_q4_0(0, ("attn_v", 1), d, d, 1.0 / (8 * np.sqrt(d)))
    np.testing.assert_array_equal(np.asarray(v).reshape(want.shape), want)
