"""Hugging Face safetensors checkpoint -> flashrt model directory.

Any family in flashrt.models (model_type llama, mistral, qwen2, opt; SmolLM is llama):
the family's ModelArgs.from_dict validates the config, its tensor table says what the
checkpoint must hold. Anything the forward passes do not implement is refused with
UnsupportedModelError before a byte is written.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tokenizers
from tqdm.auto import tqdm

from ..errors import ModelFormatError, UnsupportedModelError
from ..ffn.layout import bundle
from ..models.config import check_config_values
from ..format.writer import ModelWriter
from ..models import family_for

_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# Tensors some checkpoints carry that are recomputed at run time.
HF_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def count_layers(names, pattern: str) -> int:
    """Layers present in tensor names ("model.layers.7." or "blk.7."): 1 + the largest index."""
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for n in names if (m := rx.match(n))]
    return max(idx) + 1 if idx else 0


# -- tensors --------------------------------------------------------------------------
class SafetensorsSource:
    """The tensors of one checkpoint (single file or sharded), by normalised HF name."""

    def __init__(self, src_dir: Path, family, stack: ExitStack, fused=None):
        self.src_dir = src_dir
        self._stack = stack
        single = src_dir / "model.safetensors"
        index = src_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            extra = (" (only PyTorch .bin weights found: save the model as safetensors first)"
                     if any(src_dir.glob("*.bin")) else "")
            raise ModelFormatError(
                f"{src_dir}: no model.safetensors or model.safetensors.index.json{extra}")
        self.entries = {}  # name -> (file path, key, dtype str, shape, absolute offset)
        for fname in files:
            path = src_dir / fname
            if not path.is_file():
                raise ModelFormatError(
                    f"{path}: shard listed in model.safetensors.index.json is missing; "
                    f"download the complete checkpoint")
            header = _read_header(path)
            for name, key in family.sanitize({k: k for k in header}).items():  # the family's names
                self.entries[name] = (path, key, *header[key])
        for name, parts in (fused or {}).items():  # row blocks of a fused matrix: contiguous slices
            if name in self.entries:
                self._split(name, parts)

    def _split(self, name, parts):
        path, key, dtype, shape, offset = self.entries.pop(name)
        if len(shape) not in (1, 2) or shape[0] != sum(n for _, n in parts):
            raise ModelFormatError(f"{path}: tensor {key!r} has shape {list(shape)}, the config implies "
                                   f"{sum(n for _, n in parts)} rows of fused {', '.join(p for p, _ in parts)}")
        row = int(np.prod(shape[1:], dtype=np.int64)) * _ITEMSIZE.get(dtype, 0)
        for part, n in parts:
            self.entries[part] = (path, key, dtype, (n, *shape[1:]), offset)
            offset += n * row

    def shape(self, name):
        return tuple(self.entries[name][3])

    def check_dtype(self, name):
        path, key, dtype = self.entries[name][:3]
        if dtype not in _NP_DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {key!r} has dtype {dtype}; flashrt converts F32, F16 and BF16 "
                f"checkpoints (not quantized ones)")

    def get(self, name) -> np.ndarray:
        """The tensor as stored (float16/float32/float64), bf16 widened to float32."""
        self.check_dtype(name)
        path, key, dtype, shape, offset = self.entries[name]
        # read with fread, not memory-mapped (safetensors' safe_open maps the file): a source
        # that shrinks during conversion is then an error, not a SIGBUS
        n = int(np.prod(shape, dtype=np.int64))
        try:
            raw = np.fromfile(path, dtype=_NP_DTYPES[dtype], count=n, offset=offset)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: cannot read tensor {key!r} ({e}); download it again") from e
        if raw.size != n:
            raise ModelFormatError(
                f"{path}: tensor {key!r} ends at byte {offset + n * raw.itemsize} but the file now "
                f"has {path.stat().st_size} bytes: it is truncated or shrank during conversion; "
                f"convert again once the file is complete")
        if dtype == "BF16":  # NumPy has no bfloat16: widen the raw bits to float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.reshape(shape)


def _read_header(path: Path) -> dict:
    """{key: (dtype, shape, absolute data offset)} from a safetensors header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    size = path.stat().st_size
    sizes = _ITEMSIZE
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(s, int) and s >= 0 for s in shape)
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: the safetensors header entry for {key!r} is malformed "
                                   f"({str(info)[:200]}); the file is corrupt: download it again") from None
        n_bytes = int(np.prod(shape, dtype=np.int64)) * sizes.get(dtype, 0)
        if dtype in sizes and end - begin != n_bytes:
            raise ModelFormatError(f"{path}: tensor {key!r} ({dtype} {list(shape)}) should take {n_bytes} "
                                   f"bytes, the header gives it {end - begin}; the file is corrupt")
        if 8 + n + end > size:
            raise ModelFormatError(f"{path}: the file is truncated ({size} bytes; tensor {key!r} ends at "
                                   f"byte {8 + n + end}): download it again")
        out[key] = (dtype, shape, 8 + n + begin)
    return out


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from e


# -- tokenizer ------------------------------------------------------------------------
def _token_text(tok):
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _adds_bos(tokenizer_json: dict, bos: str | None) -> bool:
    """Whether the tokenizer's post-processor starts a sequence with BOS."""
    pp = tokenizer_json.get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return bool(bos) and first.get("SpecialToken", {}).get("id") == bos
    return False


