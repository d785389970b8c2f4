"""Hugging Face safetensors checkpoint -> flashrt model directory.

Supported: model_type llama, mistral, qwen2 (architecture "llama"; SmolLM is llama)
and opt (architecture "opt", pre-LN, no projections). Anything the forward passes do
not implement is refused with UnsupportedModelError before a byte is written.
"""
from __future__ import annotations

import json
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from ..ffn_layout import make_bundles, make_bundles_relu
from ..format.writer import ModelWriter
from .names import HF_IGNORED, embed_name, expected_tensors, normalize_hf_name

LLAMA_TYPES = ("llama", "mistral", "qwen2")
OPT_ACTIVATIONS = ("relu", "gelu")
_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


# -- config ---------------------------------------------------------------------------
# rope scaling kinds the forward pass implements, and the keys each needs
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}


def _rope(cfg: dict, where: str):
    """(rope_theta, rope_scaling dict or None) from old (rope_theta/rope_scaling) or new
    (transformers 5 rope_parameters) config keys. The scaling dict carries "rope_type"."""
    rp = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", theta)
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            scaling = rp
    if scaling is None:
        return (10000.0 if theta is None else float(theta)), None
    if not isinstance(scaling, dict):
        scaling = {"rope_type": scaling}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return (10000.0 if theta is None else float(theta)), None
    if kind not in ROPE_SCALING:
        raise UnsupportedModelError(
            f"{where}: rope scaling {kind!r} is not supported (flashrt implements plain RoPE "
            f"and {', '.join(ROPE_SCALING)} scaling)")
    missing = [k for k in ROPE_SCALING[kind] if scaling.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: rope scaling {kind!r} lacks {missing}")
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    return (10000.0 if theta is None else float(theta)), scaling


def normalize_config(cfg: dict, where="config.json"):
    """Validate an HF config and fill the defaults the forward passes rely on.

    Returns (architecture, config). Raises UnsupportedModelError for what flashrt lacks.
    """
    cfg = dict(cfg)
    mt = cfg.get("model_type")
    if mt in LLAMA_TYPES:
        arch = "llama"
    elif mt == "opt":
        arch = "opt"
    else:
        raise UnsupportedModelError(
            f"{where}: model_type {mt!r} is not supported; flashrt converts "
            f"{', '.join(LLAMA_TYPES)} (SmolLM is llama) and opt")
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "intermediate_size" if arch == "llama" else "ffn_dim"]
    missing = [k for k in need if cfg.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: missing required key(s) {missing}")
    heads = cfg["num_attention_heads"]
    cfg.setdefault("num_key_value_heads", heads)
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = heads
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // heads

    if arch == "llama":
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported for "
                                        f"{mt} (flashrt implements silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{where}: mlp_bias=True is not supported")
        if cfg.get("attention_bias") and mt != "qwen2":
            raise UnsupportedModelError(f"{where}: attention_bias=True is not supported for {mt}")
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            raise ModelFormatError(f"{where}: num_attention_heads is not a multiple of "
                                   f"num_key_value_heads")
        cfg["rope_theta"], cfg["rope_scaling"] = _rope(cfg, where)
        cfg["hidden_act"] = "silu"
        cfg.setdefault("rms_norm_eps", 1e-6)
        cfg.setdefault("max_position_embeddings", 2048)
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
        window = cfg.get("sliding_window")
        active = window is not None and (mt == "mistral" or cfg.get("use_sliding_window"))
        if active and window < cfg["max_position_embeddings"]:
            warnings.warn(
                f"{where}: sliding_window={window} is ignored; flashrt attends to the whole "
                f"context (identical results for contexts up to {window} tokens)", stacklevel=3)
    else:
        if not cfg.get("do_layer_norm_before", True):
            raise UnsupportedModelError(f"{where}: OPT with do_layer_norm_before=False "
                                        f"(e.g. opt-350m) is not supported")
        wdim = cfg.get("word_embed_proj_dim") or cfg["hidden_size"]
        if wdim != cfg["hidden_size"]:
            raise UnsupportedModelError(
                f"{where}: OPT with project_in/project_out (word_embed_proj_dim={wdim} != "
                f"hidden_size={cfg['hidden_size']}) is not supported")
        act = cfg.get("activation_function", "relu")
        if act not in OPT_ACTIVATIONS:
            raise UnsupportedModelError(f"{where}: OPT activation_function {act!r} is not "
                                        f"supported (flashrt implements {OPT_ACTIVATIONS})")
        if cfg.get("_remove_final_layer_norm"):
            raise UnsupportedModelError(f"{where}: OPT with _remove_final_layer_norm=True is "
                                        f"not supported")
        if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
            raise UnsupportedModelError(f"{where}: OPT without biases or without layer-norm "
                                        f"affine parameters is not supported")
        cfg["activation_function"] = act
        cfg.setdefault("max_position_embeddings", 2048)
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("do_layer_norm_before", True)
    return arch, cfg


