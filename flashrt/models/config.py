"""Reading a Hugging Face config.json: what every family's ModelArgs.from_dict shares.

    DecoderArgs            the fields every decoder family has (a family's ModelArgs adds its own)
    check_family           model_type, required keys and value bounds: the first step of from_dict
    read_activation        the config's activation, checked against the family's table
    decoder_fields         DecoderArgs' fields read from a config (attention shape, RoPE, head)
    config_int, rope_config, check_config_values   one key, the rotary keys, every size's bounds

A family's validator (models/<family>.py: ModelArgs.from_dict) calls these, then reads and
refuses what is its own; the one-line errors name the config (`where`) and the key.
"""

from dataclasses import dataclass
from typing import Optional

from flashrt.errors import ModelFormatError, UnsupportedModelError


@dataclass(kw_only=True)
class DecoderArgs:
    """The shape of a decoder-only transformer as every family's ModelArgs holds it."""
    model_type: str
    hidden_size: int
    intermediate_size: int          # FFN neurons per layer (per expert in a mixture of experts)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"        # llama keeps the HF name (ffn_act maps it), the others the kernels'

    @property
    def n_neurons(self):
        """Neuron rows per layer in ffn.bin."""
        return self.intermediate_size


def check_family(config, where, model_types, required, family=None):
    """The config's model_type (absent: model_types[0]) after checking it is one of
    model_types, that every key in `required` is set and that every size is in bounds;
    UnsupportedModelError or ModelFormatError naming the problem otherwise."""
    family = family or model_types[0]
    model_type = config.get("model_type", model_types[0])
    if model_type not in model_types:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not a {family}-family model "
                                    f"({', '.join(model_types)})")
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: missing required key(s) {missing} (a {model_type} config needs them)")
    check_config_values(config, where)  # bounds, token ids, finite positive eps/theta
    return model_type


def read_activation(config, where, model_type, names, keys=("hidden_act",), default=None):
    """The activation the config names under the first of `keys` that is set (else `default`,
    else the first of `names`), checked: UnsupportedModelError listing `names` otherwise."""
    act = next((config[k] for k in keys if config.get(k)), None) or default or next(iter(names))
    if not isinstance(act, str) or act not in names:
        raise UnsupportedModelError(f"{where}: {keys[0]} {act!r} is not supported for {model_type} "
                                    f"(flashrt implements {', '.join(names)})")
    return act


def decoder_fields(config, where, model_type, *, ffn_key="intermediate_size", ffn_default=None,
                   n_kv_heads=None, max_positions=2048, tied=False):
    """DecoderArgs' fields but hidden_act, read from a config: the attention shape (GQA
    heads a divisor of the query heads, head_dim hidden / heads unless set), RoPE, the
    context length and whether the head is tied. ffn_key: the key of the FFN's width
    (ffn_default when absent); n_kv_heads: a fixed count (multi-query families) instead of
    the config's num_key_value_heads; max_positions, tied: the family's defaults."""
    hidden = config_int(config, "hidden_size", where)
    n_heads = config_int(config, "num_attention_heads", where)
    n_kv = n_kv_heads or config_int(config, "num_key_value_heads", where, n_heads)
    if n_heads % n_kv:
        raise ModelFormatError(
            f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    theta, scaling = rope_config(config, where)
    return dict(model_type=model_type, hidden_size=hidden,
                intermediate_size=config_int(config, ffn_key, where, ffn_default),
                num_hidden_layers=config_int(config, "num_hidden_layers", where),
                num_attention_heads=n_heads, num_key_value_heads=n_kv,
                vocab_size=config_int(config, "vocab_size", where),
                head_dim=config_int(config, "head_dim", where, hidden // n_heads),
                rope_theta=theta, rope_scaling=scaling,
                max_position_embeddings=config_int(config, "max_position_embeddings", where, max_positions),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", tied)))


def config_int(config, key, where="config", default=None):
    """config[key] (or `default` when absent or null) as a positive integer; ModelFormatError
    for anything else (a string, a bool, a float, zero)."""
    value = config.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFormatError(f"{where}: config key {key!r} must be a positive integer, got {value!r}")
    return value




# rope scaling kinds the forward pass implements, and the keys each needs
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}


def rope_config(cfg: dict, where: str = "config"):
    """(rope_theta, rope_scaling dict or None) from old (rope_theta/rope_scaling) or new
    (transformers 5 rope_parameters) config keys. The scaling dict carries "rope_type".
    UnsupportedModelError for a kind the forward pass lacks, ModelFormatError for missing keys."""
    rp = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", theta)
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            scaling = rp
    theta = 10000.0 if theta is None else float(theta)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        scaling = {"rope_type": scaling}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if not isinstance(kind, str) or kind not in ROPE_SCALING:  # a list or dict is not a kind
        raise UnsupportedModelError(
            f"{where}: rope scaling {kind!r} is not supported (flashrt implements plain RoPE "
            f"and {', '.join(ROPE_SCALING)} scaling)")
    missing = [k for k in ROPE_SCALING[kind] if scaling.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: rope scaling {kind!r} lacks {missing}")
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    return theta, scaling




# bounds on config sizes: far above any real model, low enough that nothing is built for a typo
MAX_LAYERS = 4096
MAX_SIZE = 1 << 24          # hidden, intermediate, vocab, heads, head_dim
MAX_POSITIONS = 1 << 24


def check_config_values(cfg: dict, where: str, n_layers_found: int | None = None) -> None:
    """Every size the converter and the forward pass use: a positive integer within bounds (a
    float, a string, 0 or 10**9 layers is refused before anything is built), the token ids
    integers; ModelFormatError naming the field."""
    def pos_int(key, hi, optional=False):
        v = cfg.get(key)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ModelFormatError(f"{where}: config key {key!r} must be an integer from 1 to {hi}, got {v!r}")

    pos_int("num_hidden_layers", MAX_LAYERS)
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        pos_int(key, MAX_SIZE)
    for key in ("intermediate_size", "ffn_dim", "num_key_value_heads", "head_dim", "word_embed_proj_dim"):
        pos_int(key, MAX_SIZE, optional=True)
    for key in ("max_position_embeddings", "sliding_window"):
        pos_int(key, MAX_POSITIONS, optional=True)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = cfg.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ModelFormatError(f"{where}: {key} must be a token id (or a list of them), got {v!r}")
    for key in ("rms_norm_eps", "layer_norm_eps", "rope_theta"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            raise ModelFormatError(f"{where}: {key} must be a positive finite number, got {v!r}")
    if n_layers_found is not None and cfg["num_hidden_layers"] != n_layers_found:
        raise ModelFormatError(f"{where}: num_hidden_layers is {cfg['num_hidden_layers']} but the checkpoint "
                               f"holds tensors for {n_layers_found} layers")
