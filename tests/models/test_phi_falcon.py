"""Phi-3, Phi-2 and Falcon against transformers' logits (a tiny random checkpoint from
tests/fixtures/make_hf_fixtures.py): the fused qkv_proj / gate_up_proj are split by the
converter into llama's tensors, and the model runs batched and token by token."""
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

import flashrt
from flashrt.convert import convert
from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.format.reader import ModelFiles
from flashrt.models import phi3

from conftest import FIXTURES

SRC = FIXTURES / "hf" / "phi3"
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(SRC, tmp_path_factory.mktemp("phi3") / "m", dtype="float32", progress=False)


def test_fused_tensors_are_split_into_their_row_blocks(converted):
    src = load_file(str(SRC / "model.safetensors"))
    got = ModelFiles.open(converted).load_resident()
    qkv = src["model.layers.1.self_attn.qkv_proj.weight"]
    np.testing.assert_array_equal(got["model.layers.1.self_attn.q_proj.weight"], qkv[:64])
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    np.testing.assert_array_equal(got["model.layers.1.self_attn.v_proj.weight"], qkv[96:])
    assert not any("qkv_proj" in k or "gate_up" in k for k in got)


def test_logits_match_transformers_batched_and_token_by_token(converted):
    e = np.load(SRC / "expected.npz")
    ids, want = e["input_ids"], e["logits"]
    with flashrt.Generator(converted) as g:
        assert np.abs(g.logits(ids) - want).max() <= TOL
        g._reset()
        steps = np.stack([g.model.forward(np.array([t]), g.kv)[-1] for t in ids])
        assert np.abs(steps - want).max() <= TOL
        assert g.model.args.sliding_window == 6 < len(ids)


def test_refuses_partial_rotary_and_a_bad_fused_shape(tmp_path):
    import json
    import shutil

    config = json.loads((SRC / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        phi3.ModelArgs.from_dict({**config, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                 "partial_rotary_factor": 0.75}})
    bad = tmp_path / "bad"
    shutil.copytree(SRC, bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ModelFormatError, match="qkv_proj"):
        convert(bad, tmp_path / "out", dtype="float32", progress=False)


@pytest.mark.parametrize("name", ["phi", "falcon"])
def test_parallel_block_logits_match_transformers_batched_and_token_by_token(tmp_path, name):
    """Phi-2 (model_type phi: partial rotary, biases everywhere) and Falcon-7B's shape
    (multi-query, fused query_key_value, no biases): one LayerNorm feeds attention and FFN."""
    src = FIXTURES / "hf" / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(src, tmp_path / name, dtype="float32", progress=False)
    e = np.load(src / "expected.npz")
    ids, want = e["input_ids"], e["logits"]
    with flashrt.Generator(out) as g:
        if name == "phi":
            assert g.model.args.rotary_dim == 8 < g.model.args.head_dim
        else:
            assert g.model.args.num_key_value_heads == 1 and g.model.args.num_attention_heads == 4
        assert np.abs(g.logits(ids) - want).max() <= TOL
        g._reset()
        steps = np.stack([g.model.forward(np.array([t]), g.kv)[-1] for t in ids])
        assert np.abs(steps - want).max() <= TOL
