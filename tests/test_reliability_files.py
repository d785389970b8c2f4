"""Reliability of what flashrt reads: converted model directories and source checkpoints.

The property under test: opening a model and generating either works or raises a
flashrt error (FlashrtError and its subclasses) -- never another exception, a crash, a
hang or silent garbage. "Silent garbage" is made precise: a run whose output differs
from the intact model's must come from a corruption that `verify(full=True)` (the
`flashrt info --verify` full hash) reports. The cheap checks at open (sizes, head hashes
of the first and last MiB, the manifest's own checksum, tensor shapes against the
config) catch most damage; a flipped byte in the middle of tensor data is caught at run
time only when it makes the logits non-finite, and otherwise by the full hash alone.

The fuzz runs in a child pytest process so that a segfault or a hang fails the test
instead of killing the session. Kill-mid-convert cases run in subprocesses too.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import flashrt
from conftest import byte_tokenizer_json, tiny_model  # noqa: F401
from flashrt.convert import convert
from flashrt.errors import FlashrtError, ModelFormatError, UnsupportedModelError
from flashrt.format import ModelFiles
from flashrt.format import manifest as manifest_mod

REPO = Path(__file__).resolve().parents[1]
HF = REPO / "tests" / "fixtures" / "hf"
CHILD_ENV = "FLASHRT_RELIABILITY_FUZZ_CHILD"
SMALL_HEAD = 512  # head-hash window in the fuzz: most tensor bytes lie outside it
IDS = np.array([1, 7, 42, 3, 99, 5], np.int64)




def python_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def run_model(path: Path, mode: str):
    """(logits of IDS, greedy text of 4 tokens) from a fresh Generator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flash mode without predictors warns
        with flashrt.Generator(path, mode=mode, progress=False) as g:
            logits = g.logits(IDS)
            text = g.generate("hi", max_new_tokens=4)
    return logits, text


# -- 1. the fuzz (in a child process) ------------------------------------------------
def test_fuzz_model_directory_in_a_child_process():
    """Runs `test_fuzz_body` below in a child pytest: a crash or hang fails here."""
    env = python_env()
    env[CHILD_ENV] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           f"{__file__}::test_fuzz_body"]
    try:
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzz hung (no result in 150 s):\n{(e.stdout or b'')[-3000:]}")
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, f"fuzz child exited {r.returncode} (negative = signal):\n{out}"
    assert "1 passed" in r.stdout, out


def test_mutation_fuzz_each_case_in_a_child_process(tmp_path, capsys):
    """tests/fuzz_driver.py: FLASHRT_FUZZ_CASES (default 150) mutations of HF and GGUF sources
    and of model directories (config fields, tensor shapes, metadata values, truncation),
    each in a fork()ed child with a 3 GiB address-space limit and a 30 s timeout: 0 crashes,
    0 hangs, and every failure a FlashrtError with a one-line message."""
    n = int(os.environ.get("FLASHRT_FUZZ_CASES", "150"))
    seed = int(os.environ.get("FLASHRT_FUZZ_SEED", "0"))
    cmd = [sys.executable, str(REPO / "tests" / "fuzz_driver.py"), str(tmp_path / "work"), "--cases", str(n),
           "--seed", str(seed), "--timeout", "30", "--mem-mb", "3072"]
    try:
        r = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=60 + 10 * n)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fuzz driver itself hung ({n} cases)")
    assert r.returncode == 0, f"fuzz driver exited {r.returncode}:\n{r.stderr[-3000:]}"
    summary = json.loads(r.stdout.split("FUZZ ", 1)[1])
    with capsys.disabled():
        print(f"\nmutation fuzz: {summary['cases']} cases (seed {seed}): {summary['ok']} ran, {summary['refused']} "
              f"refused {summary['refused_by']}, {summary['skip']} not applicable, {len(summary['bugs'])} "
              f"non-FlashrtError, {len(summary['crashes'])} crashes, {len(summary['hangs'])} hangs")
    assert summary["cases"] == n
    problems = summary["bugs"] + summary["crashes"] + summary["hangs"] + summary["multiline"]
    assert not problems, json.dumps(problems, indent=1)[:6000]


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    """Intact tiny models (llama: gated; opt: ReLU with biases) and their outputs, written
    with a small head-hash window so that byte flips also reach the run-time checks."""
    if not os.environ.get(CHILD_ENV):
        pytest.skip("runs inside test_fuzz_model_directory_in_a_child_process")
    mp = pytest.MonkeyPatch()
    mp.setattr(manifest_mod, "HEAD_BYTES", SMALL_HEAD)
    root = tmp_path_factory.mktemp("fuzz")
    bases = {}
    for name in ("llama", "opt"):
        path = tiny_model(name, root / name)
        bases[name] = (path, {mode: run_model(path, mode) for mode in ("dense", "flash")})
    yield _Quiet(bases)
    mp.undo()


