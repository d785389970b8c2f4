"""Gemma, Gemma 2, Gemma 3 and Phi-3 from GGUF: the transformers-made fixtures written the way
llama.cpp's converter writes them (tensor names from gguf-py's TensorNameMap, Gemma norms
stored as 1 + w, phi3's fused attn_qkv and ffn_up) convert to transformers' logits."""
import warnings

import numpy as np
import pytest

import flashrt
from flashrt.convert.gguf import convert_gguf
from flashrt.errors import ModelFormatError
from flashrt.models import gemma

from conftest import FIXTURES
from gguf_writer import write_family_gguf

CASES = [("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3", "gemma3"), ("phi3", "phi3"), ("phi", "phi2"),
         ("falcon", "falcon")]
ARCH = {"phi3": "phi3", "phi2": "phi", "falcon": "falcon"}


def _gguf_logits(tmp_path, src_dir, arch, ids, **kw):
    src = tmp_path / f"{arch}.gguf"
    write_family_gguf(src, src_dir, arch, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer, sliding windows
        out = convert_gguf(src, tmp_path / "m", dtype="float32", progress=False)
    with flashrt.Generator(out) as g:
        assert g.files.architecture == ARCH.get(arch, "gemma")
        batch = g.logits(ids)
        g._reset()
        steps = np.stack([g.model.forward(np.array([t]), g.kv)[-1] for t in ids])
    return batch, steps


@pytest.mark.parametrize("fixture,arch", [c for c in CASES if c[0] != "gemma2"])
def test_gguf_converts_to_transformers_logits(tmp_path, fixture, arch):
    e = np.load(FIXTURES / "hf" / fixture / "expected.npz")
    for got in _gguf_logits(tmp_path, FIXTURES / "hf" / fixture, arch, e["input_ids"]):
        assert np.abs(got - e["logits"]).max() <= 1e-4


def test_phi2_gguf_with_a_fused_attn_qkv(tmp_path):
    e = np.load(FIXTURES / "hf" / "phi" / "expected.npz")
    for got in _gguf_logits(tmp_path, FIXTURES / "hf" / "phi", "phi2", e["input_ids"], fuse_qkv=True):
        assert np.abs(got - e["logits"]).max() <= 1e-4


def test_gemma2_gguf_converts_to_the_hf_conversions_logits(tmp_path):
    """A GGUF cannot say query_pre_attn_scalar (llama.cpp derives it from the shapes): the
    fixture's 24 becomes head_dim 16, and the GGUF converts to what the Hugging Face
    checkpoint with that config converts to (that path is checked against transformers)."""
    import json
    import shutil

    from flashrt.convert import convert

    src = tmp_path / "gemma2-hd"
    shutil.copytree(FIXTURES / "hf" / "gemma2", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": config["head_dim"]}))
    ids = np.load(src / "expected.npz")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = convert(src, tmp_path / "hf", dtype="float32", progress=False)
    with flashrt.Generator(hf) as g:
        want = g.logits(ids)
    assert np.abs(want - np.load(src / "expected.npz")["logits"]).max() > 1e-2  # the scalar matters
    for got in _gguf_logits(tmp_path, src, "gemma2", ids):
        assert np.abs(got - want).max() <= 1e-4  # the norms went through 1 + w - 1 in float32


def test_gemma_gguf_metadata_rules():
    """llama.cpp's fixed rules where a GGUF is silent: gemma2 alternates from layer 0, gemma3
    has every sixth layer full and a local RoPE base of 10000; a period or flags override."""
    meta = {"attention.key_length": 256, "attention.head_count": 8, "embedding_length": 2304,
            "attention.sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    get = lambda key, default=None: meta.get(key, default)  # noqa: E731
    g2 = gemma.gguf_config(get, "gemma2", 4)
    assert g2["layer_types"][:2] == ["sliding_attention", "full_attention"] and g2["query_pre_attn_scalar"] == 256
    assert g2["attn_logit_softcapping"] == 50.0 and g2["final_logit_softcapping"] == 30.0
    assert gemma.gguf_config(get, "gemma2", 46)["query_pre_attn_scalar"] == 2304 // 8  # the 27B shape
    g3 = gemma.gguf_config(get, "gemma3", 12)
    assert [i for i, t in enumerate(g3["layer_types"]) if t == "full_attention"] == [5, 11]
    assert g3["rope_local_base_freq"] == 10000.0 and "attn_logit_softcapping" not in g3
    meta["attention.sliding_window_pattern"] = [True, False, False]
    assert gemma.gguf_config(get, "gemma3", 3)["layer_types"] == ["sliding_attention", "full_attention",
                                                                  "full_attention"]
    with pytest.raises(ModelFormatError, match="sliding_window_pattern"):
        gemma.gguf_config(get, "gemma3", 4)


def test_phi3_gguf_fused_rows_must_add_up(tmp_path):
    import gguf

    from gguf_writer import write_family_gguf as write

    src = tmp_path / "phi3.gguf"
    write(src, FIXTURES / "hf" / "phi3", "phi3")
    r = gguf.GGUFReader(str(src))
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), arch="phi3")
    for k, f in r.fields.items():
        if k.startswith("phi3.") and not k.endswith("head_count_kv"):
            v = f.contents()
            if isinstance(v, int):
                w.add_uint32(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
    w.add_head_count_kv(4)  # 4 kv heads: qkv would need 192 rows, it has 128
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(s) for s in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="attn_qkv"):
        convert_gguf(bad, tmp_path / "m", dtype="float32", progress=False)
