"""Quantized storage end to end: Hugging Face fixtures and GGUF files converted to q8_0, q4_0
and q4_1, run dense and from flash.

Oracles: flashrt's float32 path (itself checked against transformers) on a float32 copy of
the values the converted model holds, dequantized: prefill (float32 BLAS over dequantized
blocks) must match it to float32 rounding, decode (integer dots against a per-block int8
copy of x) within the error that int8 activation costs; transformers' float32 logits (the fixtures) within the error
each storage type is measured to cost on these random tiny models; the dense path for the
flash path (same quantized weights, every neuron selected: <= 1e-5 on logits); the GGUF
file's own bytes for what is copied bit for bit, ggml's reference quantizer for what is
requantized.
"""
import math
import warnings

import numpy as np
import pytest

import flashrt
from flashrt.budget import UNITEMIZED_SHARE
from flashrt.convert import convert
from flashrt.format import ModelFiles
from flashrt.quant import QMatrix, dequantize, quantize

from flashrt.format.writer import ModelWriter

from conftest import FIXTURES, HF_NAMES, convert_hf_fixtures

QTYPES = ["q8_0", "q4_0", "q4_1"]
# Errors as max |logit - reference| / std(reference logits) over every fixture and position.
# Against transformers' float32 logits, measured: float16 0.004, q8_0 0.09 (decode 0.12),
# q4_0 1.22, q4_1 1.51 -- random tiny models (64 dims, unit-variance weights) are a worst
# case for 4-bit blocks; the bounds leave ~1.3x room and say what each type costs here.
REL_TOL = {"q8_0": 0.16, "q4_0": 1.6, "q4_1": 2.0}
# gemma2's soft-capped attention over alternating sliding windows amplifies weight rounding
# (measured q8_0 0.21, q4_0 1.75; float16 0.005)
REL_TOL_SCALE = {"gemma2": 1.4}
# Decode against the float32 model of the same dequantized weights: the int8 copy of x
# (measured <= 0.08 on the fixtures).
DECODE_REL_TOL = 0.15