class _Quiet(dict):
    """Keeps hypothesis' falsifying-example report short."""

    def __repr__(self):
        return "<intact tiny models and their outputs>"


def _manifest_paths(man: dict) -> list:
    """Every leaf of the manifest (and every container) as a key path."""
    out = []

    def walk(node, prefix):
        if prefix:
            out.append(prefix)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, prefix + (i,))

    walk(man, ())
    return [p for p in out if p != ("checksum",)]


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.integers(-(1 << 62), 1 << 62),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(0, 1 << 20), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def mutations(draw):
    """One damage to a model directory, as plain data (shrinks well, prints readably)."""
    kind = draw(st.sampled_from(["field", "field", "manifest_bytes", "truncate", "flip", "flip",
                                 "delete"]))
    name = draw(st.sampled_from(["llama", "opt"]))
    if kind == "field":
        return dict(kind=kind, model=name, path_index=draw(st.integers(0, 10_000)),
                    op=draw(st.sampled_from(["set", "set", "delta", "delete"])),
                    value=draw(json_values), delta=draw(st.integers(-5000, 5000)),
                    rehash=draw(st.booleans()))
    files = ["manifest.json", "ffn.bin", "resident.safetensors", "tokenizer.json",
             "tokenizer_config.json"]
    target = draw(st.sampled_from(files))
    if kind == "manifest_bytes":
        target = "manifest.json"
    if kind == "delete":
        return dict(kind=kind, model=name, file=target)
    if kind == "truncate":
        return dict(kind=kind, model=name, file=target, fraction=draw(st.floats(0, 1, exclude_max=True)))
    flips = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                          min_size=1, max_size=4))
    return dict(kind=kind, model=name, file=target, flips=flips)


def apply_mutation(m: dict, d: Path) -> None:
    if m["kind"] == "field":
        man = json.loads((d / "manifest.json").read_text())
        paths = _manifest_paths(man)
        path = paths[m["path_index"] % len(paths)]
        parent = man
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if m["op"] == "delete":
            del parent[key]
        elif m["op"] == "delta" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] + m["delta"]
        else:
            parent[key] = m["value"]
        if m["rehash"]:  # a writer that got it wrong, not a damaged file: deeper checks must hold
            man["checksum"] = manifest_mod.manifest_checksum(man)
        (d / "manifest.json").write_text(json.dumps(man))
        return
    p = d / m["file"]
    if m["kind"] == "delete":
        p.unlink()
    elif m["kind"] == "truncate":
        os.truncate(p, int(m["fraction"] * p.stat().st_size))
    else:
        size = p.stat().st_size
        for where, mask in m["flips"]:
            flip(p, int(where * size), mask)


def _verify_catches(d: Path) -> bool:
    try:
        ModelFiles.open(d).verify(full=True)
    except ModelFormatError:
        return True
    return False


