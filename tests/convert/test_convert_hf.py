"""Hugging Face safetensors -> flashrt: every tensor lands where the spec says, exactly."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flashrt.convert import convert
from flashrt.convert.hf import convert_hf
from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.format import ModelFiles
from flashrt.models import architecture_for
from flashrt.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
# the dense families (tests/models/test_mixtral.py checks the experts' layout)
HF_FIXTURES = sorted(p.name for p in FIXTURES.glob("*") if (p / "config.json").is_file()
                     and "num_local_experts" not in (p / "config.json").read_text())


# -- tiny checkpoints written with NumPy (HF names written out literally) ----------------
def llama_checkpoint(model_type="llama", n_layers=2, d=16, n_ff=24, heads=4, kv=2, vocab=50,
                     tie=False, seed=0):
    rng = np.random.default_rng(seed)
    hd = d // heads

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    cfg = {"architectures": ["X"], "model_type": model_type, "hidden_size": d,
           "intermediate_size": n_ff, "num_hidden_layers": n_layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
           "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "max_position_embeddings": 64,
           "tie_word_embeddings": tie, "hidden_act": "silu", "bos_token_id": 1,
           "eos_token_id": 2}
    t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": w(d)}
    if not tie:
        t["lm_head.weight"] = w(vocab, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = w(d)
        t[p + "post_attention_layernorm.weight"] = w(d)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, d)
        t[p + "self_attn.k_proj.weight"] = w(kv * hd, d)
        t[p + "self_attn.v_proj.weight"] = w(kv * hd, d)
        t[p + "self_attn.o_proj.weight"] = w(d, heads * hd)
        if model_type == "qwen2":
            t[p + "self_attn.q_proj.bias"] = w(heads * hd)
            t[p + "self_attn.k_proj.bias"] = w(kv * hd)
            t[p + "self_attn.v_proj.bias"] = w(kv * hd)
        t[p + "mlp.gate_proj.weight"] = w(n_ff, d)
        t[p + "mlp.up_proj.weight"] = w(n_ff, d)
        t[p + "mlp.down_proj.weight"] = w(d, n_ff)
    return cfg, t


def opt_checkpoint(n_layers=2, d=16, n_ff=40, heads=2, vocab=50, max_pos=32, prefix="model.",
                   seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    cfg = {"model_type": "opt", "hidden_size": d, "ffn_dim": n_ff, "num_hidden_layers": n_layers,
           "num_attention_heads": heads, "vocab_size": vocab, "max_position_embeddings": max_pos,
           "do_layer_norm_before": True, "word_embed_proj_dim": d,
           "activation_function": "relu", "tie_word_embeddings": True}
    p0 = prefix + "decoder."
    t = {p0 + "embed_tokens.weight": w(vocab, d), p0 + "embed_positions.weight": w(max_pos + 2, d),
         p0 + "final_layer_norm.weight": w(d), p0 + "final_layer_norm.bias": w(d)}
    for i in range(n_layers):
        p = f"{p0}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = w(d, d)
            t[p + f"self_attn.{proj}.bias"] = w(d)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + f"{ln}.weight"] = w(d)
            t[p + f"{ln}.bias"] = w(d)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = w(n_ff, d), w(n_ff)
        t[p + "fc2.weight"], t[p + "fc2.bias"] = w(d, n_ff), w(d)
    return cfg, t


def save_checkpoint(path, cfg, tensors, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def ffn_parts(name_prefix, arch):
    if arch == "opt":
        return ("fc1.weight", "fc2.weight")
    if arch == "phi":
        return ("mlp.fc1.weight", "mlp.fc2.weight")
    if arch == "falcon":
        return ("mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")
    return ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def check_converted(out, tensors, arch, dtype, n_layers, layer_prefix):
    """Resident tensors equal the source (cast); bundle row i = concat(gate[i], up[i], down[:, i])."""
    m = ModelFiles.open(out)
    m.verify(full=True)
    assert m.architecture == arch and m.dtype == np.dtype(dtype)
    res = m.load_resident()
    ffn_names = set()
    for l in range(n_layers):
        names = [f"{layer_prefix}{l}.{n}" for n in ffn_parts(layer_prefix, arch)]
        ffn_names.update(names)
        src = [tensors[n] for n in names]
        src[-1] = src[-1].T  # the down projection's columns
        want = np.concatenate(src, axis=1).astype(dtype)
        np.testing.assert_array_equal(m.read_ffn_layer(l), want)
    expected = {n for n in tensors if n not in ffn_names}
    if m.config["tie_word_embeddings"]:
        expected.discard("lm_head.weight")
    assert set(res) == expected
    for name in expected:
        a = tensors[name]
        want = a.astype(dtype if a.ndim == 2 else np.float32)
        assert res[name].dtype == want.dtype, name
        np.testing.assert_array_equal(res[name], want, err_msg=name)
    return m


# -- conversions -----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llama_family(tmp_path, model_type, dtype):
    cfg, t = llama_checkpoint(model_type)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    convert_hf(src, tmp_path / "out", dtype=dtype, progress=False)
    m = check_converted(tmp_path / "out", t, "llama", dtype, 2, "model.layers.")
    assert m.ffn_parts == ("gate", "up", "down") and m.n_neurons == 24 and m.dim == 16
    assert m.config["head_dim"] == 4 and m.config["rope_theta"] == 5000.0
    assert m.manifest.source["kind"] == "hf"


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_opt(tmp_path, prefix):
    cfg, t = opt_checkpoint(prefix=prefix)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    convert_hf(src, tmp_path / "out", dtype="float16", progress=False)
    norm = {("model." + n if not n.startswith("model.") else n): a for n, a in t.items()}
    m = check_converted(tmp_path / "out", norm, "opt", "float16", 2, "model.decoder.layers.")
    assert m.ffn_parts == ("up", "down") and m.config["activation_function"] == "relu"


def test_sharded_index(tmp_path):
    cfg, t = llama_checkpoint(n_layers=3, seed=3)
    src = save_checkpoint(tmp_path / "src", cfg, t, shards=3)
    convert(src, tmp_path / "out", dtype="float32", progress=False)
    check_converted(tmp_path / "out", t, "llama", "float32", 3, "model.layers.")


def test_missing_shard(tmp_path):
    cfg, t = llama_checkpoint()
    src = save_checkpoint(tmp_path / "src", cfg, t, shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors.*missing"):
        convert_hf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def write_bf16(path, tensors_u16):
    """A safetensors file with BF16 tensors (raw uint16 bit patterns) — NumPy has no bf16."""
    header, blobs, off = {}, [], 0
    for name, bits in tensors_u16.items():
        b = bits.astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_bf16_checkpoint(tmp_path):
    cfg, t = llama_checkpoint(seed=4)
    # round to bf16: keep the top 16 bits of each float32
    bits = {n: (a.view(np.uint32) >> 16).astype(np.uint16) for n, a in t.items()}
    exact = {n: (b.astype(np.uint32) << 16).view(np.float32) for n, b in bits.items()}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    write_bf16(src / "model.safetensors", bits)
    convert_hf(src, tmp_path / "out", dtype="float32", progress=False)
    check_converted(tmp_path / "out", exact, "llama", "float32", 2, "model.layers.")


def test_float16_source(tmp_path):
    cfg, t = llama_checkpoint(seed=5)
    t16 = {n: a.astype(np.float16) for n, a in t.items()}
    src = save_checkpoint(tmp_path / "src", cfg, t16)
    convert_hf(src, tmp_path / "out", dtype="float16", progress=False)
    check_converted(tmp_path / "out", t16, "llama", "float16", 2, "model.layers.")


def test_untied_head_equal_to_embedding_is_dropped(tmp_path):
    cfg, t = llama_checkpoint(tie=False)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    src = save_checkpoint(tmp_path / "src", cfg, t)
    convert_hf(src, tmp_path / "out", dtype="float32", progress=False)
    m = ModelFiles.open(tmp_path / "out")
    assert m.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in m.load_resident()


def test_tied_config_ignores_head(tmp_path):
    cfg, t = llama_checkpoint(tie=True)
    t["lm_head.weight"] = t["model.embed_tokens.weight"] * 2  # HF ignores it when tied
    src = save_checkpoint(tmp_path / "src", cfg, t)
    convert_hf(src, tmp_path / "out", dtype="float32", progress=False)
    assert "lm_head.weight" not in ModelFiles.open(tmp_path / "out").load_resident()


# -- refusals --------------------------------------------------------------------------
def test_missing_tensor_and_bad_shape(tmp_path):
    cfg, t = llama_checkpoint()
    del t["model.layers.1.mlp.up_proj.weight"]
    src = save_checkpoint(tmp_path / "a", cfg, t)
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        convert_hf(src, tmp_path / "out", progress=False)
    cfg, t = llama_checkpoint()
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"]
    src = save_checkpoint(tmp_path / "b", cfg, t)
    with pytest.raises(ModelFormatError, match=r"k_proj\.weight.*shape"):
        convert_hf(src, tmp_path / "out", progress=False)
    cfg, t = llama_checkpoint(tie=False)
    del t["lm_head.weight"]
    src = save_checkpoint(tmp_path / "c", cfg, t)
    with pytest.raises(ModelFormatError, match="lm_head.weight"):
        convert_hf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, match", [
    ({"model_type": "gpt_neox"}, "gpt_neox"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "longrope"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ({"hidden_act": "quick_gelu"}, "quick_gelu"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_llama_configs(tmp_path, edit, match):
    cfg, t = llama_checkpoint()
    cfg.update(edit)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_hf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_default_rope_is_accepted_and_sliding_window_warns(tmp_path):
    cfg, t = llama_checkpoint("mistral")
    cfg.pop("rope_theta")
    cfg.update(rope_parameters={"rope_type": "default", "rope_theta": 123.0}, sliding_window=16)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    with pytest.warns(UserWarning, match="sliding_window"):
        convert_hf(src, tmp_path / "out", progress=False)
    assert ModelFiles.open(tmp_path / "out").config["rope_theta"] == 123.0


@pytest.mark.parametrize("rope, want", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_type": "linear", "factor": 2.0}),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}),
])
def test_supported_rope_scaling(tmp_path, rope, want):
    cfg, t = llama_checkpoint()
    cfg.update(rope)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    convert_hf(src, tmp_path / "out", progress=False)
    c = ModelFiles.open(tmp_path / "out").config
    assert c["rope_scaling"] == want
    assert c["rope_theta"] == rope.get("rope_parameters", {}).get("rope_theta", 5000.0)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}  # parameters missing
    cfg.pop("rope_parameters", None)
    src = save_checkpoint(tmp_path / "src2", cfg, t)
    with pytest.raises(ModelFormatError, match="low_freq_factor"):
        convert_hf(src, tmp_path / "out2", progress=False)


@pytest.mark.parametrize("edit, match", [
    ({"do_layer_norm_before": False}, "do_layer_norm_before"),
    ({"word_embed_proj_dim": 8}, "project_in"),
    ({"activation_function": "silu"}, "silu"),
])
def test_unsupported_opt_configs(tmp_path, edit, match):
    cfg, t = opt_checkpoint()
    cfg.update(edit)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_hf(src, tmp_path / "out", progress=False)


def test_quantized_checkpoint_is_refused(tmp_path):
    cfg, t = llama_checkpoint()
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].astype(np.int8)
    src = save_checkpoint(tmp_path / "src", cfg, t)
    with pytest.raises(UnsupportedModelError, match="I8"):
        convert_hf(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [src]


def test_no_weights(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(llama_checkpoint()[0]))
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        convert_hf(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(ModelFormatError, match="config.json"):
        convert_hf(tmp_path, tmp_path / "out", progress=False)


# -- tokenizer files -------------------------------------------------------------------
def tiny_tokenizer_json():
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "!": 5}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    return tk.to_str()


def test_tokenizer_is_carried_over(tmp_path):
    cfg, t = llama_checkpoint()
    src = save_checkpoint(tmp_path / "src", cfg, t)
    (src / "tokenizer.json").write_text(tiny_tokenizer_json())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "add_bos_token": True, "chat_template": "{% for m in messages %}[{{ m['content'] }}]"
                                                "{% endfor %}{{ eos_token }}"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    convert_hf(src, tmp_path / "out", progress=False)
    m = ModelFiles.open(tmp_path / "out")
    tok = Tokenizer.from_dir(m.tokenizer_dir)
    assert tok.encode("hello world !") == [0, 3, 4, 5]
    assert tok.bos_token_id == 0 and tok.eos_token_ids == {1, 2, 4}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]</s>"


def test_missing_tokenizer_warns(tmp_path):
    cfg, t = llama_checkpoint()
    src = save_checkpoint(tmp_path / "src", cfg, t)
    with pytest.warns(UserWarning, match="tokenizer"):
        convert_hf(src, tmp_path / "out", progress=False)
    m = ModelFiles.open(tmp_path / "out")
    assert m.tokenizer_dir is None and not (tmp_path / "out" / "tokenizer_config.json").exists()


# -- the shared tiny transformers checkpoints (tests/fixtures/hf/<name>) -----------------
@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hf_fixture(tmp_path, name):
    src = FIXTURES / name
    with safe_open(str(src / "model.safetensors"), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads((src / "config.json").read_text())
    arch = architecture_for(cfg)
    if arch == "phi3":  # the fused matrices, as their row blocks
        q, kv, n_ff = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"], \
            cfg["intermediate_size"]
        for i in range(cfg["num_hidden_layers"]):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            qkv = tensors.pop(a + "qkv_proj.weight")
            tensors |= {a + "q_proj.weight": qkv[:q], a + "k_proj.weight": qkv[q:q + kv],
                        a + "v_proj.weight": qkv[q + kv:]}
            gate_up = tensors.pop(m + "gate_up_proj.weight")
            tensors |= {m + "gate_proj.weight": gate_up[:n_ff], m + "up_proj.weight": gate_up[n_ff:]}
    if arch == "falcon":  # query_key_value as its [q heads, k, v] row blocks
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        for i in range(cfg["num_hidden_layers"]):
            a = f"transformer.h.{i}.self_attention."
            qkv = tensors.pop(a + "query_key_value.weight")
            tensors |= {a + "q.weight": qkv[:-2 * hd], a + "k.weight": qkv[-2 * hd:-hd], a + "v.weight": qkv[-hd:]}
    convert_hf(src, tmp_path / "out", dtype="float32", progress=False)
    prefix = {"opt": "model.decoder.layers.", "falcon": "transformer.h."}.get(arch, "model.layers.")
    check_converted(tmp_path / "out", tensors, arch, "float32", cfg["num_hidden_layers"], prefix)