# -- tensors --------------------------------------------------------------------------
class SafetensorsSource:
    """The tensors of one checkpoint (single file or sharded), by normalised HF name."""

    def __init__(self, src_dir: Path, model_type: str, stack: ExitStack):
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
            for key, (dtype, shape, offset) in _read_header(path).items():
                self.entries[normalize_hf_name(key, model_type)] = (path, key, dtype, shape, offset)

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
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
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
    import tokenizers

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
def _progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def convert_hf(src_dir, out_dir, dtype="float16", overwrite=False, progress=True) -> Path:
    """Convert an HF safetensors checkpoint directory into a flashrt model directory."""
    src_dir = Path(src_dir)
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{src_dir}: no config.json; is this a Hugging Face model "
                               f"directory?")
    arch, config = normalize_config(_load_json(cfg_path), str(cfg_path))
    with ExitStack() as stack:
        src = SafetensorsSource(src_dir, config["model_type"], stack)
        embed = embed_name(arch)
        if not config["tie_word_embeddings"] and "lm_head.weight" in src.entries and \
                embed in src.entries and src.shape(embed) == src.shape("lm_head.weight") and \
                np.array_equal(src.get(embed), src.get("lm_head.weight")):
            config["tie_word_embeddings"] = True  # an untied head equal to the embedding
        resident, ffn = expected_tensors(arch, config)
        for name, shape in list(resident.items()) + [nv for layer in ffn for nv in layer.values()]:
            if name not in src.entries:
                raise ModelFormatError(f"{src_dir}: tensor {name!r} is missing from the "
                                       f"checkpoint (model_type {config['model_type']})")
            if src.shape(name) != tuple(shape):
                raise ModelFormatError(f"{src_dir}: tensor {name!r} has shape "
                                       f"{src.shape(name)}, config implies {tuple(shape)}")
            src.check_dtype(name)
        known = set(resident) | {n for layer in ffn for n, _ in layer.values()}
        extra = [n for n in src.entries if n not in known and not HF_IGNORED.search(n)
                 and not (n == "lm_head.weight" and config["tie_word_embeddings"])]
        if extra:
            warnings.warn(f"{src_dir}: ignoring {len(extra)} unexpected tensor(s), e.g. "
                          f"{extra[:3]}", stacklevel=2)

        source = {"kind": "hf", "path": str(src_dir.absolute()),
                  "model_type": config["model_type"]}
        with ModelWriter(out_dir, arch, config, dtype, overwrite=overwrite, source=source) as w:
            for name in _progress(list(resident), progress, desc="resident", unit="tensor"):
                w.add_resident(name, src.get(name))
            for l, parts in enumerate(_progress(ffn, progress, desc="ffn", unit="layer")):
                arrays = [src.get(parts[p][0]) for p in w.parts]
                # bundled in the source precision; the writer casts (and checks overflow)
                bundles = (make_bundles if arch == "llama" else make_bundles_relu)(*arrays)
                w.add_ffn_layer(l, bundles)
            tok = hf_tokenizer(src_dir, config)
            if tok is not None:
                w.add_tokenizer(*tok)
            return w.commit()
