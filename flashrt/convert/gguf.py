"""GGUF (llama.cpp) file -> flashrt model directory, for the GGUF architectures the families
name (models.GGUF_ARCHITECTURES: llama, qwen2, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3, phi2, falcon).
Mixtures of experts: the llama architecture with expert_count > 0 (Mixtral) and qwen3moe, the
router as ffn_gate_inp and each layer's experts as ffn_{gate,up,down}_exps, stacked expert-major
into the bundle file as flashrt/models/mixtral.py describes.

Weights are dequantized to float32 with `gguf.quants.dequantize` (llama.cpp's own
reference code), GGUF's innermost-first shapes are reversed for NumPy, and llama.cpp's
rotary row permutation of the Q and K projections is undone where its converter applied
one (the `llama` architecture; the others keep Hugging Face's rotate-half rows),
giving exactly the tensors (and names) of the Hugging Face checkpoint. A family may add
(all optional): gguf_config(field, arch, n_layers) -> its config keys from the metadata,
gguf_names(args) when its name table depends on the config, gguf_tensor(name, w) to undo a
convention of llama.cpp's converter (Gemma's norms stored as 1 + w), and fused(args) naming
the row blocks of a fused matrix (phi3's attn_qkv and ffn_up), which are sliced in place.

Storage (`dtype`): by default the type matching the GGUF's FFN tensors (Q8_0 -> q8_0,
Q4_0 -> q4_0, Q4_1 -> q4_1, other 4/5-bit and K-quants -> q4_1 or q8_0, F16 -> float16; see
flashrt.quant.GGUF_DEFAULT). Tensors whose GGUF blocks flashrt stores as they are -- Q8_0,
Q4_0, Q4_1 matrices kept row-major: embeddings, attention, the head, and the FFN's gate and
up rows -- are copied bit for bit (the Q/K permutation moves whole rows). The down
projection is stored transposed in GGUF (a neuron's column is strided), so it is
dequantized and requantized along d_model with ggml's reference quantizer: as q8_0 when the
storage is 4-bit (a second 4-bit rounding of 4-bit values cost SmolLM2 +8.1% perplexity; see
bench/results/quant_quality.md), else in the storage type. Anything whose GGUF type differs
from the storage type is requantized too.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ModelFormatError, UnsupportedModelError
from ..ffn.layout import bundle
from ..format.writer import ModelWriter
from ..models import GGUF_ARCHITECTURES, family, family_for
from ..models.config import check_config_values
from ..quant import GGUF_DEFAULT, GGUF_EXACT, QMatrix, fits, is_quantized, quantize
from ..tokenizer import tokenizer_from_gguf
from .hf import count_layers

SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                    "Q4_K", "Q5_K", "Q6_K")
# GGUF tensors that carry nothing flashrt needs (precomputed rotary tables).
GGUF_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF architectures whose Q/K rows llama.cpp's converter permutes (rope type "norm": adjacent
# pairs); the others (qwen2, qwen3: rope type "neox") store Hugging Face's rows as they are.
PERMUTED_QK = ("llama",)


def gguf_to_hf(name: str, names: dict):
    """The HF name of a GGUF tensor by a family's GGUF_NAMES table, or None when unknown."""
    m = _BLK.match(name)
    if m:
        key = "blk.{}." + m.group(2)
        return names[key].format(m.group(1)) if key in names else None
    return names.get(name)


