"""Open and check a flashrt model directory.

`ModelFiles.open(path)` checks the magic, format version, required fields, every
listed file's size and head hash (first + last MiB), and the FFN layout; anything
wrong raises ModelFormatError naming the file. `verify(full=True)` re-hashes every
byte against the hashes stored at conversion time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FlashIOError, ModelFormatError
from ..quant import QMatrix
from .manifest import (
    MANIFEST_NAME,
    REDO,
    RESIDENT_NAME,
    TOKENIZER_NAME,
    QUANT_DTYPES,
    Manifest,
    full_hash,
    head_hash,
)


class ModelFiles:
    """A checked model directory. Holds no open files."""

    def __init__(self, path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "ModelFiles":
        path = Path(path)
        mpath = path / MANIFEST_NAME
        if not path.is_dir():
            raise ModelFormatError(
                f"{path}: no such model directory; create one with `flashrt convert`")
        if not mpath.is_file():
            raise ModelFormatError(
                f"{path}: not a flashrt model directory (no {MANIFEST_NAME}); "
                f"create it with `flashrt convert` (an interrupted conversion leaves none)")
        try:
            text = mpath.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{mpath}: cannot read the manifest ({e}); {REDO}") from e
        manifest = Manifest.from_json(text, mpath)
        self = cls(path, manifest)
        self._check_files()
        manifest.check_checksum(mpath)
        return self

    def _check_files(self) -> None:
        for name, info in self.manifest.files.items():
            p = self.path / name
            if not p.is_file():
                raise ModelFormatError(f"{p}: file is missing; {REDO}")
            size = p.stat().st_size
            if size != info["bytes"]:
                what = "truncated" if size < info["bytes"] else "longer than recorded"
                raise ModelFormatError(
                    f"{p}: file is {what} ({size} bytes, manifest says {info['bytes']}); {REDO}")
            try:
                digest = head_hash(p)
            except OSError as e:
                raise FlashIOError(e.errno, f"{p}: cannot read the file ({e.strerror})") from e
            if digest != info["head_hash"]:
                raise ModelFormatError(
                    f"{p}: contents do not match the manifest (head hash differs; "
                    f"the file is corrupt or was replaced); {REDO}")

    def verify(self, full: bool = True) -> None:
        """Re-check sizes and head hashes; with full=True also hash every byte of every file."""
        self._check_files()
        if not full:
            return
        for name, info in self.manifest.files.items():
            p = self.path / name
            if "hash" not in info:
                raise ModelFormatError(f"{p}: the manifest stores no full hash; {REDO}")
            if full_hash(p) != info["hash"]:
                raise ModelFormatError(f"{p}: contents are corrupt (full hash differs); {REDO}")

    # -- lifetime (nothing is held open; a context manager for symmetry) -------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass

    # -- metadata --------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest.config

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    @property
    def storage(self) -> str:
        """The FFN bundles' storage type: float16 | float32 | q8_0 | q4_0 | q4_1."""
        return self.manifest.dtype

    @property
    def qtype(self):
        """The bundles' quantized type, or None for float bundles (the kernels' `qtype=`)."""
        return self.manifest.dtype if self.manifest.dtype in QUANT_DTYPES else None

    @property
    def down_qtype(self):
        """The quantized type of the bundles' down parts (may differ from qtype: a GGUF's 4-bit
        gate/up blocks with a q8_0 down column), or None for float bundles."""
        return self.manifest.ffn.get("down_dtype", self.qtype) if self.qtype else None

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of bundle rows: the float type, or uint8 for quantized blocks."""
        return np.dtype(np.uint8 if self.qtype else self.manifest.dtype).newbyteorder("<")

    @property
    def n_layers(self) -> int:
        return self.manifest.n_layers

    # -- resident tensors ------------------------------------------------------------
    @property
    def resident_path(self) -> Path:
        return self.path / RESIDENT_NAME

    @property
    def resident_bytes(self) -> int:
        """RAM the resident tensors take once loaded (their data bytes, header excluded)."""
        p = self.resident_path
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        size = self.manifest.files[RESIDENT_NAME]["bytes"]
        if not 0 < n <= size - 8:
            raise ModelFormatError(f"{p}: bad safetensors header length {n}; {REDO}")
        return size - 8 - n

    def load_resident(self) -> dict:
        """Every non-FFN tensor, {HF name: array} owned in RAM (2-D float16/float32 arrays or
        QMatrix for the quantized ones the manifest's tensor_dtypes lists, 1-D float32).

        Each tensor is read straight into its own array (no whole-file buffer, no mmap), so
        opening a model never holds more than the tensors themselves: the memory budget counts
        on it. The file is safetensors; its header is parsed with the safetensors rules.
        """
        p = self.resident_path
        dtypes = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "U8": np.dtype("u1")}
        try:
            with open(p, "rb") as f:
                n_header = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n_header))
                base = 8 + n_header
                size = os.fstat(f.fileno()).st_size
                tensors = {}
                # in file order, so that the readahead past each tensor is the next one's (dropped below)
                items = [(k, v) for k, v in header.items() if k != "__metadata__"]
                items.sort(key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0)
                for name, info in items:
                    dtype = dtypes.get(info.get("dtype"))
                    shape = tuple(info["shape"])
                    begin, end = info["data_offsets"]
                    if dtype is None:
                        raise ModelFormatError(f"{p}: tensor {name!r} has dtype {info.get('dtype')}; {REDO}")
                    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if end - begin != n_bytes or base + end > size or begin < 0:
                        raise ModelFormatError(f"{p}: tensor {name!r} has bad offsets {begin}..{end}; {REDO}")
                    a = np.empty(shape, dtype)
                    f.seek(base + begin)
                    if f.readinto(memoryview(a).cast("B")) != n_bytes:
                        raise ModelFormatError(f"{p}: tensor {name!r} is truncated; {REDO}")
                    # the copy is ours now: drop the page cache's, which would count against the budget too
                    os.posix_fadvise(f.fileno(), base + begin, n_bytes, os.POSIX_FADV_DONTNEED)
                    tensors[name] = a
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # partial pages at the seams
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, ModelFormatError):
                raise
            raise ModelFormatError(f"{p}: cannot read the resident tensors ({e}); {REDO}") from e
        quantized = self.manifest.tensor_dtypes
        float_2d = np.dtype("<f2") if self.qtype else self.dtype
        for name, a in tensors.items():
            want = (np.dtype("u1") if name in quantized else float_2d) if a.ndim >= 2 else np.dtype("<f4")
            if a.dtype != want:
                raise ModelFormatError(
                    f"{p}: tensor {name!r} is {a.dtype}, expected {want.name}; {REDO}")
            if name in quantized:
                try:
                    tensors[name] = QMatrix(a, quantized[name])
                except ValueError as e:
                    raise ModelFormatError(f"{p}: tensor {name!r}: {e}; {REDO}") from None
        missing = sorted(set(quantized) - set(tensors))
        if missing:
            raise ModelFormatError(f"{p}: the manifest lists quantized tensors {missing} the "
                                   f"file lacks; {REDO}")
        return tensors

    def check_resident(self, weights: dict, expected: dict) -> None:
        """ModelFormatError unless `weights` holds every tensor of `expected` {name: shape}
        (the family's table for the manifest's config) with that shape."""
        p = self.resident_path
        for name, shape in expected.items():
            if name not in weights:
                raise ModelFormatError(f"{p}: tensor {name!r} is missing; {REDO}")
            if tuple(weights[name].shape) != tuple(shape):
                raise ModelFormatError(
                    f"{p}: tensor {name!r} has shape {tuple(weights[name].shape)}, the "
                    f"manifest's config implies {tuple(shape)}; {REDO}")

    # -- FFN bundles -----------------------------------------------------------------
    @property
    def ffn_path(self) -> Path:
        return self.path / self.manifest.ffn["file"]

    @property
    def ffn_parts(self) -> tuple:
        return tuple(self.manifest.ffn["parts"])

    @property
    def n_neurons(self) -> int:
        return self.manifest.ffn["n_neurons"]

    @property
    def dim(self) -> int:
        return self.manifest.ffn["dim"]

    @property
    def ffn_row_bytes(self) -> int:
        return self.manifest.ffn["row_bytes"]

    @property
    def ffn_row_elems(self) -> int:
        return len(self.ffn_parts) * self.dim

    @property
    def ffn_layer_bytes(self) -> int:
        return self.n_neurons * self.ffn_row_bytes

    @property
    def ffn_bytes(self) -> int:
        """RAM all layers' bundles take (n_layers * n_neurons * row_bytes, no padding)."""
        return self.n_layers * self.ffn_layer_bytes

    def ffn_layer_offset(self, layer: int) -> int:
        offsets = self.manifest.ffn["layer_offsets"]
        if not 0 <= layer < len(offsets):
            raise IndexError(f"layer {layer} out of range (model has {len(offsets)} layers)")
        return offsets[layer]

    def read_ffn_layer(self, layer: int) -> np.ndarray:
        """Layer `layer`'s bundles, (n_neurons, n_parts * dim) in the model dtype, or
        (n_neurons, row_bytes) uint8 blocks for quantized storage (plain read)."""
        offset = self.ffn_layer_offset(layer)
        row_elems = self.ffn_row_bytes // self.dtype.itemsize
        count = self.n_neurons * row_elems
        a = np.fromfile(self.ffn_path, dtype=self.dtype, count=count, offset=offset)
        if a.size != count:
            raise ModelFormatError(f"{self.ffn_path}: layer {layer} is truncated; {REDO}")
        return a.reshape(self.n_neurons, row_elems)  # (n_neurons, n_parts * dim) or row bytes

    # -- tokenizer -------------------------------------------------------------------
    @property
    def tokenizer_dir(self):
        """The directory holding tokenizer.json (this one), or None when there is none."""
        return self.path if (self.path / TOKENIZER_NAME).is_file() else None

    def __repr__(self):
        return (f"ModelFiles({os.fspath(self.path)!r}, {self.architecture}, "
                f"{self.n_layers} layers, {self.manifest.dtype})")
