"""Hardening (issue 10): fork safety, crashes on shrinking files, --overwrite data loss,
hostile chat templates and predictor files, disk-full conversions, the CLI's last line of
defence. Every test here failed before its fix."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import flashrt
from flashrt._core.loader import uring_available
from flashrt.errors import FlashrtError, GenerationError

ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a hang is a test failure, not a stuck suite."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"child hung for {timeout} s; stdout: {e.stdout!r} stderr: {e.stderr!r}")


# ---------------------------------------------------------------------------- fork()

BACKENDS = ["pread"] + (["uring"] if uring_available()[0] else [])

FORK_LOADER = """
    import os, sys, numpy as np
    from flashrt._core.loader import Loader
    path, backend = sys.argv[1], sys.argv[2]
    data = np.fromfile(path, np.uint8)
    ld = Loader(path, backend=backend)
    d = np.empty(1 << 20, np.uint8)
    ld.read_range(0, d)                     # the pool / ring is up and used
    pid = os.fork()
    ok = True
    for i in range(30):                     # parent and child read at the same time
        off = (i * 12288) % (len(data) - d.size)
        ld.read_range(off, d)
        ok &= bool(np.array_equal(d, data[off:off + d.size]))
        ids = np.arange(i % 7, 200, 3, dtype=np.int64)
        rows = np.empty((ids.size, 4096), np.uint8)
        ld.read_rows(4096, 4096, ids, rows)
        ok &= bool(np.array_equal(rows, data[4096:4096 + 4096 * 200].reshape(200, 4096)[ids]))
    if pid == 0:
        ld.close()
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    ld.close()
    print("child", os.waitstatus_to_exitcode(status), "parent", ok)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_used_in_a_forked_child_works_in_both_processes(tmp_path, backend):
    """Before: the child's first multi-request read waited forever for pread workers that do
    not exist after fork(), and a shared io_uring mixed the two processes' completions."""
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_LOADER), str(path), backend],
                           capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{backend}: fork()ed loader hung")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["child", "0", "parent", "True"], (r.stdout, r.stderr)


FORK_GENERATOR = """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import flashrt
    g = flashrt.Generator(sys.argv[1], mode=sys.argv[2], memory_budget="1GB", progress=False)
    want = g.generate("The capital of France is", max_new_tokens=4)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            got = g.generate("The capital of France is", max_new_tokens=4)
            g.close()
            os.write(w, ("same" if got == want else f"differs: {got!r} vs {want!r}").encode())
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}".encode())
        os._exit(0)
    os.close(w)
    again = g.generate("The capital of France is", max_new_tokens=4)
    msg = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    g.close()
    print(msg, "|", again == want)
"""


@pytest.mark.parametrize("mode", ["flash", "naive"])
def test_generator_used_in_a_forked_child(smollm2_dir, mode):
    """gunicorn/multiprocessing fork an application that opened a Generator: the child
    generates the same text, the parent keeps working."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLASHRT_IO="pread")
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_GENERATOR), str(smollm2_dir), mode],
                           capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: a Generator used after fork() hung")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same | True", (r.stdout, r.stderr)


# ---------------------------------------------------------------------------- SIGBUS

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from conftest import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("hard") / "llama")


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


ORACLE_SHRINK = """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import flashrt
    from flashrt.errors import FlashIOError
    d = sys.argv[1]
    g = flashrt.Generator(d, mode="flash", select="oracle", progress=False)
    g.generate("flash", max_new_tokens=2)
    os.truncate(os.path.join(d, "ffn.bin"), 4096)
    try:
        g.generate("f", max_new_tokens=4)  # one token: decode, where the oracle looks first
        print("no error")
    except FlashIOError as e:
        print("FlashIOError", "ffn.bin" in str(e))