# -- llama.cpp's Q/K row permutation ----------------------------------------------------
def permute_qk(w, n_head: int):
    """llama.cpp's forward permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF rotates pairs (j, j + head_dim/2) of each head; llama.cpp rotates adjacent
    pairs (2j, 2j+1). The rows of each head are reordered from
    [x0..x_{h/2-1}, y0..y_{h/2-1}] to [x0, y0, x1, y1, ...].
    """
    w = np.asarray(w)
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk` (what transformers' GGUF loader calls reverse_permute)."""
    w = np.asarray(w)
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# -- metadata -------------------------------------------------------------------------
def _get(reader, key, default=None, required=False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ModelFormatError(f"GGUF metadata lacks {key!r}")
        return default
    v = f.contents()
    if isinstance(v, list):
        raise UnsupportedModelError(f"GGUF metadata {key!r} varies per layer; flashrt "
                                    f"supports uniform layers only")
    return v


def _f32(v) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def gguf_config(reader, tensor_names) -> dict:
    """An HF-style config dict (model_type by models.GGUF_ARCHITECTURES) from GGUF metadata."""
    arch = _get(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; flashrt converts "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files (convert other models "
            f"from their Hugging Face checkpoint)")
    p = arch + "."
    n_experts = int(_get(reader, p + "expert_count", 0) or 0)
    kind = _get(reader, p + "rope.scaling.type", "none")
    rope_scaling = None
    if kind == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _f32(_get(reader, p + "rope.scaling.factor", required=True))}
    elif kind not in (None, "none") or "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            f"GGUF rope scaling ({kind if kind != 'none' else 'rope_freqs tensor'}) is not "
            f"supported; flashrt converts plain and linear RoPE from GGUF (convert Llama 3.1+ "
            f"from the Hugging Face checkpoint)")
    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length",
                "attention.head_count_kv", "attention.key_length", "attention.value_length", "context_length"):
        v = _get(reader, p + key)
        if v is not None and (isinstance(v, (str, bytes)) or not float(v).is_integer() or v < 1):
            raise ModelFormatError(f"GGUF metadata {p + key} must be a positive integer, got {v!r}")
    d = int(_get(reader, p + "embedding_length", required=True))
    heads = int(_get(reader, p + "attention.head_count", required=True))
    head_dim = int(_get(reader, p + "attention.key_length", d // heads))
    if int(_get(reader, p + "attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError("GGUF key_length != value_length is not supported")
    if "token_embd.weight" not in tensor_names:
        raise ModelFormatError("GGUF file has no token_embd.weight tensor")
    bos = _get(reader, "tokenizer.ggml.bos_token_id")
    eos = _get(reader, "tokenizer.ggml.eos_token_id")
    moe = {}
    if n_experts > 0 and arch == "llama":  # Mixtral: the llama architecture with ffn_*_exps tensors
        moe = {"model_type": "mixtral", "num_local_experts": n_experts,
               "num_experts_per_tok": int(_get(reader, p + "expert_used_count", required=True))}
    elif n_experts > 0 and arch == "qwen3moe":  # llama.cpp renormalises qwen3moe's top-k weights
        moe = {"num_experts": n_experts, "num_experts_per_tok": int(_get(reader, p + "expert_used_count", required=True)),
               "moe_intermediate_size": int(_get(reader, p + "expert_feed_forward_length", required=True)),
               "norm_topk_prob": True}
    elif n_experts > 0 or arch == "qwen3moe":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} with expert_count {n_experts} is not supported "
                                    f"(flashrt's mixtures of experts: 'llama' with experts, 'qwen3moe' with experts)")
    config = {
        "model_type": GGUF_ARCHITECTURES[arch],
        **moe,
        "hidden_size": d,
        "intermediate_size": int(_get(reader, p + "feed_forward_length", required=True)),
        "num_hidden_layers": int(_get(reader, p + "block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(reader, p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_get(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_get(reader, p + "rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(_get(reader, p + "context_length", 2048)),
        "vocab_size": None,  # filled from token_embd by the caller
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,  # qwen2
        "mlp_bias": False,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
    }
    extra = getattr(family_for(config), "gguf_config", None)  # the family's own metadata keys
    if extra is not None:
        def field(key, default=None):
            f = reader.fields.get(p + key)
            return default if f is None else f.contents()

        config.update(extra(field, arch, config["num_hidden_layers"]))
    if "partial_rotary_factor" not in config and int(_get(reader, p + "rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings (rope.dimension_count < head_dim) are not "
                                    f"supported for GGUF architecture {arch!r}")
    return config


def _row_slice(t, start: int, n: int):
    """Rows [start, start + n) of a 2-D GGUF tensor `t` (elements of a 1-D one), standing in for
    it (one contiguous run of its bytes, quantized blocks or floats alike): a fused matrix's part."""
    from types import SimpleNamespace

    rows = int(t.shape[-1])
    row_bytes = int(t.n_bytes) // rows
    return SimpleNamespace(name=f"{t.name}[{start}:{start + n}]", tensor_type=t.tensor_type,
                           shape=[int(s) for s in t.shape[:-1]] + [n], n_bytes=n * row_bytes,
                           data_offset=int(t.data_offset) + start * row_bytes, data=t.data[start:start + n])


def _quantization(reader) -> str:
    import gguf  # start-up cost: the gguf package takes ~0.4 s to import

    ft = _get(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "unknown"


# -- tensors --------------------------------------------------------------------------
def _tensor_data(f, t) -> np.ndarray:
    """t.data read from the open file f with pread, not through GGUFReader's memory map:
    a source that shrinks during conversion is then an error, not a SIGBUS."""
    want, off = int(t.n_bytes), int(t.data_offset)
    buf = bytearray(want)
    view, got = memoryview(buf), 0
    while got < want:
        n = os.preadv(f.fileno(), [view[got:]], off + got)
        if n == 0:
            raise ModelFormatError(
                f"{f.name}: tensor {t.name!r} ends at byte {off + want} but the file now has "
                f"{os.fstat(f.fileno()).st_size} bytes: it shrank during conversion (was it being "
                f"rewritten or downloaded?); convert again once the file is complete")
        got += n
    return np.frombuffer(buf, dtype=t.data.dtype).reshape(t.data.shape)


def _dequantize(t, f=None) -> np.ndarray:
    """A GGUF tensor as float32 in NumPy (HF) shape order; its data read from the open
    source file f (None: from t.data, the reader's memory map)."""
    from gguf.quants import dequantize  # start-up cost: ~0.4 s to import

    qname = t.tensor_type.name
    if qname not in SUPPORTED_QTYPES:
        raise UnsupportedModelError(
            f"GGUF tensor {t.name!r} uses quantization {qname}, which flashrt does not "
            f"convert (supported: {', '.join(SUPPORTED_QTYPES)})")
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the innermost dim first
    return np.asarray(dequantize(t.data if f is None else _tensor_data(f, t), t.tensor_type), dtype=np.float32).reshape(shape)


def default_storage(types) -> str:
    """The storage type for GGUF tensor type names `types` (the FFN's gate/up tensors): the
    match of the most common one."""
    common = Counter(types).most_common(1)[0][0]
    return GGUF_DEFAULT.get(common, "float16")


def _blocks(t, f):
    """A GGUF tensor's rows as its uint8 blocks (rows, row_bytes): the file's bytes (read from f)."""
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.asarray(_tensor_data(f, t), dtype=np.uint8).reshape(shape[0], -1)


def convert_gguf(src_file, out_dir, dtype=None, overwrite=False, progress=True, *,
                 reader=None) -> Path:
    """Convert a GGUF file (a llama, qwen2 or qwen3 architecture) into a flashrt model directory.

    dtype: the storage type (float16 | float32 | q8_0 | q4_0 | q4_1), or None for the type
    matching the file's FFN tensors (see the module docstring for what is copied exactly).
    `reader`: an already parsed `gguf.GGUFReader` of `src_file` (parsing takes seconds).
    """
    import gguf  # start-up cost: ~0.4 s to import

    src_file = Path(src_file)
    if not src_file.is_file():
        raise ModelFormatError(f"{src_file}: no such GGUF file")
    if reader is None:
        try:
            reader = gguf.GGUFReader(str(src_file))
        except Exception as e:
            raise ModelFormatError(f"{src_file}: not a readable GGUF file ({e})") from e
    by_gguf = {t.name: t for t in reader.tensors}
    config = gguf_config(reader, by_gguf)
    config["vocab_size"] = int(by_gguf["token_embd.weight"].shape[1])
    fam = family_for(config, str(src_file))
    moe = hasattr(fam, "GGUF_EXPERTS")  # llama with experts (mixtral), qwen3moe
    args = fam.ModelArgs.from_dict(config, str(src_file), warn=True)
    check_config_values(config, f"{src_file} (GGUF metadata)", count_layers(by_gguf, r"blk\.(\d+)\."))

    tensors = {}  # HF name -> GGUF tensor
    names = fam.gguf_names(args) if hasattr(fam, "gguf_names") else fam.GGUF_NAMES
    experts = [{} for _ in range(args.num_hidden_layers)]  # MoE: per layer {part: the (n_experts, ...) tensor}
    exps = {g: p for p, g in getattr(fam, "GGUF_EXPERTS", {}).items()}
    for name, t in by_gguf.items():
        m = _BLK.match(name)
        if m and "blk.{}." + m.group(2) in exps and int(m.group(1)) < args.num_hidden_layers:
            experts[int(m.group(1))][exps["blk.{}." + m.group(2)]] = t
            continue
        hf = gguf_to_hf(name, names)
        if hf is None:
            if GGUF_IGNORED.match(name):
                continue
            raise UnsupportedModelError(f"{src_file}: GGUF tensor {name!r} has no meaning in "
                                        f"flashrt's {args.model_type} model; this variant is not supported")
        tensors[hf] = t
    for name, parts in (fam.fused(args) if hasattr(fam, "fused") else {}).items():  # phi3's qkv, gate_up
        if name in tensors:
            t = tensors.pop(name)
            want = sum(n for _, n in parts)
            if len(t.shape) not in (1, 2) or int(t.shape[-1]) != want:
                raise ModelFormatError(f"{src_file}: tensor {t.name!r} has {int(t.shape[-1])} rows, the metadata "
                                       f"implies {want} (fused {', '.join(p for p, _ in parts)})")
            start = 0
            for part, n in parts:
                tensors[part] = _row_slice(t, start, n)
                start += n
    resident, ffn = fam.tensors(args)
    if moe:  # the experts of a layer: one tensor per part, (n_experts, n_ff, d) or (n_experts, d, n_ff)
        E, n, d = args.num_local_experts, args.intermediate_size, args.hidden_size
        for l, layer in enumerate(experts):
            for p, gname in fam.GGUF_EXPERTS.items():
                if p not in layer:
                    raise ModelFormatError(f"{src_file}: tensor {gname.format(l)!r} is missing (a mixture-of-experts "
                                           f"GGUF has one per layer and part)")
                got = tuple(int(s) for s in reversed(layer[p].shape))
                want = (E, d, n) if p == "down" else (E, n, d)
                if got != want:
                    raise ModelFormatError(f"{src_file}: expert tensor {gname.format(l)!r} has shape {got}, but "
                                           f"{E} experts of {n} neurons in dim {d} need {want}; the experts' tensors "
                                           f"disagree with the metadata (expert_count and the experts' feed-forward length)")
        ffn = [{p: (layer[p].name, None) for p in layer} for layer in experts]
    for name, shape in list(resident.items()) + ([] if moe else [nv for layer in ffn for nv in layer.values()]):
        if name not in tensors:
            raise ModelFormatError(f"{src_file}: tensor for {name!r} is missing")
        got = tuple(int(s) for s in reversed(tensors[name].shape))
        if got != tuple(shape):
            raise ModelFormatError(f"{src_file}: tensor for {name!r} has shape {got}, the "
                                   f"metadata implies {tuple(shape)}")

    n_head, n_kv = args.num_attention_heads, args.num_key_value_heads
    permuted = _get(reader, "general.architecture") in PERMUTED_QK

    f = open(src_file, "rb")

    def unpermute(name, w):
        if not permuted:
            return w
        if name.endswith("self_attn.q_proj.weight"):
            return unpermute_qk(w, n_head)
        if name.endswith("self_attn.k_proj.weight"):
            return unpermute_qk(w, n_kv)
        return w

    from_gguf = getattr(fam, "gguf_tensor", lambda name, w: w)  # e.g. Gemma's norms: stored as 1 + w

    def load(name):
        return from_gguf(name, unpermute(name, _dequantize(tensors[name], f)))

    ffn_types = [(by_gguf if moe else tensors)[layer[p][0]].tensor_type.name for layer in ffn for p in layer
                 if p != "down"]
    chosen = dtype is not None
    storage = dtype if chosen else default_storage(ffn_types)
    # the re-blocked down columns: 8-bit under 4-bit storage (requantizing 4-bit values to 4 bits
    # again doubles their error)
    down_storage = "q8_0" if storage in ("q4_0", "q4_1") else storage
    n_exact = 0

    def exact(name, want):
        """The tensor's GGUF blocks as a QMatrix when they are stored as `want` (or, by default,
        in any quantized type flashrt holds); else None."""
        nonlocal n_exact
        t = tensors[name]
        have = GGUF_EXACT.get(t.tensor_type.name)
        if have is None or not is_quantized(have) or (want is not None and have != want):
            return None
        n_exact += 1
        return QMatrix(np.ascontiguousarray(unpermute(name, _blocks(t, f))), have)

    def resident_tensor(name):
        if is_quantized(storage) and len(tensors[name].shape) == 2:
            q = exact(name, storage if chosen else None)
            if q is not None:
                return q
        return load(name)

    def moe_layer(parts):
        """The experts' rows stacked expert-major: (n_experts * n_ff, row) (see models/mixtral.py)."""
        ts = {p: by_gguf[parts[p][0]] for p in w.parts}
        E, n, d = args.num_local_experts, args.intermediate_size, args.hidden_size

        def rows(p):  # float32 (E * n, d): gate/up rows, down columns
            a = _dequantize(ts[p], f)
            return (a.transpose(0, 2, 1) if p == "down" else a).reshape(E * n, d)

        if not is_quantized(storage) or not fits(storage, d):
            return np.concatenate([rows(p) for p in w.parts], axis=1)
        blocks = []
        for p in w.parts:
            have = GGUF_EXACT.get(ts[p].tensor_type.name)
            if p != "down" and have == storage:  # the GGUF's blocks, bit for bit
                nonlocal_count[0] += 1
                blocks.append(np.asarray(_tensor_data(f, ts[p]), np.uint8).reshape(E * n, -1))
            else:
                blocks.append(quantize(rows(p), down_storage if p == "down" else storage))
        return np.concatenate(blocks, axis=1)

    nonlocal_count = [0]

    def ffn_layer(parts):
        if moe:
            return moe_layer(parts)
        if not is_quantized(storage) or not fits(storage, config["hidden_size"]):
            return bundle({p: load(parts[p][0]) for p in w.parts}, w.parts)
        blocks = []
        for p in w.parts:
            name = parts[p][0]
            q = exact(name, storage) if p != "down" else None
            blocks.append(q.data if q is not None else
                          quantize(load(name).T, down_storage) if p == "down" else
                          quantize(load(name), storage))
        return np.concatenate(blocks, axis=1)          # (n_neurons, n_parts * row_bytes)

    tok = None
    if "tokenizer.ggml.model" in reader.fields:
        tok = tokenizer_from_gguf(reader)
    else:
        warnings.warn(f"{src_file}: no tokenizer metadata; the converted model will have no "
                      f"tokenizer (token ids only)", stacklevel=2)
    source = {"kind": "gguf", "path": str(src_file.absolute()),
              "quantization": _quantization(reader), "storage": storage,
              "down_storage": down_storage}
    with f, ModelWriter(out_dir, fam.ARCHITECTURE, config, storage, overwrite=overwrite, source=source,
                        down_dtype=down_storage if is_quantized(storage) else None) as w:
        layer_prefix = "model.layers."
        for name in resident:
            if not name.startswith(layer_prefix):
                w.add_resident(name, resident_tensor(name))
        for l, parts in enumerate(tqdm(ffn, desc="convert", unit="layer", disable=not progress)):
            for name in resident:
                if name.startswith(f"{layer_prefix}{l}."):
                    w.add_resident(name, resident_tensor(name))
            w.add_ffn_layer(l, ffn_layer(parts))
        w.source["tensors_copied_exactly"] = n_exact + nonlocal_count[0]
        if tok is not None:
            w.add_tokenizer(*tok)
        return w.commit()
