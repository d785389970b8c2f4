"""Write a flashrt model directory.

    with ModelWriter(out_dir, "llama", config, "float16") as w:
        w.add_resident("model.embed_tokens.weight", embed)      # any order
        for l in range(n_layers):
            w.add_ffn_layer(l, bundles)                          # layers in order
        w.add_tokenizer(tokenizer_json, tokenizer_config)
        w.commit()

`dtype` is a storage type (flashrt/quant.py): float16 | float32, or q8_0 | q4_0 | q4_1, which
quantizes the FFN bundles (each part in blocks of 32) and every 2-D resident tensor whose rows
are a whole number of blocks (the others stay float16). A `QMatrix` passed to add_resident
is stored as is (its own type, bit for bit), and uint8 bundles of the model's type are
written as they are (a GGUF's blocks).

Everything goes to `<out_dir>.tmp-<pid>` and is renamed into place by `commit()`
(also called on a clean exit from the `with`); an exception inside the `with`
removes the temp dir, so an interrupted conversion never leaves a valid-looking
model behind.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..errors import DiskFullError, ModelFormatError
from ..procs import pid_alive
from ..models import FAMILIES, parts_for
from ..quant import QMatrix, fits, is_quantized, quantize
from .manifest import (
    ALIGNMENT,
    DTYPES,
    FFN_NAME,
    MAGIC,
    MANIFEST_NAME,
    RESIDENT_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    Manifest,
    _blake2b,
    head_hash,
    full_hash,
    storage_row_bytes,
)


class OutputExistsError(ModelFormatError, FileExistsError):
    """The output directory exists and overwrite was not asked for."""


def _version() -> str:
    try:
        return version("flashrt")
    except Exception:  # not installed (running from a source tree)
        return "0.1.0"



def _is_flashrt_model_dir(path: Path) -> bool:
    """True for a directory that holds a flashrt manifest (even a damaged one), or nothing."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        with open(path / MANIFEST_NAME, "rb") as f:
            return f'"{MAGIC}"'.encode() in f.read(1 << 20)
    except OSError:
        return False


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under b (symlinks resolved)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def _writing(path):
    """A full disk (or quota, or file-size limit) while writing `path` -> one DiskFullError line."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise _disk_full(path, e.errno) from None
    except Exception as e:  # safetensors reports I/O failures as SafetensorError
        codes = [n for n in _FULL if f"os error {n})" in str(e)]
        if type(e).__name__ != "SafetensorError" or not codes:
            raise
        raise _disk_full(path, codes[0]) from None


def _disk_full(path, err: int) -> DiskFullError:
    return DiskFullError(err, f"{path}: {os.strerror(err)} while writing the model; free some space "
                              f"(or choose another output directory) and run again")


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ModelWriter:
    """Builds a model directory in a temp dir, then renames it into place."""

    def __init__(self, out_dir, architecture: str, config: dict, dtype="float16",
                 overwrite: bool = False, source: dict | None = None,
                 alignment: int = ALIGNMENT, down_dtype: str | None = None):
        if architecture not in FAMILIES:
            raise ValueError(f"architecture must be one of {sorted(FAMILIES)}, got {architecture!r}")
        dtype = dtype if isinstance(dtype, str) and is_quantized(dtype) else np.dtype(dtype).name
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.out_dir = Path(os.path.abspath(out_dir))
        self.architecture = architecture
        self.config = dict(config)
        self.storage = dtype                       # the storage type's name
        self.quantized = is_quantized(dtype)
        # array dtype of bundle rows (uint8 blocks when quantized) and of float resident tensors
        self.dtype = np.dtype(np.uint8 if self.quantized else dtype).newbyteorder("<")
        self.float_dtype = np.dtype("<f2") if self.quantized else self.dtype
        # the bundles' down parts: the storage type, or another quantized type
        self.down_storage = down_dtype or dtype
        if self.down_storage != dtype and not (self.quantized and is_quantized(self.down_storage)):
            raise ValueError(f"down_dtype must be a quantized type in a quantized model, got "
                             f"{down_dtype!r} for dtype {dtype!r}")
        self._tensor_dtypes: dict[str, str] = {}
        self.overwrite = overwrite
        self.source = dict(source or {})
        self.alignment = alignment
        self.parts = parts_for(architecture)
        self._check_output()

        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_dirs()
        self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.tmp-{os.getpid()}")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir()
        self._resident: dict[str, np.ndarray] = {}
        self._ffn_file = open(self.tmp_dir / FFN_NAME, "wb")
        self._ffn_hash = _blake2b()
        self._ffn_pos = 0
        self._offsets: list[int] = []
        self._n_neurons = None
        self._dim = None
        self._tokenizer = None
        self._done = False  # committed or aborted

    # -- context manager -------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        return False

    def abort(self) -> None:
        """Remove the temp dir; nothing is left behind."""
        if not self._ffn_file.closed:
            try:
                self._ffn_file.close()
            except OSError:  # the unflushed tail hits the same full disk
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True

    # -- adding content --------------------------------------------------------------
    def add_resident(self, name: str, array) -> None:
        """A non-FFN tensor under its HF name: 2-D in the model dtype, 1-D as float32."""
        self._check_open()
        if name in self._resident:
            raise ValueError(f"resident tensor {name!r} added twice")
        if isinstance(array, QMatrix):                 # already blocks: stored bit for bit
            self._resident[name] = np.ascontiguousarray(array.data)
            self._tensor_dtypes[name] = array.qtype
            return
        array = np.asarray(array)
        keep_float = name.endswith(getattr(FAMILIES[self.architecture], "FLOAT_TENSORS", ()))
        if self.quantized and array.ndim == 2 and fits(self.storage, array.shape[1]) and not keep_float:
            self._check_finite(array, array, f"resident tensor {name!r}")
            self._resident[name] = quantize(array, self.storage)
            self._tensor_dtypes[name] = self.storage
            return
        dtype = self.float_dtype if array.ndim >= 2 else np.dtype("<f4")
        with np.errstate(over="ignore"):  # overflow is reported by _check_finite
            out = np.ascontiguousarray(array, dtype=dtype)
        self._check_finite(out, array, f"resident tensor {name!r}")
        self._resident[name] = out

    def add_ffn_layer(self, layer: int, bundles) -> None:
        """Layer `layer`'s bundle matrix (n_neurons, n_parts * dim) of floats, or for a quantized
        model its rows as uint8 blocks (n_neurons, n_parts * row_bytes); layers in order 0, 1, ..."""
        self._check_open()
        if layer != len(self._offsets):
            raise ValueError(f"FFN layers must be added in order: expected layer "
                             f"{len(self._offsets)}, got {layer}")
        bundles = np.asarray(bundles)
        n_parts = len(self.parts)
        blocks = self.quantized and bundles.dtype == np.uint8
        if bundles.ndim != 2 or (bundles.shape[1] % n_parts and not blocks):
            raise ValueError(f"layer {layer}: bundles must be (n_neurons, {n_parts} * dim), "
                             f"got {bundles.shape}")
        n, dim = bundles.shape[0], bundles.shape[1] // n_parts
        if blocks:                                              # quantized rows already
            per_32 = (n_parts - 1) * storage_row_bytes(self.storage, 32) + storage_row_bytes(self.down_storage, 32)
            dim = bundles.shape[1] // per_32 * 32
            if bundles.shape[1] != self._row_bytes_for(dim):
                raise ValueError(f"layer {layer}: {bundles.shape[1]} bytes per row is not "
                                 f"{n_parts} parts of {self.storage} blocks")
        elif self.quantized:
            if not fits(self.storage, dim):
                raise ModelFormatError(
                    f"{self.storage} storage needs the FFN dim (hidden_size) to be a multiple "
                    f"of 32, this model's is {dim}; convert with --dtype float16")
            self._check_finite(bundles, bundles, f"FFN layer {layer}")
            head = (n_parts - 1) * dim
            bundles = np.concatenate(
                [quantize(bundles[:, :head].reshape(n, n_parts - 1, dim), self.storage).reshape(n, -1),
                 quantize(bundles[:, head:], self.down_storage)], axis=1)
        if self._n_neurons is None:
            self._n_neurons, self._dim = n, dim
        elif (n, dim) != (self._n_neurons, self._dim):
            raise ValueError(f"layer {layer}: bundles {bundles.shape} differ from layer 0's "
                             f"({self._n_neurons}, {n_parts * self._dim})")
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(bundles, dtype=self.dtype)  # (n_neurons, n_parts * dim)
        self._check_finite(out, bundles, f"FFN layer {layer}")
        self._pad_ffn()
        self._offsets.append(self._ffn_pos)
        with _writing(self.out_dir / FFN_NAME):
            self._write_ffn(memoryview(out).cast("B"))

    def add_tokenizer(self, tokenizer_json: str, tokenizer_config: dict) -> None:
        """tokenizer.json (HF tokenizers JSON text) and tokenizer_config.json (a dict)."""
        self._check_open()
        if not isinstance(tokenizer_json, str):
            raise TypeError("tokenizer_json must be the JSON text (str)")
        self._tokenizer = (tokenizer_json, dict(tokenizer_config))

    # -- commit ----------------------------------------------------------------------
    def commit(self) -> Path:
        """Finish the files, write the manifest last, and rename the directory into place."""
        self._check_open()
        n_layers = self.config.get("num_hidden_layers")
        if len(self._offsets) != n_layers:
            raise ValueError(f"{len(self._offsets)} FFN layers written; config says "
                             f"num_hidden_layers={n_layers}")
        if not self._resident:
            raise ValueError("no resident tensors were added")
        with _writing(self.out_dir / FFN_NAME):
            self._pad_ffn()
            self._ffn_file.flush()
            os.fsync(self._ffn_file.fileno())
            self._ffn_file.close()

        with _writing(self.out_dir / RESIDENT_NAME):
            save_file(self._resident, str(self.tmp_dir / RESIDENT_NAME),
                      metadata={"format": "flashrt", "dtype": self.storage})
        self._resident = {}
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_dir / RESIDENT_NAME, 0o666 & ~umask)  # save_file creates it 0600
        names = [RESIDENT_NAME]
        if self._tokenizer is not None:
            text, cfg = self._tokenizer
            with _writing(self.out_dir / TOKENIZER_NAME):
                (self.tmp_dir / TOKENIZER_NAME).write_text(text, encoding="utf-8")
            with _writing(self.out_dir / TOKENIZER_CONFIG_NAME):
                (self.tmp_dir / TOKENIZER_CONFIG_NAME).write_text(
                    json.dumps(cfg, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            names += [TOKENIZER_NAME, TOKENIZER_CONFIG_NAME]

        files = {}
        for name in names:
            p = self.tmp_dir / name
            files[name] = {"bytes": p.stat().st_size, "head_hash": head_hash(p),
                           "hash": full_hash(p)}
        p = self.tmp_dir / FFN_NAME
        files[FFN_NAME] = {"bytes": p.stat().st_size, "head_hash": head_hash(p),
                           "hash": self._ffn_hash.hexdigest()}
        manifest = Manifest(
            architecture=self.architecture,
            config=self.config,
            dtype=self.storage,
            tensor_dtypes=dict(self._tensor_dtypes),
            ffn={"file": FFN_NAME, "parts": list(self.parts), "n_neurons": self._n_neurons,
                 "dim": self._dim, "row_bytes": self._n_row_bytes(),
                 "alignment": self.alignment, "layer_offsets": list(self._offsets),
                 "file_bytes": self._ffn_pos,
                 **({"down_dtype": self.down_storage} if self.down_storage != self.storage else {})},
            files=files,
            source=self.source,
            created_by=f"flashrt {_version()}",
        )
        manifest.validate(self.tmp_dir / MANIFEST_NAME)
        with _writing(self.out_dir / MANIFEST_NAME), open(self.tmp_dir / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp_dir)
        self._move_into_place()
        self._done = True
        return self.out_dir

    # -- internals -------------------------------------------------------------------
    def _check_open(self):
        if self._done:
            raise ValueError("ModelWriter is already committed or aborted")

    def _check_output(self):
        src = self.source.get("path")
        if src and (_inside(src, self.out_dir) or _inside(self.out_dir, src)):
            raise OutputExistsError(
                f"{self.out_dir}: the output must not contain the source {src} nor lie inside it "
                f"(replacing it would delete the source); choose an output path elsewhere")
        if os.path.lexists(self.out_dir) and not self.overwrite:
            raise OutputExistsError(
                f"{self.out_dir} already exists; choose another output path or pass "
                f"overwrite=True (--overwrite) to replace it")
        if os.path.lexists(self.out_dir) and not self.out_dir.is_dir():
            raise OutputExistsError(f"{self.out_dir} exists and is not a directory; "
                                    f"remove it or choose another output path")
        if os.path.lexists(self.out_dir) and not _is_flashrt_model_dir(self.out_dir):
            raise OutputExistsError(
                f"{self.out_dir} exists and is not a flashrt model directory (no flashrt "
                f"{MANIFEST_NAME}); --overwrite only replaces flashrt models: remove it yourself "
                f"or choose another output path")

    def _remove_stale_temp_dirs(self):
        """Remove the temp dirs of dead processes converting to the same output, and their
        `.old-PID` dirs: one whose output is missing (killed between the two renames of a
        replacement) is the previous model, and is put back first."""
        for kind in ("tmp", "old"):
            prefix = f"{self.out_dir.name}.{kind}-"
            for p in self.out_dir.parent.glob(prefix + "*"):
                pid = p.name[len(prefix):]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    if kind == "old" and not os.path.lexists(self.out_dir):
                        os.rename(p, self.out_dir)
                    else:
                        shutil.rmtree(p, ignore_errors=True)

    def _check_finite(self, out, src, what):
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            if np.isfinite(src).all():
                raise ModelFormatError(
                    f"{what} overflows {self.dtype.name} (values up to "
                    f"{float(np.abs(src).max()):.3g}); convert with dtype='float32'")
            raise ModelFormatError(f"{what} contains NaN or infinite values in the source "
                                   f"checkpoint; the checkpoint is corrupt")

    def _n_row_bytes(self) -> int:
        if self._dim is None:
            raise ValueError("no FFN layers were added")
        return self._row_bytes_for(self._dim)

    def _row_bytes_for(self, dim: int) -> int:
        return ((len(self.parts) - 1) * storage_row_bytes(self.storage, dim)
                + storage_row_bytes(self.down_storage, dim))

    def _write_ffn(self, data) -> None:
        self._ffn_file.write(data)
        self._ffn_hash.update(data)
        self._ffn_pos += len(data)

    def _pad_ffn(self) -> None:
        pad = -self._ffn_pos % self.alignment
        if pad:
            self._write_ffn(bytes(pad))

    def _move_into_place(self) -> None:
        out = self.out_dir
        if os.path.lexists(out):
            self._check_output()  # appeared, or was replaced, while we were converting
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            if os.path.lexists(old):
                shutil.rmtree(old)
            os.rename(out, old)
            try:
                os.rename(self.tmp_dir, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp_dir, out)
        _fsync_dir(out.parent)


def register_file(model_dir, name: str) -> None:
    """Record a file added to an existing model directory (e.g. predictors.npz) in its
    manifest — size, head hash and full hash — replacing the manifest atomically."""
    model_dir = Path(model_dir)
    mpath = model_dir / MANIFEST_NAME
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"), mpath)
    p = model_dir / name
    if os.path.basename(name) != name or not p.is_file():
        raise ValueError(f"{p}: not a file inside the model directory")
    manifest.files[name] = {"bytes": p.stat().st_size, "head_hash": head_hash(p),
                            "hash": full_hash(p)}
    tmp = mpath.with_name(f"{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mpath)
