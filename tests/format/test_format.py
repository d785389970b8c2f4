"""The model directory format: writer -> reader round trips, and every corruption caught."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flashrt.errors import ModelFormatError
from flashrt.ffn.layout import (
    make_bundles,
    make_bundles_relu,
    part_views,
    split_bundles,
    unbundle,
)
from flashrt.format import (
    FORMAT_VERSION,
    MAGIC,
    ModelFiles,
    ModelWriter,
    OutputExistsError,
    register_file,
)
from flashrt.models import parts_for

REPO = Path(__file__).resolve().parents[2]


def tiny_config(n_layers=2, d=8, n_ff=20, arch="llama"):
    cfg = {"model_type": arch, "hidden_size": d, "num_hidden_layers": n_layers,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11}
    cfg["intermediate_size" if arch == "llama" else "ffn_dim"] = n_ff
    return cfg


def random_model(rng, n_layers=2, d=8, n_ff=20, arch="llama"):
    """(config, resident dict, list of per-layer bundles) in float32."""
    resident = {"model.embed_tokens.weight": rng.standard_normal((11, d), dtype=np.float32),
                "model.norm.weight": rng.standard_normal(d, dtype=np.float32)}
    n_parts = len(parts_for(arch))
    layers = [rng.standard_normal((n_ff, n_parts * d), dtype=np.float32) for _ in range(n_layers)]
    return tiny_config(n_layers, d, n_ff, arch), resident, layers


def write_model(out, arch="llama", dtype="float32", seed=0, tokenizer=True, **kw):
    rng = np.random.default_rng(seed)
    cfg, resident, layers = random_model(rng, arch=arch, **kw)
    with ModelWriter(out, arch, cfg, dtype) as w:
        for k, v in resident.items():
            w.add_resident(k, v)
        for l, b in enumerate(layers):
            w.add_ffn_layer(l, b)
        if tokenizer:
            w.add_tokenizer('{"version": "1.0"}', {"add_bos_token": False})
        w.commit()
    return cfg, resident, layers


# -- ffn_layout ------------------------------------------------------------------------
def test_make_bundles_matches_definition():
    rng = np.random.default_rng(1)
    n, d = 7, 5
    gate, up = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    down = rng.standard_normal((d, n))
    B = make_bundles(gate, up, down)
    for i in range(n):
        np.testing.assert_array_equal(B[i], np.concatenate([gate[i], up[i], down[:, i]]))
    views = split_bundles(B, parts_for("llama"))
    np.testing.assert_array_equal(views["down"], down.T)
    assert np.shares_memory(views["gate"], B)
    back = unbundle(B, parts_for("llama"))
    np.testing.assert_array_equal(back["down"], down)
    np.testing.assert_array_equal(back["up"], up)
    # one row, explicit dim
    row = part_views(B[3], ("gate", "up", "down"), d)
    np.testing.assert_array_equal(row["down"], down[:, 3])
    with pytest.raises(ValueError):
        part_views(B, ("gate", "up", "down"), d + 1)
    with pytest.raises(ValueError):
        make_bundles(gate, up, down.T)


def test_make_bundles_relu_and_dtype():
    rng = np.random.default_rng(2)
    up, down = rng.standard_normal((6, 4)), rng.standard_normal((4, 6))
    B = make_bundles_relu(up, down, dtype=np.float16)
    assert B.dtype == np.float16 and B.shape == (6, 8)
    np.testing.assert_array_equal(B[2], np.concatenate([up[2], down[:, 2]]).astype(np.float16))
    assert parts_for("opt") == ("up", "down")
    with pytest.raises(ValueError):
        parts_for("gpt2")


# -- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, arch, dtype):
    out = tmp_path / "m"
    cfg, resident, layers = write_model(out, arch=arch, dtype=dtype)
    m = ModelFiles.open(out)
    assert m.architecture == arch and m.config == cfg and m.dtype == np.dtype(dtype)
    assert m.ffn_parts == parts_for(arch) and m.n_neurons == 20 and m.dim == 8
    assert m.ffn_row_bytes == len(m.ffn_parts) * 8 * np.dtype(dtype).itemsize
    loaded = m.load_resident()
    assert set(loaded) == set(resident)
    emb = loaded["model.embed_tokens.weight"]
    np.testing.assert_array_equal(emb, resident["model.embed_tokens.weight"].astype(dtype))
    assert loaded["model.norm.weight"].dtype == np.float32  # 1-D always float32
    np.testing.assert_array_equal(loaded["model.norm.weight"], resident["model.norm.weight"])
    assert not isinstance(emb, np.memmap) and emb.flags.writeable
    raw = (out / "ffn.bin").read_bytes()
    assert len(raw) % 4096 == 0
    for l, b in enumerate(layers):
        off = m.ffn_layer_offset(l)
        assert off % 4096 == 0
        np.testing.assert_array_equal(m.read_ffn_layer(l), b.astype(dtype))
        # rows packed, then zero padding up to the next layer
        end = off + b.nbytes * np.dtype(dtype).itemsize // 4
        nxt = m.ffn_layer_offset(l + 1) if l + 1 < len(layers) else len(raw)
        assert raw[end:nxt] == bytes(nxt - end)
    assert m.tokenizer_dir == out
    n_parts = len(parts_for(arch))
    itemsize = np.dtype(dtype).itemsize
    assert m.ffn_bytes == 2 * 20 * n_parts * 8 * itemsize
    assert m.resident_bytes == sum(a.nbytes for a in loaded.values())
    with ModelFiles.open(out) as m2:
        assert m2.n_layers == 2
    m.verify(full=True)
    man = json.loads((out / "manifest.json").read_text())
    assert man["magic"] == MAGIC and man["format_version"] == FORMAT_VERSION
    assert set(man["files"]) == {"resident.safetensors", "ffn.bin", "tokenizer.json",
                                 "tokenizer_config.json"}
    assert not list(tmp_path.glob("m.tmp-*"))


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(1, 3), d=st.integers(1, 40), n_ff=st.integers(1, 70),
       arch=st.sampled_from(["llama", "opt"]), dtype=st.sampled_from(["float16", "float32"]),
       seed=st.integers(0, 2**16))
def test_round_trip_property(n_layers, d, n_ff, arch, dtype, seed):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        _, _, layers = write_model(out, arch=arch, dtype=dtype, seed=seed, tokenizer=False,
                                   n_layers=n_layers, d=d, n_ff=n_ff)
        m = ModelFiles.open(out)
        assert m.tokenizer_dir is None
        for l, b in enumerate(layers):
            np.testing.assert_array_equal(m.read_ffn_layer(l), b.astype(dtype))
        m.verify(full=True)


# -- writer behaviour --------------------------------------------------------------------
def test_refuses_existing_output_and_overwrites_atomically(tmp_path):
    out = tmp_path / "m"
    write_model(out, seed=0)
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_model(out, seed=1)
    assert isinstance(OutputExistsError("x"), (ModelFormatError, FileExistsError))
    rng = np.random.default_rng(5)
    cfg, resident, layers = random_model(rng)
    with ModelWriter(out, "llama", cfg, "float32", overwrite=True) as w:
        for k, v in resident.items():
            w.add_resident(k, v)
        for l, b in enumerate(layers):
            w.add_ffn_layer(l, b)
    m = ModelFiles.open(out)  # committed on clean exit
    np.testing.assert_array_equal(m.read_ffn_layer(1), layers[1])
    assert m.tokenizer_dir is None  # the old directory's tokenizer is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_exception_inside_with_removes_temp_dir(tmp_path):
    out = tmp_path / "m"
    rng = np.random.default_rng(0)
    cfg, resident, layers = random_model(rng)
    with pytest.raises(RuntimeError):
        with ModelWriter(out, "llama", cfg, "float32") as w:
            w.add_resident("model.norm.weight", resident["model.norm.weight"])
            w.add_ffn_layer(0, layers[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_model_is_not_committed(tmp_path):
    rng = np.random.default_rng(0)
    cfg, resident, layers = random_model(rng)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        with ModelWriter(tmp_path / "m", "llama", cfg, "float32") as w:
            w.add_resident("model.norm.weight", resident["model.norm.weight"])
            w.add_ffn_layer(0, layers[0])  # layer 1 never added
    assert list(tmp_path.iterdir()) == []
    with ModelWriter(tmp_path / "m", "llama", cfg, "float32") as w:
        with pytest.raises(ValueError, match="in order"):
            w.add_ffn_layer(1, layers[1])
        with pytest.raises(ValueError):
            w.add_ffn_layer(0, layers[0][:, :-1])  # not a multiple of 3 parts
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_is_refused(tmp_path):
    cfg = tiny_config(n_layers=1)
    with pytest.raises(ModelFormatError, match="float32"):
        with ModelWriter(tmp_path / "m", "llama", cfg, "float16") as w:
            w.add_resident("x", np.full((2, 2), 1e6, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_writer_leaves_no_valid_dir(tmp_path):
    """A writer killed mid-conversion (os._exit: no cleanup) leaves only a temp dir."""
    out = tmp_path / "m"
    code = f"""