def expected(name):
    e = np.load(FIXTURES / "hf" / name / "expected.npz")
    return e["input_ids"].ravel(), e["logits"].reshape(-1, e["logits"].shape[-1])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(name, qtype) -> converted model directory."""
    return convert_hf_fixtures(tmp_path_factory.mktemp("quant"), QTYPES)


def dequantized_copy(files, out):
    """A float32 model directory holding exactly the values `files` stores, dequantized: run by
    flashrt's float32 path (itself checked against transformers), it is the oracle for the
    quantized paths."""
    with ModelWriter(out, files.architecture, files.config, "float32") as w:
        for name, a in files.load_resident().items():
            w.add_resident(name, a.dequantize() if isinstance(a, QMatrix) else a.astype(np.float32))
        for l in range(files.n_layers):
            B = files.read_ffn_layer(l)
            n, P, d = B.shape[0], len(files.ffn_parts), files.dim
            cut = (P - 1) * (d // 32) * {"q8_0": 34, "q4_0": 18, "q4_1": 20}[files.qtype]
            head = dequantize(B[:, :cut].reshape(n, P - 1, -1), files.qtype).reshape(n, -1)
            w.add_ffn_layer(l, np.concatenate([head, dequantize(B[:, cut:], files.down_qtype)], 1))
    return out


def decode_logits(g, ids):
    g._reset()
    return np.stack([g.model.forward(np.array([t], dtype=np.int64), g.kv)[-1] for t in ids])


@pytest.mark.parametrize("qtype", QTYPES)
def test_hf_checkpoint_quantizes_on_request(quantized, qtype):
    m = ModelFiles.open(quantized["llama", qtype])
    assert m.storage == qtype and m.qtype == qtype and m.dtype == np.uint8
    assert m.manifest.format_version == 2
    d, n_parts = m.dim, len(m.ffn_parts)
    assert m.ffn_row_bytes == n_parts * d // 32 * {"q8_0": 34, "q4_0": 18, "q4_1": 20}[qtype]
    res = m.load_resident()
    for name, a in res.items():
        if a.ndim == 2:
            assert isinstance(a, QMatrix) and a.qtype == qtype, name
        else:
            assert a.dtype == np.float32, name
    # the stored blocks are ggml's quantization of the checkpoint's weights
    from safetensors.numpy import load_file
    src = load_file(FIXTURES / "hf" / "llama" / "model.safetensors")
    w = src["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    np.testing.assert_array_equal(res["model.layers.0.self_attn.q_proj.weight"].data, quantize(w, qtype))
    gate = src["model.layers.1.mlp.gate_proj.weight"].astype(np.float32)
    down = src["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    rows = m.read_ffn_layer(1)
    rb = m.ffn_row_bytes // n_parts
    np.testing.assert_array_equal(rows[:, :rb], quantize(gate, qtype))
    np.testing.assert_array_equal(rows[:, 2 * rb:], quantize(down.T, qtype))


@pytest.mark.parametrize("name", HF_NAMES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_model_computes_with_the_weights_it_holds(quantized, tmp_path, name, qtype):
    ids, _ = expected(name)
    files = ModelFiles.open(quantized[name, qtype])
    with flashrt.Generator(dequantized_copy(files, tmp_path / "f32")) as g:
        ref = g.logits(ids)
    with flashrt.Generator(files.path) as g:
        np.testing.assert_allclose(g.logits(ids), ref, atol=1e-4, rtol=0)     # prefill: float x
        err = np.abs(decode_logits(g, ids) - ref).max() / ref.std()          # decode: int8 x
    assert err < DECODE_REL_TOL, f"{name} {qtype}: decode error {err:.4f} x std(logits)"


@pytest.mark.parametrize("name", HF_NAMES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_logits_close_to_transformers(quantized, name, qtype):
    ids, want = expected(name)
    with flashrt.Generator(quantized[name, qtype]) as g:
        got = np.concatenate([g.logits(ids), decode_logits(g, ids)])
    err = np.abs(got - np.concatenate([want, want])).max() / want.std()
    bound = REL_TOL[qtype] * REL_TOL_SCALE.get(name, 1.0)
    assert err < bound, f"{name} {qtype}: max error {err:.4f} x std(logits)"


@pytest.mark.parametrize("name", HF_NAMES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("mode", ["flash", "naive"])
def test_flash_with_every_neuron_equals_dense_quantized(quantized, name, qtype, mode):
    ids, _ = expected(name)
    with flashrt.Generator(quantized[name, qtype]) as g:
        dense = g.logits(ids)
        dense_decode = decode_logits(g, ids)
    with flashrt.Generator(quantized[name, qtype], mode=mode,
                           select="all" if mode == "flash" else None) as g:
        np.testing.assert_allclose(g.logits(ids), dense, atol=1e-5, rtol=0)
        np.testing.assert_allclose(decode_logits(g, ids), dense_decode, atol=1e-5, rtol=0)


def test_budget_counts_quantized_bytes(quantized):
    f16 = ModelFiles.open(convert(FIXTURES / "hf" / "llama", quantized["llama", "q4_1"].parent / "l16",
                                  dtype="float16", progress=False))
    q4 = ModelFiles.open(quantized["llama", "q4_1"])
    assert q4.ffn_bytes * 3 < f16.ffn_bytes        # 20 bytes per 32 weights vs 64
    assert q4.resident_bytes * 2 < f16.resident_bytes
    with flashrt.Generator(f16.path, mode="flash", select="all") as g:
        p = g.plan
        fixed = p.resident_bytes + p.tokenizer_bytes + p.kv_bytes + p.working_bytes + p.predictor_bytes
    # the planner's own arithmetic: what it keeps back unitemized, then room for a quarter of the float16 FFN
    budget = math.ceil((fixed + f16.ffn_bytes // 4) / (1 - UNITEMIZED_SHARE))
    with flashrt.Generator(f16.path, mode="flash", memory_budget=budget, select="all") as g16, \
         flashrt.Generator(q4.path, mode="flash", memory_budget=budget, select="all") as g4:
        assert 0 < g16.plan.cache_rows < f16.n_neurons
        assert g4.plan.cache_rows >= min(q4.n_neurons, 3 * g16.plan.cache_rows)


def test_gguf_blocks_are_copied_bit_for_bit_and_down_requantized(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as gguf_dequantize
    from gguf_writer import tiny_hf_llama, write_llama_gguf
    from flashrt.convert.gguf import unpermute_qk

    hp, t = tiny_hf_llama(d=64, n_ff=96, heads=4, kv=2, vocab=40)
    G = gguf.GGMLQuantizationType
    qtypes = {name: G.Q4_1 for name, a in t.items() if a.ndim == 2}
    qtypes["model.embed_tokens.weight"] = G.Q8_0
    write_llama_gguf(tmp_path / "m.gguf", hp, t, qtypes=qtypes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # no tokenizer metadata
        q = ModelFiles.open(convert(tmp_path / "m.gguf", tmp_path / "q", progress=False))
        f32 = ModelFiles.open(convert(tmp_path / "m.gguf", tmp_path / "f32", dtype="float32",
                                      progress=False))
    assert q.storage == "q4_1"                                   # the file's own type
    assert q.manifest.source["tensors_copied_exactly"] == 1 + 2 * 6   # embedding, 4 attn + gate/up x 2 layers
    by = {x.name: x for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}

    def blocks(name):
        x = by[name]
        return np.asarray(x.data, np.uint8).reshape(int(x.shape[-1]), -1)

    res = q.load_resident()
    emb = res["model.embed_tokens.weight"]
    assert emb.qtype == "q8_0" and np.array_equal(emb.data, blocks("token_embd.weight"))
    for l in range(2):
        a = f"model.layers.{l}.self_attn."
        assert np.array_equal(res[a + "q_proj.weight"].data, unpermute_qk(blocks(f"blk.{l}.attn_q.weight"), 4))
        assert np.array_equal(res[a + "k_proj.weight"].data, unpermute_qk(blocks(f"blk.{l}.attn_k.weight"), 2))
        assert np.array_equal(res[a + "o_proj.weight"].data, blocks(f"blk.{l}.attn_output.weight"))
        rows = q.read_ffn_layer(l)
        rb = 64 // 32 * 20                                      # a q4_1 part of 64 weights
        assert rows.shape[1] == 2 * rb + 64 // 32 * 34           # gate, up q4_1; down q8_0
        assert np.array_equal(rows[:, :rb], blocks(f"blk.{l}.ffn_gate.weight"))
        assert np.array_equal(rows[:, rb:2 * rb], blocks(f"blk.{l}.ffn_up.weight"))
        down = gguf_dequantize(by[f"blk.{l}.ffn_down.weight"].data, G.Q4_1).reshape(64, 96)
        assert np.array_equal(rows[:, 2 * rb:], quantize(down.T, "q8_0"))    # re-blocked along d
    assert q.down_qtype == "q8_0" and q.manifest.ffn["down_dtype"] == "q8_0"
    # copied exactly: the values are the float32 conversion's, bit for bit
    f32_res = f32.load_resident()
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
        np.testing.assert_array_equal(res[name].dequantize(), f32_res[name])
    # the model computes with what it holds (prefill against the float32 copy), and flash with
    # every neuron equals dense, prefill and decode
    ids = np.arange(1, 12)
    with flashrt.Generator(dequantized_copy(q, tmp_path / "copy")) as g:
        ref = g.logits(ids)
    with flashrt.Generator(q.path) as g:
        dense = g.logits(ids)
        dense_decode = decode_logits(g, ids)
    np.testing.assert_allclose(dense, ref, atol=1e-4, rtol=0)
    with flashrt.Generator(q.path, mode="flash", select="all") as g:
        np.testing.assert_allclose(g.logits(ids), dense, atol=1e-5, rtol=0)
        np.testing.assert_allclose(decode_logits(g, ids), dense_decode, atol=1e-5, rtol=0)
