"""Converters into the flashrt model directory: Hugging Face safetensors and GGUF."""
from __future__ import annotations

import sys
import types
from pathlib import Path

from ..errors import ModelFormatError
from .gguf import convert_gguf
from .hf import convert_hf

__all__ = ["convert", "convert_hf", "convert_gguf"]


def convert(src, out, dtype=None, overwrite=False, progress=True) -> Path:
    """Convert `src` (an HF model directory or a .gguf file) into the model directory `out`.

    dtype: the storage type, float32 | float16 | q8_0 | q4_0 | q4_1; None: a GGUF's own type
    (flashrt.convert.gguf), float16 for a Hugging Face checkpoint.
    """
    src = Path(src)
    if src.is_dir():
        return convert_hf(src, out, dtype=dtype or "float16", overwrite=overwrite, progress=progress)
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return convert_gguf(src, out, dtype=dtype, overwrite=overwrite, progress=progress)
        raise ModelFormatError(f"{src}: not a GGUF file (bad magic {magic!r}); pass a .gguf "
                               f"file or a Hugging Face model directory")
    raise ModelFormatError(f"{src}: no such file or directory")


class _CallableModule(types.ModuleType):
    """`flashrt.convert` is both this package and the function: importing the package binds the
    name on `flashrt` to the module (the import system does that after the function was bound),
    so the module itself must be callable for `flashrt.convert(src, out)` to keep working."""

    def __call__(self, *args, **kwargs) -> Path:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
