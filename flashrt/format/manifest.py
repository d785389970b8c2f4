"""manifest.json: what a flashrt model directory holds and where.

The manifest is written last, so a directory with a valid manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import ModelFormatError
from ..models import FAMILIES, parts_for

MAGIC = "flashrt-model"
FORMAT_VERSION = 2  # 2: storage types (quantized FFN bundles and resident tensors); 1 still reads
MANIFEST_NAME = "manifest.json"
RESIDENT_NAME = "resident.safetensors"
FFN_NAME = "ffn.bin"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
ALIGNMENT = 4096
DTYPES = ("float16", "float32", "q8_0", "q4_0", "q4_1")   # storage types (flashrt/quant.py)
QUANT_DTYPES = ("q8_0", "q4_0", "q4_1")

HEAD_BYTES = 1 << 20  # head hash covers the first and the last MiB
_HASH_CHUNK = 8 << 20
REDO = "re-run `flashrt convert` to rebuild the model directory"


def storage_row_bytes(dtype: str, k: int) -> int:
    """Bytes of k weights stored as `dtype` (quantized: k / 32 blocks; see flashrt/quant.py)."""
    block = {"q8_0": 34, "q4_0": 18, "q4_1": 20}.get(dtype)
    if block is not None:
        return k // 32 * block
    return k * (2 if dtype == "float16" else 4)


def _blake2b():
    return hashlib.blake2b(digest_size=16)


def head_hash(path) -> str:
    """blake2b of the first and the last MiB (the whole file when it is <= 2 MiB)."""
    size = os.path.getsize(path)
    h = _blake2b()
    with open(path, "rb") as f:
        if size <= 2 * HEAD_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(HEAD_BYTES))
            f.seek(size - HEAD_BYTES)
            h.update(f.read(HEAD_BYTES))
    return h.hexdigest()


def full_hash(path) -> str:
    """blake2b of the whole file."""
    h = _blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(d: dict) -> str:
    """blake2b of the manifest's fields (all but "checksum") as canonical JSON."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    h = _blake2b()
    h.update(text.encode("ascii"))
    return "blake2b:" + h.hexdigest()


def _fail(what: str, path=None):
    where = f"{path}: " if path is not None else ""
    raise ModelFormatError(f"{where}{what}; {REDO}")