def hf_tokenizer(src_dir: Path, config: dict):
    """(tokenizer_json_str, tokenizer_config) from an HF model dir, or None without tokenizer.json."""
    path = src_dir / "tokenizer.json"
    if not path.is_file():
        warnings.warn(f"{src_dir}: no tokenizer.json; the converted model will have no "
                      f"tokenizer (token ids only)", stacklevel=3)
        return None
    text = path.read_text(encoding="utf-8")
    try:
        tk = tokenizers.Tokenizer.from_str(text)
    except Exception as e:
        raise ModelFormatError(f"{path}: not a valid tokenizers JSON ({e})") from e
    tc_path = src_dir / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (src_dir / "chat_template.jinja").is_file():
        template = (src_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (src_dir / "chat_template.json").is_file():
        template = _load_json(src_dir / "chat_template.json").get("chat_template")
    bos = _token_text(tc.get("bos_token"))
    eos = _token_text(tc.get("eos_token"))
    bos_id = tk.token_to_id(bos) if bos else None
    if bos_id is None and config.get("bos_token_id") is not None:
        bos_id = int(config["bos_token_id"])
        bos = tk.id_to_token(bos_id)
    eos_ids = [tk.token_to_id(eos)] if eos and tk.token_to_id(eos) is not None else []
    gen_path = src_dir / "generation_config.json"
    gen = _load_json(gen_path) if gen_path.is_file() else {}
    for i in _ids(config.get("eos_token_id")) + _ids(gen.get("eos_token_id")):
        if i not in eos_ids:
            eos_ids.append(i)
    if eos is None and eos_ids:
        eos = tk.id_to_token(eos_ids[0])
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = _adds_bos(json.loads(text), bos)
    tok_cfg = {"chat_template": template, "bos_token": bos, "eos_token": eos,
               "add_bos_token": bool(add_bos), "bos_token_id": bos_id, "eos_token_ids": eos_ids}
    return text, tok_cfg


# -- conversion -----------------------------------------------------------------------
def _per_expert(entry):
    """A family's FFN table entry: (name, shape), or a list of them, one per expert (MoE)."""
    return entry if isinstance(entry, list) else [entry]


def ffn_layer(get, parts_table, parts):
    """One layer's bundle matrix from a family's FFN table ({part: (name, shape)} or, for a mixture
    of experts, {part: [(name, shape) per expert]}): experts' neuron rows stacked expert-major,
    so each expert is one contiguous span of rows."""
    first = parts_table[parts[0]]
    if not isinstance(first, list):
        return bundle({p: get(parts_table[p][0]) for p in parts}, parts)
    return np.concatenate([bundle({p: get(parts_table[p][e][0]) for p in parts}, parts)
                           for e in range(len(first))], axis=0)


def convert_hf(src_dir, out_dir, dtype="float16", overwrite=False, progress=True) -> Path:
    """Convert an HF safetensors checkpoint directory into a flashrt model directory."""
    src_dir = Path(src_dir)
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{src_dir}: no config.json; is this a Hugging Face model "
                               f"directory?")
    hf_config = _load_json(cfg_path)
    if not isinstance(hf_config, dict):
        raise ModelFormatError(f"{cfg_path}: must hold a JSON object, got a "
                               f"{type(hf_config).__name__}")
    family = family_for(hf_config, str(cfg_path))
    args = family.ModelArgs.from_dict(hf_config, str(cfg_path), warn=True)
    config = args.to_config(hf_config)
    with ExitStack() as stack:
        src = SafetensorsSource(src_dir, family, stack, fused=getattr(family, "fused", lambda a: {})(args))
        check_config_values(config, str(cfg_path),
                            count_layers(src.entries, getattr(family, "LAYER_PATTERN",
                                                              r"(?:model\.(?:decoder\.)?)?layers\.(\d+)\.")))
        embed = family.EMBED_NAME
        if not config["tie_word_embeddings"] and "lm_head.weight" in src.entries and \
                embed in src.entries and src.shape(embed) == src.shape("lm_head.weight") and \
                np.array_equal(src.get(embed), src.get("lm_head.weight")):
            config["tie_word_embeddings"] = True  # an untied head equal to the embedding
            args = dataclasses.replace(args, tie_word_embeddings=True)
        resident, ffn = family.tensors(args)
        ffn_tensors = [nv for layer in ffn for v in layer.values() for nv in _per_expert(v)]
        for name, shape in list(resident.items()) + ffn_tensors:
            if name not in src.entries:
                raise ModelFormatError(f"{src_dir}: tensor {name!r} is missing from the "
                                       f"checkpoint (model_type {config['model_type']})")
            if src.shape(name) != tuple(shape):
                raise ModelFormatError(f"{src_dir}: tensor {name!r} has shape "
                                       f"{src.shape(name)}, config implies {tuple(shape)}")
            src.check_dtype(name)
        known = set(resident) | {n for n, _ in ffn_tensors}
        extra = [n for n in src.entries if n not in known and not HF_IGNORED.search(n)
                 and not (n == "lm_head.weight" and config["tie_word_embeddings"])]
        if extra:
            warnings.warn(f"{src_dir}: ignoring {len(extra)} unexpected tensor(s), e.g. "
                          f"{extra[:3]}", stacklevel=2)

        source = {"kind": "hf", "path": str(src_dir.absolute()),
                  "model_type": config["model_type"]}
        with ModelWriter(out_dir, family.ARCHITECTURE, config, dtype, overwrite=overwrite, source=source) as w:
            for name in tqdm(list(resident), desc="resident", unit="tensor", disable=not progress):
                w.add_resident(name, src.get(name))
            for l, parts in enumerate(tqdm(ffn, desc="ffn", unit="layer", disable=not progress)):
                # bundled in the source precision; the writer casts (and checks overflow)
                w.add_ffn_layer(l, ffn_layer(lambda name: src.get(name), parts, w.parts))
            tok = hf_tokenizer(src_dir, config)
            if tok is not None:
                w.add_tokenizer(*tok)
            return w.commit()
