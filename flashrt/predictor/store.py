"""All layers' predictors, stored in the model directory as predictors.npz.

The file is a NumPy .npz (uncompressed) holding, per layer l, `l{l}.A` (r, d),
`l{l}.B` (n, r), `l{l}.bias` (n,) and for product predictors `l{l}.bias_gate` (n,) and,
optionally, the separate up estimate of gate-first scoring `l{l}.up_A` (r_u, d), `l{l}.up_B`
(n, r_u), `l{l}.up_bias` (n,), plus `header`: a uint8 array of UTF-8 JSON
    {"magic": "flashrt-predictors", "version": 1, "kind": "product"|"relu",
     "n_layers", "dim", "n_neurons",
     "layers": [{"rank", "r_gate", "keep_fraction", "threshold", "prior_weight", "dtype"}, ...],
     "checksum": "<blake2b-256 hex over every array's name, dtype, shape and bytes>",
     "info": {...calibration settings, per-layer report, "quality_curve": QualityCurve.to_dict()...}}
It is written to a temporary file in the same directory and renamed into place, so a
reader sees the old file or the new one, never half of one. Any damage (truncation,
flipped bytes, wrong magic or version, a checksum that does not match) raises
ModelFormatError telling the user to run `flashrt calibrate` again.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from ..format.writer import _writing
from .lowrank import LowRankPredictor
from .quality import QualityCurve

PREDICTORS_NAME = "predictors.npz"
MAGIC = "flashrt-predictors"
VERSION = 1
REDO = "run `flashrt calibrate <model_dir>` to fit the predictors again"


def _checksum(arrays):
    """blake2b-256 over (name, dtype, shape, bytes) of every array, in name order."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype.str).encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PredictorSet:
    """One LowRankPredictor per layer plus calibration info (a plain dict, stored in the header)."""

    def __init__(self, predictors, info=None):
        self.predictors = list(predictors)
        if not self.predictors:
            raise ValueError("PredictorSet: no predictors")
        kinds = {p.kind for p in self.predictors}
        if len(kinds) != 1:
            raise ValueError(f"PredictorSet: mixed predictor kinds {sorted(kinds)}")
        self.kind = kinds.pop()
        self.info = dict(info or {})

    def __len__(self):
        return len(self.predictors)

    def __getitem__(self, layer):
        return self.predictors[layer]

    def __iter__(self):
        return iter(self.predictors)

    @property
    def n_layers(self):
        return len(self.predictors)

    @property
    def dim(self):
        return self.predictors[0].dim

    @property
    def n_neurons(self):
        return self.predictors[0].n_neurons

    @property
    def nbytes(self):
        """DRAM the predictors' arrays hold (as stored)."""
        return sum(p.nbytes for p in self.predictors)

    @property
    def has_up_estimates(self):
        """Every layer carries a separate up estimate for gate-first scoring."""
        return all(p.up is not None for p in self.predictors)

    @property
    def quality_curve(self):
        """The QualityCurve calibration measured (perplexity vs cache share), or None."""
        return QualityCurve.from_dict(self.info.get("quality_curve"))

    @property
    def quality_curve_gate_first(self):
        """The same curve measured with gate-first scoring (exact gate x up estimate), or None."""
        return QualityCurve.from_dict(self.info.get("quality_curve_gate_first"))

    @property
    def macs(self):
        """Multiply-accumulates per token over all layers."""
        return sum(p.macs for p in self.predictors)

    def keep_fractions(self):
        return [p.keep_fraction for p in self.predictors]

    def set_prior_weight(self, weight):
        """Weight of the temporal prior in every layer's select(): one float or one per layer (0: off)."""
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (self.n_layers,))
        for p, a in zip(self.predictors, w):
            if not 0.0 <= a < 1.0:
                raise ValueError(f"set_prior_weight: weights must be in [0, 1), got {a}")
            p.prior_weight = float(a)

    # -- storage ---------------------------------------------------------------------------------
    def _arrays(self):
        arrays = {}
        for l, p in enumerate(self.predictors):
            arrays[f"l{l}.A"] = p.A
            arrays[f"l{l}.B"] = p.B
            arrays[f"l{l}.bias"] = p.bias
            if p.bias_gate is not None:
                arrays[f"l{l}.bias_gate"] = p.bias_gate
            if p.up is not None:
                arrays[f"l{l}.up_A"], arrays[f"l{l}.up_B"], arrays[f"l{l}.up_bias"] = p.up
        return arrays

    def save(self, model_dir_or_file):
        """Write predictors.npz atomically (temp file + rename). Returns the path."""
        path = _file_path(model_dir_or_file)
        arrays = self._arrays()
        header = {
            "magic": MAGIC, "version": VERSION, "kind": self.kind,
            "n_layers": self.n_layers, "dim": self.dim, "n_neurons": self.n_neurons,
            "layers": [{"rank": p.rank, "r_gate": p.r_gate, "keep_fraction": p.keep_fraction,
                        "threshold": p.threshold, "prior_weight": p.prior_weight, "dtype": str(p.A.dtype),
                        "up_rank": 0 if p.up is None else int(p.up[0].shape[0])}
                       for p in self.predictors],
            "checksum": _checksum(arrays),
            "info": _jsonable(self.info),
        }
        blob = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with _writing(path), open(tmp, "wb") as f:
                np.savez(f, header=blob, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path

    @classmethod
    def load(cls, model_dir_or_file, dim=None, n_neurons=None, n_layers=None):
        """Read and verify predictors.npz; ModelFormatError if missing, corrupt or for another shape.

        With the model's dims, no member is inflated whose declared size exceeds what those
        dims allow (a small compressed file cannot allocate gigabytes), and every layer's
        shapes are checked."""
        path = _file_path(model_dir_or_file)
        if not path.is_file():
            raise ModelFormatError(f"{path}: no predictors; {REDO}")
        try:
            files = _read_npz(path, dim, n_neurons, n_layers)
            _drop_page_cache(path)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zipfile.LargeZipFile,
                NotImplementedError, MemoryError) as e:
            raise ModelFormatError(f"{path}: cannot read the predictors ({type(e).__name__}: {e}); {REDO}") from e
        if "header" not in files:
            raise ModelFormatError(f"{path}: not a flashrt predictors file (no header); {REDO}")
        try:
            header = json.loads(files.pop("header").tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ModelFormatError(f"{path}: the predictors header is not valid JSON ({e}); {REDO}") from e
        if not isinstance(header, dict) or header.get("magic") != MAGIC:
            raise ModelFormatError(f"{path}: not a flashrt predictors file (bad magic); {REDO}")
        if header.get("version") != VERSION:
            raise ModelFormatError(f"{path}: predictors format version {header.get('version')!r}, this flashrt "
                                   f"reads version {VERSION}; {REDO}")
        if _checksum(files) != header.get("checksum"):
            raise ModelFormatError(f"{path}: predictors checksum mismatch (the file is corrupt); {REDO}")
        try:
            preds = []
            for l, meta in enumerate(header["layers"]):
                preds.append(LowRankPredictor(
                    header["kind"], files[f"l{l}.A"], files[f"l{l}.B"], files[f"l{l}.bias"],
                    files.get(f"l{l}.bias_gate"), meta["r_gate"], meta["keep_fraction"], meta["threshold"],
                    meta.get("prior_weight", 0.0),
                    up=(files[f"l{l}.up_A"], files[f"l{l}.up_B"], files[f"l{l}.up_bias"]) if f"l{l}.up_A" in files
                    else None))
            pset = cls(preds, info=header.get("info"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{path}: predictors file is inconsistent ({e}); {REDO}") from e
        for what, want, got in (("dim", dim, pset.dim), ("n_neurons", n_neurons, pset.n_neurons),
                                ("n_layers", n_layers, pset.n_layers)):
            if want is not None and int(want) != got:
                raise ModelFormatError(f"{path}: predictors were fitted for {what}={got}, the model has "
                                       f"{want}; {REDO}")
        for l, p in enumerate(pset.predictors):  # every layer, not only the first
            if (p.dim, p.n_neurons) != (pset.dim, pset.n_neurons) or p.rank > min(pset.dim, pset.n_neurons):
                raise ModelFormatError(
                    f"{path}: layer {l}'s predictor has A {p.A.shape} and B {p.B.shape}, the model needs "
                    f"A (r, {pset.dim}) and B ({pset.n_neurons}, r) with r <= {min(pset.dim, pset.n_neurons)}; {REDO}")
        return pset

    def __repr__(self):
        ranks = sorted({p.rank for p in self.predictors})
        return f"PredictorSet(kind={self.kind!r}, n_layers={self.n_layers}, ranks={ranks})"


def predictor_ram_bytes(path, dim: int, n_neurons: int) -> int:
    """What PredictorSet.load(path).nbytes will be, from the header alone (for the budget
    planner, before the arrays are read): per layer A (r, d) and B (n, r) as stored, the
    biases, and the separate up estimate (up_rank) as stored."""
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("header.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
                if int(np.prod(shape)) > HEADER_MAX_BYTES:
                    raise ValueError("header too large")
                header = json.loads(f.read(int(np.prod(shape))).decode("utf-8"))
        total = 0
        for meta in header["layers"]:
            r, item = int(meta["rank"]), np.dtype(meta["dtype"]).itemsize
            total += (r * dim + n_neurons * r) * item + n_neurons * 4      # A, B (as stored), bias
            if header["kind"] == "product":
                total += n_neurons * 4                                      # bias_gate
            r_up = int(meta.get("up_rank", 0))   # gate-first's separate up estimate
            if r_up:
                total += (r_up * dim + n_neurons * r_up) * item + n_neurons * 4
        return total
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise ModelFormatError(f"{path}: cannot read the predictors header ({type(e).__name__}: {e}); {REDO}") from e


MEMBERS_PER_LAYER = 7         # A, B, bias, bias_gate and the up estimate's up_A, up_B, up_bias
HEADER_MAX_BYTES = 16 << 20   # the JSON header (calibration info included)
_NPY_HEADER_MAX = 1 << 16


def _drop_page_cache(path: Path) -> None:
    """The arrays are ours now: drop the file's pages from the page cache, which would count
    against the budget a second time (measured in a memory cgroup at 125 MB: SmolLM2's 15.8 MB
    predictors.npz stayed cached after the load, the charge peaked 0.4 MB under the limit)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_npz(path: Path, dim, n_neurons, n_layers) -> dict:
    """{name: array} of an .npz, refusing members too large for the model before inflating them
    (their declared size and their .npy shape), and anything but plain numeric arrays."""
    known = dim is not None and n_neurons is not None
    if known:
        d, n = int(dim), int(n_neurons)
        member_max = 4 * max(d, n) * min(d, n) + _NPY_HEADER_MAX  # float32 (r, d) or (n, r), r <= min(d, n)
    out = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        most = MEMBERS_PER_LAYER * int(n_layers) + 1 if n_layers is not None else None
        if most is not None and len(infos) > most:
            raise ValueError(f"{len(infos)} members, the model's {n_layers} layers allow at most {most}")
        for info in infos:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            cap = HEADER_MAX_BYTES if name == "header" else (member_max if known else None)
            if cap is not None and info.file_size > cap:
                raise ValueError(f"member {name!r} declares {info.file_size} bytes, more than the model's "
                                 f"dims allow ({cap})")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"member {name!r}: .npy version {version}")
                if dtype.hasobject or dtype.kind not in "fiu":
                    raise ValueError(f"member {name!r} has dtype {dtype}")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if nbytes > info.file_size or (cap is not None and nbytes > cap):
                    raise ValueError(f"member {name!r} declares shape {shape} ({nbytes} bytes) in a "
                                     f"{info.file_size}-byte member")
                data = bytearray(nbytes)
                got = 0
                view = memoryview(data)
                while got < nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise EOFError(f"member {name!r} is truncated")
                    got += k
                out[name] = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return out


def _file_path(model_dir_or_file):
    p = Path(model_dir_or_file)
    return p if p.suffix == ".npz" else p / PREDICTORS_NAME


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