@dataclass
class Manifest:
    """The parsed manifest.json. `ffn`, `files` and `source` are the JSON objects as written.

    dtype: the storage type of the FFN bundles and the default of the 2-D resident tensors;
    tensor_dtypes: {resident tensor name: quantized type} for every resident tensor stored as
    quantized blocks (uint8 in resident.safetensors), which may differ from dtype (a GGUF's
    Q8_0 embedding copied bit for bit into a q4_1 model)."""

    architecture: str
    config: dict
    dtype: str
    ffn: dict
    files: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    created_by: str = "flashrt"
    magic: str = MAGIC
    format_version: int = FORMAT_VERSION
    tensor_dtypes: dict = field(default_factory=dict)

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        order = ["magic", "format_version", "architecture", "config", "dtype", "tensor_dtypes",
                 "ffn", "files", "source", "created_by"]
        d = {k: d[k] for k in order}
        if not d["tensor_dtypes"]:
            del d["tensor_dtypes"]      # float models: the manifest older flashrt writes
        d["checksum"] = manifest_checksum(d)
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, path=None) -> "Manifest":
        """Parse and validate; ModelFormatError (naming `path`) on anything wrong."""
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            _fail(f"manifest is not valid JSON ({e})", path)
        if not isinstance(d, dict):
            _fail("manifest is not a JSON object", path)
        if d.get("magic") != MAGIC:
            _fail(f"not a flashrt model manifest (magic {d.get('magic')!r}, "
                  f"expected {MAGIC!r})", path)
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            _fail(f"bad format_version {version!r}", path)
        if version > FORMAT_VERSION:
            raise ModelFormatError(
                f"{path}: model format version {version} is newer than this flashrt "
                f"supports ({FORMAT_VERSION}); upgrade flashrt (pip install -U flashrt)"
            )
        if version < 1:
            _fail(f"bad format_version {version!r}", path)
        missing = [k for k in ("architecture", "config", "dtype", "ffn", "files") if k not in d]
        if missing:
            _fail(f"manifest lacks required field(s) {missing}", path)
        known = {f for f in cls.__dataclass_fields__}
        stored = d.pop("checksum", None)
        checksum_ok = stored is None or stored == manifest_checksum(d)
        m = cls(**{k: v for k, v in d.items() if k in known})
        try:
            m.validate(path)
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
            if isinstance(e, ModelFormatError):
                raise
            _fail(f"manifest has a field of the wrong type ({type(e).__name__}: {e})", path)
        m._checksum_ok = checksum_ok
        return m

    def check_checksum(self, path=None) -> None:
        """ModelFormatError when the manifest's own checksum does not match its contents.
        (Manifests written before checksums existed carry none and pass.)"""
        if not getattr(self, "_checksum_ok", True):
            raise ModelFormatError(
                f"{path}: the manifest was modified or is corrupt (its checksum does not match "
                f"its contents); {REDO} (if you edited it on purpose, delete its \"checksum\" "
                f"field)")

    # -- checks ----------------------------------------------------------------------
    def validate(self, path=None) -> None:
        """Internal consistency (no file access). ModelFormatError on anything wrong."""
        if self.architecture not in FAMILIES:
            _fail(f"unknown architecture {self.architecture!r} (expected one of "
                  f"{sorted(FAMILIES)})", path)
        if self.dtype not in DTYPES:
            _fail(f"unknown dtype {self.dtype!r} (expected one of {list(DTYPES)})", path)
        if not isinstance(self.config, dict) or not isinstance(self.files, dict):
            _fail("manifest 'config' and 'files' must be objects", path)
        for name, info in self.files.items():
            if (not isinstance(info, dict) or not isinstance(info.get("bytes"), int)
                    or not isinstance(info.get("head_hash"), str)):
                _fail(f"manifest entry for file {name!r} lacks 'bytes'/'head_hash'", path)
            if os.path.basename(name) != name or name in ("", ".", ".."):
                _fail(f"manifest names a file outside the directory: {name!r}", path)
        for name in (RESIDENT_NAME,):
            if name not in self.files:
                _fail(f"manifest does not list {name}", path)
        f = self.ffn
        if not isinstance(f, dict):
            _fail("manifest 'ffn' must be an object", path)
        need = ["file", "parts", "n_neurons", "dim", "row_bytes", "alignment",
                "layer_offsets", "file_bytes"]
        missing = [k for k in need if k not in f]
        if missing:
            _fail(f"manifest 'ffn' lacks field(s) {missing}", path)
        parts = tuple(f["parts"])
        if parts != parts_for(self.architecture):
            _fail(f"ffn parts {list(parts)} do not match architecture "
                  f"{self.architecture!r}", path)
        ints = ["n_neurons", "dim", "row_bytes", "alignment", "file_bytes"]
        if not all(isinstance(f[k], int) and f[k] > 0 for k in ints):
            _fail(f"ffn fields {ints} must be positive integers", path)
        if not isinstance(self.tensor_dtypes, dict) or any(
                v not in QUANT_DTYPES for v in self.tensor_dtypes.values()):
            _fail(f"manifest 'tensor_dtypes' must map tensor names to one of "
                  f"{list(QUANT_DTYPES)}", path)
        if (self.dtype in QUANT_DTYPES or self.tensor_dtypes) and self.format_version < 2:
            _fail(f"quantized storage needs format_version 2, the manifest says "
                  f"{self.format_version}", path)
        if self.dtype in QUANT_DTYPES and f["dim"] % 32:
            _fail(f"ffn dim {f['dim']} is not a whole number of {self.dtype} blocks of 32", path)
        down = f.get("down_dtype", self.dtype)
        if down != self.dtype and not (self.dtype in QUANT_DTYPES and down in QUANT_DTYPES):
            _fail(f"ffn down_dtype {down!r} must be one of {list(QUANT_DTYPES)} in a quantized "
                  f"model (dtype {self.dtype!r})", path)
        part_bytes = storage_row_bytes(self.dtype, f["dim"])
        want = (len(parts) - 1) * part_bytes + storage_row_bytes(down, f["dim"])
        if f["row_bytes"] != want:
            _fail(f"ffn row_bytes {f['row_bytes']} != {want}: {len(parts)} parts of {f['dim']} "
                  f"weights as {self.dtype}" + (f" (down as {down})" if down != self.dtype else ""), path)
        if f["file"] not in self.files:
            _fail(f"manifest does not list the FFN file {f['file']!r}", path)
        if self.files[f["file"]]["bytes"] != f["file_bytes"]:
            _fail("ffn file_bytes disagrees with the files table", path)
        offsets = f["layer_offsets"]
        n_layers = self.config.get("num_hidden_layers")
        if not isinstance(offsets, list) or len(offsets) != n_layers:
            _fail(f"ffn layer_offsets has {len(offsets) if isinstance(offsets, list) else '?'} "
                  f"entries; config says num_hidden_layers={n_layers}", path)
        layer_bytes = f["n_neurons"] * f["row_bytes"]
        end = 0
        for l, off in enumerate(offsets):
            if not isinstance(off, int) or off < end or off % f["alignment"]:
                _fail(f"ffn layer_offsets[{l}]={off!r} is not an aligned offset past the "
                      f"previous layer (ends at {end})", path)
            end = off + layer_bytes
        if end > f["file_bytes"]:
            _fail(f"ffn layers end at byte {end}, past the file size {f['file_bytes']}", path)

    @property
    def n_layers(self) -> int:
        return len(self.ffn["layer_offsets"])