import os, numpy as np
from flashrt.format import ModelWriter
cfg = {tiny_config(n_layers=2)!r}
w = ModelWriter({str(out)!r}, "llama", cfg, "float32")
w.add_resident("model.norm.weight", np.ones(8, np.float32))
w.add_ffn_layer(0, np.ones((20, 24), np.float32))
os._exit(3)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert r.returncode == 3
    assert not out.exists()
    (tmp,) = tmp_path.glob("m.tmp-*")
    for p in (out, tmp):
        with pytest.raises(ModelFormatError, match="flashrt convert"):
            ModelFiles.open(p)
    write_model(out)  # the next writer sweeps the dead process's temp dir
    assert not tmp.exists()
    ModelFiles.open(out)


# -- corruption ------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    out = tmp_path / "m"
    write_model(out, n_ff=200, d=64)
    return out


def edit_manifest(path, fn):
    man = json.loads((path / "manifest.json").read_text())
    fn(man)
    (path / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(magic="gguf"), "magic"),
    (lambda m: m.update(format_version=FORMAT_VERSION + 1), "upgrade flashrt"),
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m.pop("ffn"), "ffn"),
    (lambda m: m.pop("config"), "config"),
    (lambda m: m.update(dtype="int8"), "dtype"),
    (lambda m: m.update(architecture="gpt2"), "architecture"),
    (lambda m: m["ffn"].update(row_bytes=7), "row_bytes"),
    (lambda m: m["ffn"]["layer_offsets"].__setitem__(1, 4096 + 8), "layer_offsets"),
    (lambda m: m["ffn"]["layer_offsets"].__setitem__(1, 0), "layer_offsets"),
    (lambda m: m["ffn"]["layer_offsets"].append(1 << 40), "layer_offsets"),
    (lambda m: m["ffn"]["layer_offsets"].__setitem__(1, 1 << 30), "past the file size"),
    (lambda m: m["ffn"].pop("parts"), "parts"),
    (lambda m: m["ffn"].update(parts=["up", "down"]), "parts"),
    (lambda m: m["files"]["resident.safetensors"].update(bytes=12), "resident.safetensors"),
    (lambda m: m["files"]["ffn.bin"].update(head_hash="0" * 32), "ffn.bin"),
    (lambda m: m["files"].update({"../x": {"bytes": 1, "head_hash": ""}}), "outside"),
])
def test_bad_manifest(model_dir, edit, match):
    edit_manifest(model_dir, edit)
    with pytest.raises(ModelFormatError, match=match) as e:
        ModelFiles.open(model_dir)
    assert "flashrt" in str(e.value)