@settings(max_examples=int(os.environ.get("FLASHRT_FUZZ_EXAMPLES", "120")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(m=mutations())
def test_fuzz_body(fuzz_bases, tmp_path_factory, m):
    base, reference = fuzz_bases[m["model"]]
    d = tmp_path_factory.mktemp("mut") / "m"
    shutil.copytree(base, d)
    apply_mutation(m, d)
    for mode in ("dense", "flash"):
        try:
            logits, text = run_model(d, mode)
        except FlashrtError as e:
            assert str(e) and "\n" not in str(e).strip()
            event(f"{m['kind']}: {type(e).__name__}")
            continue
        event(f"{m['kind']}: ran")
        # it worked: the output is the intact model's, or the damage is one --verify reports
        ref_logits, ref_text = reference[mode]
        same = logits.shape == ref_logits.shape and np.array_equal(logits, ref_logits) and text == ref_text
        if not same and not (m["kind"] == "field" and m["rehash"]):
            assert _verify_catches(d), f"silent garbage: {m} ran in {mode} mode, output changed, verify passed"
    shutil.rmtree(d.parent)


# -- 2. targeted model-file cases (what the fuzz may rarely hit, asserted precisely) ---
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("rel") / "llama")


@pytest.fixture
def copy_llama(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    return d


def _edit(d: Path, fn, rehash: bool) -> None:
    man = json.loads((d / "manifest.json").read_text())
    fn(man)
    if rehash:
        man["checksum"] = manifest_mod.manifest_checksum(man)
    (d / "manifest.json").write_text(json.dumps(man))


def test_manifest_checksum_catches_a_silent_edit(copy_llama):
    """rms_norm_eps 1e-5 -> 1e-3 is a valid-looking manifest that changes every output."""
    _edit(copy_llama, lambda m: m["config"].update(rms_norm_eps=1e-3), rehash=False)
    with pytest.raises(ModelFormatError, match="manifest.*checksum"):
        ModelFiles.open(copy_llama)
    _edit(copy_llama, lambda m: m.pop("checksum"), rehash=False)  # the documented way to accept an edit
    ModelFiles.open(copy_llama)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(hidden_size=32), "FFN holds|shape"),
    (lambda m: m["config"].update(vocab_size=10**6), "embed_tokens.*shape"),
    (lambda m: m["config"].update(num_attention_heads=8, head_dim=8), "k_proj.*shape"),
    (lambda m: m["config"].update(intermediate_size=100), "FFN holds 144 neurons"),
    (lambda m: m["config"].update(num_key_value_heads=3), "multiple|k_proj"),
    (lambda m: m["config"].update(head_dim="16"), "config|shape"),
    (lambda m: m["config"].pop("vocab_size"), "vocab_size"),
    (lambda m: m["config"].update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (lambda m: m["config"].update(hidden_act="quick_gelu"), "hidden_act"),
])
def test_consistent_but_wrong_manifest_is_refused(copy_llama, edit, match):
    """A manifest with a valid checksum whose config disagrees with the tensors."""
    _edit(copy_llama, edit, rehash=True)
    for mode in ("dense", "flash"):
        with pytest.raises(ModelFormatError, match=match):
            run_model(copy_llama, mode)


@pytest.mark.parametrize("mode", ["dense", "flash"])
def test_flipped_exponent_in_resident_tensor_raises_at_run_time(tmp_path, mode):
    """Outside the head hash, an exponent flip (-> inf/huge) gives non-finite logits: raised."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest_mod, "HEAD_BYTES", SMALL_HEAD)
        d = tiny_model("llama", tmp_path / "m")
        files = ModelFiles.open(d)
        w = files.load_resident()["model.layers.1.input_layernorm.weight"]
        assert w.dtype == np.float32
        # the norm weight's bytes: find them in the file, flip the exponent of one element
        raw = (d / "resident.safetensors").read_bytes()
        at = raw.index(w.tobytes())
        assert SMALL_HEAD < at < len(raw) - SMALL_HEAD
        flip(d / "resident.safetensors", at + 4 * 5 + 3, 0x40)  # bit 30 of float32 #5: |x| < 2 -> inf or ~1e38
        ModelFiles.open(d)  # the cheap checks cannot see it
        with pytest.raises(ModelFormatError, match="non-finite.*--verify"):
            run_model(d, mode)
        with pytest.raises(ModelFormatError, match="resident.safetensors.*corrupt"):
            ModelFiles.open(d).verify(full=True)


def test_finite_garbage_in_bundles_is_found_by_full_verify_only(tmp_path):
    """The documented limit: a mantissa flip in ffn.bin runs (slightly different output);
    `verify(full=True)` / `flashrt info --verify` is what detects it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest_mod, "HEAD_BYTES", SMALL_HEAD)
        d = tiny_model("llama", tmp_path / "m")
        ref, _ = run_model(d, "dense")
        files = ModelFiles.open(d)
        flip(d / "ffn.bin", files.ffn_layer_offset(1) + 1000 * 4, 0x01)  # lowest mantissa bit
        got, _ = run_model(d, "dense")
        assert np.isfinite(got).all()
        with pytest.raises(ModelFormatError, match="ffn.bin.*full hash"):
            ModelFiles.open(d).verify(full=True)