"""


def test_oracle_selection_on_a_truncated_bundle_file_is_an_error_not_sigbus(llama_dir, tmp_path):
    """select="oracle" used to memory-map ffn.bin: a truncated file killed the process
    (SIGBUS, exit 135) where select="all" raises FlashIOError."""
    d = copy_model(llama_dir, tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(ORACLE_SHRINK), str(d)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.split() == ["FlashIOError", "True"], r.stdout


CONVERT_SHRINK = """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    from flashrt.convert import convert
    from flashrt.errors import ModelFormatError
    from flashrt.format.writer import ModelWriter
    src, victim, out = sys.argv[1:4]
    add = ModelWriter.add_ffn_layer
    def add_then_shrink(self, layer, bundles):
        add(self, layer, bundles)
        if layer == 0:                   # the source is cut short under the converter
            os.truncate(victim, 4096)
    ModelWriter.add_ffn_layer = add_then_shrink
    try:
        convert(src, out, dtype="float32", progress=False)
        print("converted")
    except ModelFormatError as e:
        print("ModelFormatError", os.path.basename(victim) in str(e) and "shrank" in str(e),
              os.path.exists(out))
"""


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_source_shrinking_during_conversion_is_an_error_not_sigbus(tmp_path, kind):
    """The converters memory-mapped their source (GGUFReader, safe_open): a file cut short
    mid-conversion killed the process with SIGBUS."""
    import shutil

    if kind == "safetensors":
        src = tmp_path / "hf"
        shutil.copytree(ROOT / "tests" / "fixtures" / "hf" / "llama", src)
        victim = src / "model.safetensors"
    else:
        sys.path.insert(0, str(ROOT / "tests" / "convert"))
        from gguf_writer import tiny_hf_llama, write_llama_gguf

        src = victim = tmp_path / "m.gguf"
        write_llama_gguf(src, *tiny_hf_llama())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CONVERT_SHRINK), str(src), str(victim),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.split() == ["ModelFormatError", "True", "False"], (r.stdout, r.stderr[-2000:])


# ---------------------------------------------------------------------------- --overwrite

@pytest.fixture
def hf_src(tmp_path):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(ROOT / "tests" / "fixtures" / "hf" / "llama", src)
    return src


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def convert_quiet(src, out, **kw):
    from flashrt.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(src, out, dtype="float32", progress=False, **kw)


def test_overwrite_never_deletes_a_directory_that_is_not_a_flashrt_model(hf_src, tmp_path):
    from flashrt.format.writer import OutputExistsError

    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "manifest.json").write_text('{"name": "a web app"}')
    (out / "manifest.json").write_text('{"name": "a web app"}')   # not flashrt's manifest
    before = tree(out)
    with pytest.raises(OutputExistsError, match="not a flashrt model"):
        convert_quiet(hf_src, out, overwrite=True)
    assert tree(out) == before
    r = subprocess.run([sys.executable, "-m", "flashrt", "convert", str(hf_src), str(out), "--overwrite", "--quiet"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode != 0 and "not a flashrt model" in r.stderr and "Traceback" not in r.stderr
    assert tree(out) == before
    # a flashrt model directory (and an empty directory) are replaced as asked
    convert_quiet(hf_src, tmp_path / "model")
    convert_quiet(hf_src, tmp_path / "model", overwrite=True)
    (tmp_path / "empty").mkdir()
    convert_quiet(hf_src, tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_output_that_contains_the_source_or_lies_inside_it_is_refused(hf_src, tmp_path):
    """`convert m.gguf <dir of m.gguf> --overwrite` deleted the GGUF."""
    from flashrt.format.writer import OutputExistsError

    sys.path.insert(0, str(ROOT / "tests" / "convert"))
    from gguf_writer import tiny_hf_llama, write_llama_gguf

    gdir = tmp_path / "g"
    gdir.mkdir()
    write_llama_gguf(gdir / "m.gguf", *tiny_hf_llama())
    # even when the source's directory looks like a model (it once held one)
    convert_quiet(hf_src, tmp_path / "tmpmodel")
    for p in (tmp_path / "tmpmodel").iterdir():
        p.rename(gdir / p.name)
    before = tree(gdir)
    with pytest.raises(OutputExistsError, match="source"):
        convert_quiet(gdir / "m.gguf", gdir, overwrite=True)
    assert tree(gdir) == before
    hf_before = tree(hf_src)
    for out in (hf_src / "converted", hf_src):
        with pytest.raises(OutputExistsError, match="source"):
            convert_quiet(hf_src, out, overwrite=True)
    assert tree(hf_src) == hf_before
    assert not any(p.name.startswith("converted") for p in hf_src.iterdir())


# ---------------------------------------------------------------------------- chat templates

def tok_with_template(template: str):
    from conftest import byte_tokenizer_json
    from flashrt.tokenizer import Tokenizer

    return Tokenizer.from_json(byte_tokenizer_json(), {"chat_template": template, "eos_token_ids": []})


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, messages, match", [
    # how real templates reject a system role
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
     "{{ messages[0]['content'] }}", [{"role": "system", "content": "x"}], "System role not supported"),
    ("{% for m in messages %}{{ m['content'] }", USER, "compile"),                 # syntax error
    ("{{ undefined_function(messages) }}", USER, "undefined"),                     # undefined name
    ("{{ messages[0].content.nope.deeper }}", USER, "no attribute 'nope'"),
    ("{{ messages[0]['content'] + 1 }}", USER, "TypeError|unsupported|concatenate"),
    ("{{ messages }}", "hi", "list of"),                                           # malformed messages
    ("{{ messages }}", [], "empty"),
    ("{{ messages }}", ["hi"], r"messages\[0\]"),
    ("{{ messages }}", [{"content": "x"}], "role"),
    ("{{ messages }}", [{"role": "user", "content": 3}], "content"),
    ("{{ messages }}", None, "list of"),
])
def test_chat_template_failures_are_generation_errors(template, messages, match):
    with pytest.raises(GenerationError, match=match):
        tok_with_template(template).apply_chat_template(messages)


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # silent
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}",                        # huge output
])
def test_chat_template_that_would_hang_or_explode_is_stopped(template):
    import time

    t0 = time.monotonic()
    with pytest.raises(GenerationError, match="template"):
        tok_with_template(template).apply_chat_template(USER)
    assert time.monotonic() - t0 < 20


def test_chat_with_a_raising_template_through_the_generator(llama_dir, tmp_path):
    import json

    d = copy_model(llama_dir, tmp_path / "m")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ raise_exception('Conversation roles must alternate') }}"
    cfg_path.write_text(json.dumps(cfg))
    from flashrt.format.writer import register_file

    register_file(d, "tokenizer_config.json")
    with flashrt.Generator(d, progress=False) as g:
        with pytest.raises(GenerationError, match="roles must alternate"):
            g.chat(USER, max_new_tokens=2)
        assert g.generate("ok", max_new_tokens=2) is not None  # the Generator is fine afterwards


# ---------------------------------------------------------------------------- predictors.npz

def random_pset(d, n, n_layers, odd_layer=None, rng=None):
    from flashrt.predictor import LowRankPredictor, PredictorSet

    rng = rng or np.random.default_rng(0)
    preds = []
    for l in range(n_layers):
        nl = n + 8 if l == odd_layer else n
        r = 8
        preds.append(LowRankPredictor("product", rng.standard_normal((r, d)).astype(np.float32),
                                      rng.standard_normal((nl, r)).astype(np.float32), r_gate=4, keep_fraction=0.5))
    return PredictorSet(preds)


def test_predictors_with_a_bad_layer_past_the_first_are_refused_at_open(llama_dir, tmp_path):
    """Only layer 0 was checked: a wrong layer 2 raised IndexError during generation."""
    from flashrt.errors import ModelFormatError
    from flashrt.format.writer import register_file

    d = copy_model(llama_dir, tmp_path / "m")
    random_pset(64, 144, 3, odd_layer=2).save(d)
    register_file(d, "predictors.npz")
    with pytest.raises(ModelFormatError, match="layer 2"):
        with flashrt.Generator(d, mode="flash", select="predictor", progress=False) as g:
            g.generate("hi", max_new_tokens=3)


NPZ_BOMB = """
    import sys, resource
    from flashrt.errors import ModelFormatError
    from flashrt.predictor import PredictorSet
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        PredictorSet.load(sys.argv[1], dim=64, n_neurons=144, n_layers=3)
        print("loaded")
    except ModelFormatError as e:
        print("refused", "allow" in str(e))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_predictors_member_inflating_far_beyond_the_model_dims_is_refused_before_inflating(tmp_path):
    """A small compressed predictors.npz declared a 4 GB member: it was inflated (RSS) before the
    checksum rejected it."""
    import zipfile

    path = tmp_path / "predictors.npz"
    pset = random_pset(64, 144, 3)
    pset.predictors[0].bias_gate = None  # a member less, so the bomb below does not add to the count
    pset.save(path)
    big = 400 << 20
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("l0.bias_gate2.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (big // 4,)}
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(1 << 20)
            for _ in range(big >> 20):
                f.write(zeros)
    assert path.stat().st_size < 3 << 20
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(NPZ_BOMB), str(path)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    verdict, grew_mb = r.stdout.split("\n")[0], int(r.stdout.split("\n")[1])
    assert verdict == "refused True", r.stdout
    assert grew_mb < 50, f"peak RSS grew by {grew_mb} MB while refusing the file"


# ---------------------------------------------------------------------------- disk full

def run_on_small_tmpfs(mount_dir: Path, size: str, argv: list) -> subprocess.CompletedProcess:
    """argv with a `size` tmpfs mounted at mount_dir in a private mount namespace (gone when
    the child exits); skips where mount namespaces are not allowed."""
    import shlex
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here to mount a small file system")
    mount_dir.mkdir(parents=True, exist_ok=True)
    cmd = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount_dir))} && exec {shlex.join(argv)}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for flags in (["-m"], ["-rm"]):
        r = subprocess.run(["unshare", *flags, "sh", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
        if "mount" not in r.stderr[:300] and "unshare" not in r.stderr[:300]:
            return r
    pytest.skip(f"cannot mount a small tmpfs in a mount namespace here: {r.stderr.strip()[:200]}")


@pytest.mark.parametrize("size, victim", [("64k", "ffn.bin"), ("400k", "resident.safetensors")])
def test_disk_full_during_conversion_is_one_line_naming_the_file(hf_src, tmp_path, size, victim):
    """A full disk gave a SafetensorError traceback for resident.safetensors."""
    from conftest import byte_tokenizer_json

    (hf_src / "tokenizer.json").write_text(byte_tokenizer_json())
    mnt = tmp_path / "small"
    r = run_on_small_tmpfs(mnt, size, [sys.executable, "-m", "flashrt", "convert", str(hf_src), str(mnt / "out"),
                                       "--dtype", "float32", "--quiet"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"out/{victim}" in lines[0] and "No space left" in lines[0], lines[0]
    code = ("import sys, os\nfrom flashrt.convert import convert\nfrom flashrt.errors import DiskFullError\n"
            "try:\n    convert(sys.argv[1], sys.argv[2] + '/out', dtype='float32', progress=False)\n"
            "except DiskFullError as e:\n    print('DiskFullError', e.errno, os.listdir(sys.argv[2]))\n")
    r = run_on_small_tmpfs(mnt, size, [sys.executable, "-W", "ignore", "-c", code, str(hf_src), str(mnt)])
    assert r.stdout.split() == ["DiskFullError", "28", "[]"], (r.stdout, r.stderr[-1500:])  # and nothing left


# ---------------------------------------------------------------------------- the CLI

def test_cli_internal_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from flashrt import cli

    def broken(args):
        raise KeyError("layer.17\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", broken)
    monkeypatch.delenv("FLASHRT_DEBUG", raising=False)
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flashrt: internal error: KeyError:"), err
    assert "layer.17" in err and "FLASHRT_DEBUG=1" in err
    monkeypatch.setenv("FLASHRT_DEBUG", "1")
    with pytest.raises(KeyError):  # the traceback, for a bug report
        cli.main(["info"])


# ---------------------------------------------------------------------------- calibrate

def test_calibrate_checks_it_can_write_the_model_dir_before_the_slow_part(llama_dir, tmp_path):
    """On a read-only model directory calibrate recorded and fitted first, then failed saving."""
    d = copy_model(llama_dir, tmp_path / "m")
    before = tree(d)
    code = ("import sys, importlib\nc = importlib.import_module('flashrt.calibration')\n"
            "from flashrt.errors import FlashrtError\n"
            "import flashrt.calibration as r; r.RecordingFFN = None\n"  # the slow part must not even start
            "try:\n    c.calibrate(sys.argv[1], n_tokens=64, progress=False)\n"
            "except FlashrtError as e:\n    print('refused:', e)\n")
    mnt = str(d)
    import shlex

    cmd = (f"mount --bind {shlex.quote(mnt)} {shlex.quote(mnt)} && mount -o remount,bind,ro {shlex.quote(mnt)} && "
           f"exec {shlex.join([sys.executable, '-W', 'ignore', '-c', code, mnt])}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = None
    for flags in (["-m"], ["-rm"]):
        r = subprocess.run(["unshare", *flags, "sh", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
        if r.stdout or "Traceback" in r.stderr:
            break
    else:
        pytest.skip(f"cannot make a read-only bind mount here: {r.stderr.strip()[:200]}")
    assert r.stdout.startswith("refused:") and "cannot write the predictors" in r.stdout, (r.stdout, r.stderr[-1500:])
    assert tree(d) == before


# ---------------------------------------------------------------------------- lifetime

@pytest.mark.parametrize("mode", ["dense", "flash", "naive"])
def test_generator_dropped_without_close_is_freed_at_once(llama_dir, mode):
    """A reference cycle (the model's `lin` closure held the Generator) kept every dropped
    Generator -- ~50 MB and its descriptors for SmolLM2 -- alive until the cyclic GC ran."""
    import gc
    import weakref

    fds = len(os.listdir("/proc/self/fd"))
    gc.collect()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = flashrt.Generator(llama_dir, mode=mode, memory_budget=None if mode == "dense" else "1GB", progress=False)
        g.generate("hi", max_new_tokens=2)
        "".join(g.stream("hi", max_new_tokens=2))
        refs = [weakref.ref(g), weakref.ref(g.model), weakref.ref(g.kv)]
        del g
        assert [r() is None for r in refs] == [True] * 3
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        gc.enable()


# ---------------------------------------------------------------------------- configs

@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 0), ("num_hidden_layers", -1), ("num_hidden_layers", 3.0),
    ("num_hidden_layers", 10 ** 9),                      # used to hang building 10**9 tensor names
    ("num_key_value_heads", 0),                          # ZeroDivisionError
    ("sliding_window", "4096"), ("eos_token_id", ["a"]), ("num_attention_heads", ["a"]),
    ("rms_norm_eps", -1e-5), ("rope_theta", 0),
])
def test_hostile_hf_config_values_are_refused_naming_the_field(hf_src, tmp_path, field, value):
    import json
    import time

    from flashrt.errors import ModelFormatError

    cfg = json.loads((hf_src / "config.json").read_text())
    cfg[field] = value
    if field == "sliding_window":
        cfg["model_type"] = "mistral"
    (hf_src / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ModelFormatError, match=field):
        convert_quiet(hf_src, tmp_path / "out")
    assert time.monotonic() - t0 < 10 and not (tmp_path / "out").exists()


def test_config_that_is_a_json_list_is_refused(hf_src, tmp_path):
    import json

    from flashrt.errors import ModelFormatError

    (hf_src / "config.json").write_text(json.dumps([json.loads((hf_src / "config.json").read_text())]))
    with pytest.raises(ModelFormatError, match="JSON object"):
        convert_quiet(hf_src, tmp_path / "out")


@pytest.mark.parametrize("key, value", [("llama.attention.head_count", 0), ("llama.block_count", 0),
                                        ("llama.block_count", 10 ** 9), ("llama.attention.head_count_kv", 0)])
def test_hostile_gguf_metadata_is_refused_naming_the_key(tmp_path, key, value):
    import gguf

    from flashrt.errors import ModelFormatError

    sys.path.insert(0, str(ROOT / "tests" / "convert"))
    from gguf_writer import tiny_hf_llama, write_llama_gguf

    p = tmp_path / "m.gguf"
    write_llama_gguf(p, *tiny_hf_llama())
    r = gguf.GGUFReader(str(p), "r+")
    f = r.fields[key]
    f.parts[f.data[0]][0] = value
    del r, f
    short = key.split(".")[-1]
    with pytest.raises(ModelFormatError, match=f"{short}|num_hidden_layers|num_key_value_heads|num_attention_heads"):
        convert_quiet(p, tmp_path / "out")


@pytest.mark.parametrize("field, value", [("rms_norm_eps", -1e-5), ("rope_theta", 0.0), ("num_key_value_heads", 0)])
def test_bad_config_in_a_model_directory_is_a_config_error_at_open(llama_dir, tmp_path, field, value):
    """A manifest whose config is wrong but whose checksum matches (a buggy writer): rms_norm_eps < 0
    or rope_theta = 0 gave non-finite logits reported as corrupt weights."""
    import json

    from flashrt.errors import ModelFormatError
    from flashrt.format import manifest as manifest_mod

    d = copy_model(llama_dir, tmp_path / "m")
    man = json.loads((d / "manifest.json").read_text())
    man["config"][field] = value
    man["checksum"] = manifest_mod.manifest_checksum(man)
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelFormatError, match=field) as e:
        with flashrt.Generator(d, progress=False) as g:
            g.generate("hi", max_new_tokens=2)
    assert "corrupt" not in str(e.value)


# ---------------------------------------------------------------------------- budget accounting

@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_predictors_are_counted_at_their_in_ram_size_not_the_file_size(llama_dir, tmp_path, dtype):
    """The planner charges what the loaded predictors hold: their factors as stored (no
    float32 working copies), the same bytes as the arrays in predictors.npz."""
    from flashrt.format.writer import register_file
    from flashrt.predictor import PredictorSet
    from flashrt.predictor.store import predictor_ram_bytes

    d = copy_model(llama_dir, tmp_path / "m")
    pset = random_pset(64, 144, 3)
    for p in pset.predictors:
        p.__init__("product", p.A.astype(dtype), p.B.astype(dtype), r_gate=4, keep_fraction=0.5)
    pset.save(d)
    register_file(d, "predictors.npz")
    loaded = PredictorSet.load(d, 64, 144, 3)
    held = sum(a.nbytes for p in loaded.predictors
               for a in {id(x): x for x in (p.A, p._B, p.bias, p.bias_gate, p._Bg, p._Bu)
                         if x is not None}.values())
    assert loaded.nbytes == held
    assert predictor_ram_bytes(d / "predictors.npz", 64, 144) == held
    with flashrt.Generator(d, mode="flash", select="predictor", memory_budget="1GB", progress=False) as g:
        assert g.plan.predictor_bytes == held
    with np.load(d / "predictors.npz") as z:
        assert held == sum(z[k].nbytes for k in z.files if k != "header")
    assert all(p.A.dtype == dtype and p._Bg.dtype == dtype for p in loaded.predictors)


LONG_PROMPT_RSS = """
    import re, sys, json, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import flashrt, flashrt.api, flashrt.tokenizer, flashrt.format.reader, flashrt.models, jinja2
    from flashrt.errors import BudgetError
    from flashrt.format import ModelFiles

    def status(k):
        return int(re.search(k + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    path, which, mode, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if which == "min":
        try:
            flashrt.Generator(path, mode=mode, memory_budget="1MB", max_context=ctx, progress=False)
        except BudgetError as e:
            budget = int(float(re.search(r"needs at least ([\\d.]+) MB", str(e)).group(1)) * 1e6) + 200_000
    else:
        with ModelFiles.open(path) as f:
            budget = int(float(which) * (f.resident_bytes + f.ffn_bytes))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    g = flashrt.Generator(path, mode=mode, memory_budget=budget, max_context=ctx, progress=False)
    ids = g.tokenizer.encode(" ".join(["word"] * (2 * g.max_context)))[: g.max_context - 2]  # fills the context
    g.generate(g.tokenizer.decode(ids), max_new_tokens=2)
    print(json.dumps(dict(budget=budget, peak=status("VmHWM") - base, n_prompt=len(ids), ctx=g.max_context)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("which, mode, ctx", [("min", "flash", 256), ("1.0", "flash", 256), ("min", "naive", 256),
                                             ("min", "flash", 2048)])
def test_peak_rss_stays_under_the_budget_for_a_context_filling_prompt(smollm2_dir, which, mode, ctx):
    """Prefill computed logits for every prompt token: at the minimum flash budget a 250-token
    prompt peaked 25 MB over, a 2000-token one (max_context=2048) 217 MB over. Fresh process;
    peak = VmHWM - VmRSS before opening."""
    import json

    r = subprocess.run([sys.executable, "-c", textwrap.dedent(LONG_PROMPT_RSS), str(smollm2_dir), which, mode, str(ctx)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{which} budget, {mode}, context {ctx}: {out}")
    assert out["n_prompt"] >= out["ctx"] - 2 > 0
    assert out["peak"] <= out["budget"], out
