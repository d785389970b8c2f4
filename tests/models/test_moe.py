"""Mixture-of-experts families (Mixtral, Qwen3-MoE) against transformers' logits, and flash mode against dense.

The fixture tests/fixtures/hf/mixtral (4 experts of 96 neurons, top-2, 2 layers) was made by
tests/fixtures/make_hf_fixtures.py with transformers in float32."""
import json
import shutil
import warnings

import numpy as np
import pytest

from flashrt import Generator
from flashrt.convert import convert
from flashrt.errors import BudgetError, FlashrtError, ModelFormatError
from flashrt.ffn.moe import route
from flashrt.format.reader import ModelFiles

from conftest import FIXTURES

SRC = FIXTURES / "hf" / "mixtral"
EXPECTED = np.load(SRC / "expected.npz")
IDS, LOGITS = EXPECTED["input_ids"], EXPECTED["logits"]


def _convert(root, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer
        return convert(SRC, root / f"mixtral-{dtype}", dtype=dtype, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    return {dt: _convert(root, dt) for dt in ("float32", "float16", "q8_0", "q4_0", "q4_1")}


def _gen(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Generator(path, threads=1, progress=False, **kw)


def test_experts_are_contiguous_expert_major(models):
    files = ModelFiles.open(models["float32"])
    assert files.architecture == "mixtral" and files.n_neurons == 4 * 96
    from safetensors.numpy import load_file
    src = load_file(SRC / "model.safetensors")
    B = files.read_ffn_layer(1)
    for e in range(4):
        rows = B[e * 96:(e + 1) * 96]
        p = f"model.layers.1.block_sparse_moe.experts.{e}."
        np.testing.assert_array_equal(rows[:, :64], src[p + "w1.weight"])
        np.testing.assert_array_equal(rows[:, 64:128], src[p + "w3.weight"])
        np.testing.assert_array_equal(rows[:, 128:], src[p + "w2.weight"].T)


def test_dense_matches_transformers_batched_and_token_by_token(models):
    g = _gen(models["float32"])
    batched = g.logits(IDS)
    assert np.abs(batched - LOGITS).max() <= 1e-4
    stepped = g.decode_logits(IDS)
    assert np.abs(stepped - LOGITS).max() <= 1e-4
    g.close()


def test_route_oracle():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    router = rng.standard_normal((6, 8)).astype(np.float32)
    experts, weights = route(x, router, 3)
    z = (x.astype(np.float64) @ router.T.astype(np.float64))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for t in range(5):
        top = np.argsort(-p[t])[:3]
        np.testing.assert_array_equal(experts[t], top)
        np.testing.assert_allclose(weights[t], p[t, top] / p[t, top].sum(), rtol=1e-5)
    _, raw = route(x, router, 3, norm_topk=False)
    np.testing.assert_allclose(raw, np.take_along_axis(p, experts, 1), rtol=1e-5)


def _budgets(path, n_max=4):
    """{experts cached per layer: the smallest budget (bytes) giving that many}, scanning in 4 KB steps
    up from the smallest budget the planner accepts (the experts are 6-25 KB here)."""
    from flashrt.budget import parse_size
    with pytest.raises(BudgetError, match="expert caches of one token's experts") as e:
        _gen(path, mode="flash", memory_budget="100KB", max_context=32)
    need = parse_size(str(e.value).split("at least ")[1].split(" (")[0].replace(" ", ""))
    out = {}
    for b in range(need - 200_000, need + 400_000, 4000):
        try:
            g = _gen(path, mode="flash", memory_budget=b, max_context=32)
        except BudgetError:
            continue
        out.setdefault(g.ffn.cache_experts, b)
        g.close()
        if n_max in out:
            break
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "q8_0", "q4_0", "q4_1"])
def test_flash_equals_dense_at_every_budget(models, dtype):
    path = models[dtype]
    dense = _gen(path)
    want_batch, want_steps = dense.logits(IDS), dense.decode_logits(IDS)
    dense.close()
    if dtype == "float32":
        assert np.abs(want_batch - LOGITS).max() <= 1e-4
    elif dtype in ("float16", "q8_0"):  # 4-bit rounding of random weights flips routes: not compared
        assert np.abs(want_batch - LOGITS).max() < 0.1 * np.abs(LOGITS).max()
    budgets = _budgets(path)
    assert sorted(budgets) == [2, 3, 4]  # the smallest accepted budget holds one token's top-2
    hit_rates = []
    for n_cached, budget in sorted(budgets.items()):
        flash = _gen(path, mode="flash", memory_budget=budget, max_context=32)
        assert flash.ffn.cache_experts == n_cached
        np.testing.assert_array_equal(flash.logits(IDS), want_batch)
        np.testing.assert_array_equal(flash.decode_logits(IDS), want_steps)
        st = flash.stats.ffn
        assert st["tokens"] == len(IDS) and st["experts_per_token"] == 2 * 2  # top-2 in each of 2 layers
        assert st["bytes_read_per_token"] >= st["experts_read_per_token"] * flash.ffn.expert_bytes
        hit_rates.append(st["expert_hit_rate"])
        flash.close()
    assert hit_rates[0] < hit_rates[-1] and hit_rates == sorted(hit_rates)
    flash = _gen(path, mode="flash")  # no budget: every expert fits, each is read once
    np.testing.assert_array_equal(flash.decode_logits(IDS), want_steps)
    assert flash.ffn.cache_experts == 4 and flash.stats.ffn["experts_read_per_token"] <= 4 * 2 / len(IDS)
    flash.close()


def test_naive_reads_every_tokens_experts(models):
    g = _gen(models["q4_1"], mode="naive", memory_budget="50MB", max_context=32)
    dense = _gen(models["q4_1"])
    np.testing.assert_array_equal(g.decode_logits(IDS), dense.decode_logits(IDS))
    assert g.stats.ffn["expert_hit_rate"] == 0.0 and g.stats.ffn["experts_read_per_token"] == 4
    g.close()
    dense.close()


def test_select_other_than_router_is_refused(models):
    with pytest.raises(FlashrtError, match="routed exactly"):
        _gen(models["float32"], mode="flash", select="oracle")


def test_router_asking_for_more_experts_than_exist(tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(SRC, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="num_experts_per_tok 5 asks the router for more experts"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- the same checkpoint as a GGUF (llama architecture, ffn_*_exps tensors) ---------------
def _gguf(tmp_path, **kw):
    import sys
    sys.path.insert(0, str(FIXTURES.parent))
    from gguf_writer import write_moe_gguf
    from safetensors.numpy import load_file

    cfg = json.loads((SRC / "config.json").read_text())
    path = tmp_path / "mixtral.gguf"
    write_moe_gguf(path, cfg, load_file(SRC / "model.safetensors"), **kw)
    return path


def test_gguf_converts_to_the_same_logits(tmp_path, models):
    path = _gguf(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(path, tmp_path / "from-gguf", dtype="float32", progress=False)
    files = ModelFiles.open(out)
    assert files.architecture == "mixtral" and files.n_neurons == 4 * 96
    np.testing.assert_array_equal(files.read_ffn_layer(1), ModelFiles.open(models["float32"]).read_ffn_layer(1))
    g = _gen(out)
    assert np.abs(g.logits(IDS) - LOGITS).max() <= 1e-4
    assert np.abs(g.decode_logits(IDS) - LOGITS).max() <= 1e-4
    g.close()


def test_gguf_q8_0_experts_copied_and_flash_equals_dense(tmp_path):
    import gguf
    path = _gguf(tmp_path, expert_qtype=gguf.GGMLQuantizationType.Q8_0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(path, tmp_path / "from-gguf", progress=False)  # the default: the experts' type
    files = ModelFiles.open(out)
    assert files.qtype == "q8_0"
    # gate and up rows are the GGUF's blocks, bit for bit; the routers stay float
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    gate = raw["blk.0.ffn_gate_exps.weight"].reshape(4 * 96, -1)
    np.testing.assert_array_equal(files.read_ffn_layer(0)[:, :gate.shape[1]], gate)
    assert "model.layers.0.block_sparse_moe.gate.weight" not in files.manifest.tensor_dtypes
    dense = _gen(out)
    want = dense.decode_logits(IDS)
    assert np.abs(want - LOGITS).max() < 0.1 * np.abs(LOGITS).max()
    dense.close()
    flash = _gen(out, mode="flash", memory_budget=min(_budgets(out).values()), max_context=32)
    np.testing.assert_array_equal(flash.decode_logits(IDS), want)
    flash.close()


def test_gguf_expert_tensors_that_disagree_in_shape(tmp_path):
    path = _gguf(tmp_path, expert_shapes={"up": (4, 80, 64)})
    with pytest.raises(ModelFormatError, match=r"expert tensor 'blk.0.ffn_up_exps.weight' has shape \(4, 80, 64\)"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- Qwen3-MoE: Qwen3's q/k norms, 8 experts of 48 neurons, top-3 renormalised, tied head ----------
QSRC = FIXTURES / "hf" / "qwen3_moe"
QEXP = np.load(QSRC / "expected.npz")


def _convert_q(root, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(QSRC, root / f"qwen3moe-{dtype}", dtype=dtype, progress=False)


def test_qwen3_moe_matches_transformers_and_flash_equals_dense(tmp_path):
    ids, logits = QEXP["input_ids"], QEXP["logits"]
    path = _convert_q(tmp_path, "float32")
    files = ModelFiles.open(path)
    assert files.architecture == "qwen3_moe" and files.n_neurons == 8 * 48
    g = _gen(path)
    assert np.abs(g.logits(ids) - logits).max() <= 1e-4
    want = g.decode_logits(ids)
    assert np.abs(want - logits).max() <= 1e-4
    g.close()
    budgets = _budgets(path, 8)
    for n_cached in (3, 8):                   # the smallest cache (one token's top-3) and every expert
        flash = _gen(path, mode="flash", memory_budget=budgets[n_cached], max_context=32)
        assert flash.ffn.cache_experts == n_cached
        np.testing.assert_array_equal(flash.decode_logits(ids), want)
        np.testing.assert_array_equal(flash.logits(ids), _gen(path).logits(ids))
        flash.close()


def test_qwen3_moe_quantized_flash_equals_dense(tmp_path):
    ids = QEXP["input_ids"]
    path = _convert_q(tmp_path, "q8_0")
    dense = _gen(path)
    want = dense.decode_logits(ids)
    assert np.abs(want - QEXP["logits"]).max() < 0.1 * np.abs(QEXP["logits"]).max()
    flash = _gen(path, mode="flash", memory_budget=min(_budgets(path, 8).values()), max_context=32)
    np.testing.assert_array_equal(flash.decode_logits(ids), want)


def test_qwen3_moe_gguf_converts_to_the_same_logits(tmp_path):
    import sys
    sys.path.insert(0, str(FIXTURES.parent))
    from gguf_writer import write_moe_gguf
    from safetensors.numpy import load_file

    cfg = json.loads((QSRC / "config.json").read_text())
    src = tmp_path / "q.gguf"
    write_moe_gguf(src, cfg, load_file(QSRC / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(src, tmp_path / "from-gguf", dtype="float32", progress=False)
    files = ModelFiles.open(out)
    assert files.architecture == "qwen3_moe"
    g = _gen(out)
    assert np.abs(g.decode_logits(QEXP["input_ids"]) - QEXP["logits"]).max() <= 1e-4


def test_qwen3_moe_dense_layers_refused(tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(QSRC, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mlp_only_layers"] = [1]
    (src / "config.json").write_text(json.dumps(cfg))
    from flashrt.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="dense MLP"):
        convert(src, tmp_path / "out", progress=False)


class _SlowLoader:
    """A prefetch loader whose batches say they have landed only when asked the second time (as if
    the disk took a token); it records every wait() made while it held a batch during decoding."""

    def __init__(self, real):
        self.real, self.held, self.asked, self.waits_while_held, self.decoding = real, False, 0, 0, True

    def submit_rows(self, *a, **kw):
        self.real.submit_rows(*a, **kw)
        self.held, self.asked = True, 0

    @property
    def landed(self):
        self.asked += 1
        if self.asked >= 2:
            self.held = False
        return not self.held

    def wait(self):
        if self.held and self.decoding:
            self.waits_while_held += 1
        self.held = False
        return self.real.wait()

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_qwen3_moe_prefetch_equals_dense_and_never_waits_on_a_wrong_guess(tmp_path):
    from flashrt._core import loader as _loader
    ids = QEXP["input_ids"]
    path = _convert_q(tmp_path, "float32")
    dense = _gen(path)
    want = dense.decode_logits(ids)
    dense.close()
    budgets = _budgets(path, 8)
    for n_cached in (3, 5, 8):
        flash = _gen(path, mode="flash", memory_budget=budgets[n_cached], max_context=32)
        flash.ffn.prefetch = True
        np.testing.assert_array_equal(flash.decode_logits(ids), want)
        st = flash.stats.ffn
        if n_cached == 3:                      # no room beyond one token's top-3: nothing guessed in
            assert st["prefetch_experts_read_per_token"] == 0
        if n_cached == 5:                      # guesses read; hits and waste account for every one of them
            assert st["prefetch_experts_read_per_token"] > 0 and 0 < st["prefetch_guess_accuracy"] <= 1
            assert st["prefetch_hits_per_token"] <= st["prefetch_experts_read_per_token"]
            assert st["prefetch_wasted_bytes_per_token"] == pytest.approx(
                (st["prefetch_experts_read_per_token"] - st["prefetch_hits_per_token"]) * flash.ffn.expert_bytes)
        flash.close()
    # wrong guesses (experts the exact router picks neither for this token nor the next, learnt from a
    # first run) on a disk that takes a token: the exact selection never waits for them, the prefetch
    # meanwhile is skipped, and the logits do not move
    flash = _gen(path, mode="flash", memory_budget=budgets[6], max_context=32)
    ffn, picked = flash.ffn, {}
    fetch = ffn._fetch

    def recording(layer, experts):
        rows = fetch(layer, experts)
        picked[ffn.step, layer] = set(int(e) for e in experts)
        return rows

    ffn._fetch = recording
    np.testing.assert_array_equal(flash.decode_logits(ids), want)
    ffn._fetch = fetch
    ffn.prefetch = True
    ffn._guess = lambda layer, x: np.array([e for e in range(ffn.n_experts) if e not in picked[ffn.step, layer]
                                            and e not in picked.get((ffn.step + 1, layer), ())][:ffn.top_k], np.int64)
    ffn.pf_loader = slow = _SlowLoader(_loader.Loader(ffn.loader.path))
    np.testing.assert_array_equal(flash.decode_logits(ids), want)
    st = flash.stats.ffn
    assert slow.waits_while_held == 0 and st["prefetch_guess_accuracy"] == 0 and st["prefetch_hits_per_token"] == 0
    assert st["prefetch_skipped_per_token"] > 0 and st["prefetch_experts_read_per_token"] > 0
    slow.decoding = False
    flash.close()