def test_default_head_hash_covers_tiny_models_entirely(copy_llama):
    """With the real 1 MiB head window every byte of a tiny model is checked at open."""
    size = (copy_llama / "ffn.bin").stat().st_size
    assert size <= 2 * manifest_mod.HEAD_BYTES
    flip(copy_llama / "ffn.bin", size // 2, 0x01)
    with pytest.raises(ModelFormatError, match="ffn.bin.*head hash"):
        ModelFiles.open(copy_llama)


# -- 3. source checkpoints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from gguf_writer import tiny_hf_llama, write_llama_gguf   # the GGUF writer the converter tests use

    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(p, *tiny_hf_llama())
    return p


def _convert_outcome(src, out):
    """'ok', or the FlashrtError subclass raised; any other exception propagates (a failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            convert(src, out, dtype="float32", progress=False)
        except FlashrtError as e:
            assert str(e)
            return type(e).__name__
    ModelFiles.open(out).verify(full=True)  # whatever convert writes is a complete model
    return "ok"


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["safetensors", "gguf"]), truncate=st.booleans(),
       where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255), header_bias=st.booleans())
def test_corrupt_source_files_are_refused_or_converted(tmp_path_factory, gguf_file, kind, truncate, where,
                                                       mask, header_bias):
    root = tmp_path_factory.mktemp("src")
    if kind == "safetensors":
        src = root / "hf"
        shutil.copytree(HF / "llama", src)
        p = src / "model.safetensors"
    else:
        src = p = root / "m.gguf"
        shutil.copy(gguf_file, p)
    size = p.stat().st_size
    if truncate:
        os.truncate(p, int(where * size))
    else:
        flip(p, int(where * (min(size, 8192) if header_bias else size)), mask)
    outcome = _convert_outcome(src, root / "out")
    if truncate:
        assert outcome != "ok"
    if outcome != "ok":
        assert not (root / "out").exists()
    shutil.rmtree(root)


def test_truncated_sources_name_the_problem(tmp_path, gguf_file):
    src = tmp_path / "hf"
    shutil.copytree(HF / "opt", src)
    os.truncate(src / "model.safetensors", (src / "model.safetensors").stat().st_size - 100)
    with pytest.raises(ModelFormatError, match="model.safetensors.*truncated"):
        convert(src, tmp_path / "o1", progress=False)
    g = tmp_path / "m.gguf"
    g.write_bytes(gguf_file.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="m.gguf"):
        convert(g, tmp_path / "o2", progress=False)
    g.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(ModelFormatError, match="m.gguf"):
        convert(g, tmp_path / "o3", progress=False)
    (tmp_path / "x.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="x.bin.*GGUF"):
        convert(tmp_path / "x.bin", tmp_path / "o4", progress=False)
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hf"
    src.mkdir()
    shutil.copy(HF / "llama" / "config.json", src)
    t = load_file(str(HF / "llama" / "model.safetensors"))
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(src / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _convert_outcome(src, tmp_path / "ok") == "ok"
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors.*missing"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope'"),
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox'"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_config_options_are_refused(tmp_path, edit, match):
    src = tmp_path / "hf"
    shutil.copytree(HF / "llama", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters") if "rope_parameters" in edit or "rope_scaling" in edit else None
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=match):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


# -- 4. a conversion killed mid-way ----------------------------------------------------
KILL_POINTS = {
    # name: code that arranges SIGKILL at that point of convert()
    "ffn_layer": """
import flashrt.format.writer as W
orig = W.ModelWriter.add_ffn_layer
def add(self, l, b):
    if l == 1: os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, l, b)
W.ModelWriter.add_ffn_layer = add
""",
    "resident_write": """
import safetensors.numpy as S
orig = S.save_file
def save(tensors, path, metadata=None):
    orig(tensors, path, metadata=metadata)
    with open(path, "r+b") as f: f.truncate(1000)   # half-written
    os.kill(os.getpid(), signal.SIGKILL)
S.save_file = save
""",
    "before_rename": """
import flashrt.format.writer as W
def move(self): os.kill(os.getpid(), signal.SIGKILL)
W.ModelWriter._move_into_place = move
""",
}


@pytest.mark.filterwarnings("ignore:.*no tokenizer")
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_killed_mid_way_leaves_nothing_valid(tmp_path, point, overwrite):
    out = tmp_path / "model"
    if overwrite:  # an older conversion at the target must survive a failed re-conversion
        convert(HF / "opt", out, dtype="float32", progress=False)
    code = ("import os, signal, warnings\nwarnings.simplefilter('ignore')\n" + KILL_POINTS[point] +
            f"\nfrom flashrt.convert import convert\nconvert({str(HF / 'llama')!r}, {str(out)!r}, "
            f"dtype='float32', overwrite={overwrite}, progress=False)\n")
    r = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=tmp_path, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    if overwrite:
        assert ModelFiles.open(out).architecture == "opt"  # the old model, intact
    else:
        assert not out.exists()
        with pytest.raises(ModelFormatError, match="flashrt convert"):
            ModelFiles.open(out)
    # the next conversion sweeps the dead process's temp dir and succeeds
    assert list(tmp_path.glob("model.tmp-*"))
    convert(HF / "llama", out, dtype="float32", overwrite=True, progress=False)
    assert not list(tmp_path.glob("model.tmp-*"))
    ModelFiles.open(out).verify(full=True)