def test_manifest_not_json(model_dir):
    (model_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="JSON"):
        ModelFiles.open(model_dir)


@pytest.mark.parametrize("name", ["ffn.bin", "resident.safetensors", "tokenizer.json"])
def test_truncated_or_missing_file(model_dir, name):
    p = model_dir / name
    data = p.read_bytes()
    p.write_bytes(data[:-1])
    with pytest.raises(ModelFormatError, match=f"{name}.*truncated.*flashrt convert"):
        ModelFiles.open(model_dir)
    p.unlink()
    with pytest.raises(ModelFormatError, match=f"{name}.*missing"):
        ModelFiles.open(model_dir)


def flip_byte(p, offset):
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_head_and_full_hashes(tmp_path):
    out = tmp_path / "m"
    write_model(out, n_ff=4000, d=96)  # ffn.bin ~ 9 MiB: the middle is outside the head hash
    ffn = out / "ffn.bin"
    size = ffn.stat().st_size
    assert size > 4 << 20
    flip_byte(ffn, size // 2)  # middle: only the full hash sees it
    m = ModelFiles.open(out)
    m.verify(full=False)
    with pytest.raises(ModelFormatError, match="ffn.bin.*corrupt"):
        m.verify(full=True)
    flip_byte(ffn, size // 2)
    m.verify(full=True)
    flip_byte(ffn, 100)  # the first MiB: caught at open
    with pytest.raises(ModelFormatError, match="ffn.bin.*head hash"):
        ModelFiles.open(out)
    flip_byte(ffn, 100)
    flip_byte(ffn, size - 100)  # the last MiB too
    with pytest.raises(ModelFormatError, match="ffn.bin.*head hash"):
        ModelFiles.open(out)


def test_register_file(model_dir):
    np.savez(model_dir / "predictors.npz", a=np.arange(10))
    register_file(model_dir, "predictors.npz")
    m = ModelFiles.open(model_dir)
    assert m.manifest.files["predictors.npz"]["bytes"] == (model_dir / "predictors.npz").stat().st_size
    m.verify(full=True)
    (model_dir / "predictors.npz").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="predictors.npz"):
        ModelFiles.open(model_dir)
    with pytest.raises(ValueError):
        register_file(model_dir, "../x")


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelFormatError, match="flashrt convert"):
        ModelFiles.open(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="manifest.json"):
        ModelFiles.open(tmp_path)
