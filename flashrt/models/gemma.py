"""The Gemma family (model_type gemma, gemma2, gemma3_text): everything flashrt knows about it.

    ModelArgs.from_dict   the one validator of a config (converters and the runtime call it)
    tensors(args)         the tensor-name table: resident tensors and FFN parts, with shapes
    gguf_names(args)      llama.cpp's tensor names -> Hugging Face's (they differ per version)
    gguf_config(get, arch) the config keys llama.cpp's metadata holds beyond llama's
    gguf_tensor(name, w)  a GGUF tensor as Hugging Face holds it (norms: GGUF stores 1 + weight)
    sanitize(weights)     drop tensors the forward pass does not use
    ffn_spec(args, w)     GeGLU (gated tanh-GELU, no biases); FFN_PARTS its bundle parts
    Model                 the forward pass

What differs from Llama:
- every RMSNorm multiplies by (1 + weight), computed in float32;
- the embedding is scaled by sqrt(hidden_size); the head is tied to it;
- the FFN is GeGLU: gelu_tanh(gate.x) * (up.x);
- Gemma 2 and 3: four norms per layer (input, post-attention on the attention's output,
  pre-feedforward, post-feedforward on the FFN's output); attention scaled by
  query_pre_attn_scalar ** -0.5; sliding-window layers (layer_types); Gemma 2 soft-caps
  attention scores and the final logits (cap * tanh(x / cap));
- Gemma 3: RMSNorm over each head of q and k before RoPE; sliding layers use their own
  RoPE (rope_local_base_freq, no scaling), full-attention layers the global one.
"""

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.ffn.base import FFNSpec
from flashrt.ffn.layout import GATED_PARTS
from flashrt.kv_cache import KVCache
from flashrt.models.base import Rope, attention, embed, rms_norm, weight_getter
from flashrt.models.config import DecoderArgs, check_family, config_int, decoder_fields, read_activation, rope_config

ARCHITECTURE = "gemma"
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
FFN_PARTS = GATED_PARTS
EMBED_NAME = "model.embed_tokens.weight"
# Hugging Face activation names -> the FFN kernels' (the tanh approximation is Gemma's own)
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(kw_only=True)
class ModelArgs(DecoderArgs):
    rms_norm_eps: float = 1e-6
    rope_local_base_freq: Optional[float] = None  # gemma3: the sliding layers' RoPE base
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_tanh"                 # the kernels' name
    query_pre_attn_scalar: Optional[float] = None  # attention scale ** -2 (None: head_dim)
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: tuple = field(default=())        # per layer SLIDING | FULL

    @property
    def extra_norms(self):
        """Gemma 2 and 3: post-attention and pre/post-feedforward norms."""
        return self.model_type != "gemma"

    @property
    def qk_norm(self):
        return self.model_type == "gemma3_text"

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        """Keep the HF config.json keys this family uses (transformers 4 or 5 spellings);
        UnsupportedModelError for what flashrt does not implement, ModelFormatError for a
        config that cannot work."""
        model_type = check_family(config, where, MODEL_TYPES, REQUIRED, family="Gemma")
        act = read_activation(config, where, model_type, ACTIVATIONS, keys=("hidden_activation", "hidden_act"))
        if config.get("attention_bias"):
            raise UnsupportedModelError(f"{where}: attention_bias=True is not supported for {model_type}")
        if config.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{where}: bidirectional attention (an encoder) is not supported")
        fields = decoder_fields(config, where, model_type, max_positions=8192, tied=True)
        n_layers = fields["num_hidden_layers"]
        fields["rope_theta"], fields["rope_scaling"], local_theta = _rope(config, model_type, where)
        layer_types = _layer_types(config, model_type, n_layers, where)
        window = config.get("sliding_window") if SLIDING in layer_types else None
        if window is not None:
            window = config_int(config, "sliding_window", where)
        elif SLIDING in layer_types:
            raise ModelFormatError(f"{where}: layer_types names sliding layers but sliding_window is not set")
        if warn and window is not None:
            warnings.warn(f"{where}: sliding_window={window}: the {layer_types.count(SLIDING)} sliding layers "
                          f"attend to the last {window} positions only, as {model_type} does", stacklevel=3)

        def positive(key):
            v = config.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ModelFormatError(f"{where}: {key} must be a positive number or null, got {v!r}")
            return float(v)

        return cls(
            **fields, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_local_base_freq=local_theta,
            hidden_act=ACTIVATIONS[act],
            query_pre_attn_scalar=positive("query_pre_attn_scalar") if model_type != "gemma" else None,
            attn_logit_softcapping=positive("attn_logit_softcapping") if model_type != "gemma" else None,
            final_logit_softcapping=positive("final_logit_softcapping") if model_type != "gemma" else None,
            sliding_window=window, layer_types=layer_types,
        )

    def to_config(self, config):
        """The config a converter writes into the manifest: the HF config with the keys the
        runtime relies on written out flat (rope per layer kind, layer_types)."""
        cfg = {k: v for k, v in config.items() if k not in ("rope_parameters", "hidden_act")}
        cfg.update(num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                   rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                   hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(self.hidden_act, self.hidden_act),
                   rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                   tie_word_embeddings=self.tie_word_embeddings, layer_types=list(self.layer_types),
                   sliding_window=self.sliding_window)
        if self.rope_local_base_freq is not None:
            cfg["rope_local_base_freq"] = self.rope_local_base_freq
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            cfg[key] = getattr(self, key)
        return cfg


def _rope(config, model_type, where):
    """(theta, scaling, local theta or None): transformers 5 nests rope_parameters per layer
    kind (gemma3); transformers 4 has rope_theta, rope_scaling and rope_local_base_freq."""
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and FULL in rp:
        theta, scaling = rope_config({"rope_parameters": rp[FULL]}, where)
        local = rp.get(SLIDING)
        if local is not None:
            local_theta, local_scaling = rope_config({"rope_parameters": local}, where)
            if local_scaling is not None:
                raise UnsupportedModelError(f"{where}: rope scaling on sliding layers is not supported")
            return theta, scaling, local_theta
        return theta, scaling, None
    theta, scaling = rope_config(config, where)
    local = config.get("rope_local_base_freq")
    if model_type == "gemma3_text":
        local = 10000.0 if local is None else float(local)
    return theta, scaling, local


def _layer_types(config, model_type, n_layers, where):
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or any(t not in (SLIDING, FULL) for t in types):
            raise ModelFormatError(f"{where}: layer_types must list {n_layers} entries of {SLIDING!r} or "
                                   f"{FULL!r}, got {types!r}")
        return tuple(types)
    if model_type == "gemma" or config.get("sliding_window") is None:
        return (FULL,) * n_layers
    if model_type == "gemma2":  # every other layer slides, the first one included
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
    pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
    pattern = config_int({"p": pattern}, "p", where)
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


def _layer_norms(args):
    if args.extra_norms:
        names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
    else:
        names = ["input_layernorm", "post_attention_layernorm"]
    return [n + ".weight" for n in names]


def tensors(args):
    """The tensor-name table: (resident {HF name: shape}, ffn [per layer {part: (HF name, shape)}])."""
    d, n_ff, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q_dim, kv_dim = args.num_attention_heads * hd, args.num_key_value_heads * hd
    resident = {EMBED_NAME: (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_word_embeddings:
        resident["lm_head.weight"] = (args.vocab_size, d)
    ffn = []
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in _layer_norms(args):
            resident[p + norm] = (d,)
        resident[p + "self_attn.q_proj.weight"] = (q_dim, d)
        resident[p + "self_attn.k_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.v_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.o_proj.weight"] = (d, q_dim)
        if args.qk_norm:
            resident[p + "self_attn.q_norm.weight"] = (hd,)
            resident[p + "self_attn.k_norm.weight"] = (hd,)
        ffn.append({"gate": (p + "mlp.gate_proj.weight", (n_ff, d)),
                    "up": (p + "mlp.up_proj.weight", (n_ff, d)),
                    "down": (p + "mlp.down_proj.weight", (d, n_ff))})
    return resident, ffn


# -- GGUF (llama.cpp's convert_hf_to_gguf.py: no Q/K permutation, norms stored as 1 + weight) --
_GGUF_COMMON = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
GGUF_NAMES = {**_GGUF_COMMON,  # gemma: ffn_norm is the norm before the FFN, HF's post_attention_layernorm
              "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight"}
GGUF_NAMES_2 = {**_GGUF_COMMON,  # gemma2, gemma3
                "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
                "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
                "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
                "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
                "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight"}


def gguf_names(args):
    return GGUF_NAMES_2 if args.extra_norms else GGUF_NAMES


def gguf_config(get, arch, n_layers):
    """The HF config keys of a GGUF of architecture `arch` beyond llama's; get(key, default)
    reads `<arch>.<key>`. Where the metadata is silent, llama.cpp's fixed rules: gemma2's layers
    alternate sliding/full from layer 0, gemma3 has every sixth layer full
    (attention.sliding_window_pattern, a period or one flag per layer, overrides both) and a
    local RoPE base of 10000 (rope.freq_base_swa); the attention scale is head_dim ** -0.5
    except for the 27B shapes (46 gemma2 / 62 gemma3 layers: (hidden / heads) ** -0.5)."""
    cfg = {"hidden_activation": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return cfg
    head_dim = get("attention.key_length", None)
    heads = get("attention.head_count", None)
    d = get("embedding_length", None)
    big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    cfg["query_pre_attn_scalar"] = d // heads if big else head_dim or d // heads
    cfg["sliding_window"] = get("attention.sliding_window", None)
    cfg["final_logit_softcapping"] = get("final_logit_softcapping", None)
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = get("attn_logit_softcapping", None)
    else:
        cfg["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    pattern = get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ModelFormatError(f"GGUF metadata {arch}.attention.sliding_window_pattern has {len(pattern)} "
                                   f"entries for {n_layers} layers")
        cfg["layer_types"] = [SLIDING if s else FULL for s in pattern]
    else:  # llama.cpp: layer i slides when i % n < n - 1
        n = int(pattern)
        cfg["layer_types"] = [SLIDING if n > 0 and i % n < n - 1 else FULL for i in range(n_layers)]
    if cfg["sliding_window"] is None:
        cfg["layer_types"] = [FULL] * n_layers
    return cfg


def gguf_tensor(name, w):
    """The HF tensor from its GGUF data: llama.cpp stores every Gemma RMSNorm as 1 + weight."""
    return w - np.float32(1.0) if name.endswith("norm.weight") else w


def sanitize(weights):
    """Drop tensors the forward pass does not use (rotary buffers)."""
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def ffn_spec(args, weights):
    """GeGLU without biases."""
    return FFNSpec(gated=True, act=args.hidden_act, up_bias=None, down_bias=None)


@dataclass
class _Layer:
    norms: list                  # [(d,) float32 1 + weight, ...] in _layer_norms order
    wq: np.ndarray               # (n_heads * head_dim, d)
    wk: np.ndarray               # (n_kv_heads * head_dim, d)
    wv: np.ndarray               # (n_kv_heads * head_dim, d)
    wo: np.ndarray               # (d, n_heads * head_dim)
    q_norm: Optional[np.ndarray]  # (head_dim,) float32 1 + weight | None (gemma3)
    k_norm: Optional[np.ndarray]
    rope: Rope
    window: Optional[int]


def _softcap(x, cap):
    """cap * tanh(x / cap), in place."""
    x /= np.float32(cap)
    np.tanh(x, out=x)
    x *= np.float32(cap)
    return x


class Model:
    """forward(ids (T,), kv) -> logits (T, vocab) float32; positions come from kv.length."""

    def __init__(self, args, weights, ffn, linear):
        self.args = args
        self.ffn = ffn
        self.linear = linear
        get = weight_getter(sanitize(weights), f"a {args.model_type} checkpoint")
        one = np.float32(1.0)

        def norm(name):
            return get(name, float32=True) + one  # Gemma's RMSNorm scales by (1 + weight)

        self.embed_tokens = get(EMBED_NAME)                   # (vocab, d) float16|float32
        self.embed_scale = np.float32(args.hidden_size ** 0.5)
        self.norm = norm("model.norm.weight")                 # (d,) float32
        head = get("lm_head.weight", optional=True)
        self.lm_head = self.embed_tokens if (head is None or args.tie_word_embeddings) else head
        n_pos = min(args.max_position_embeddings, 4096)
        rope = Rope(args.head_dim, args.rope_theta, args.rope_scaling, n_positions=n_pos)
        local = rope if args.rope_local_base_freq is None else \
            Rope(args.head_dim, args.rope_local_base_freq, None, n_positions=n_pos)
        self.layers = []
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            sliding = args.layer_types[i] == SLIDING
            self.layers.append(_Layer(
                norms=[norm(p + n) for n in _layer_norms(args)],
                wq=get(a + "q_proj.weight"), wk=get(a + "k_proj.weight"),
                wv=get(a + "v_proj.weight"), wo=get(a + "o_proj.weight"),
                q_norm=norm(a + "q_norm.weight") if args.qk_norm else None,
                k_norm=norm(a + "k_norm.weight") if args.qk_norm else None,
                rope=local if sliding else rope, window=args.sliding_window if sliding else None,
            ))
        self.scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5

    def make_cache(self, max_seq, dtype=np.float32):
        a = self.args
        return KVCache(a.num_hidden_layers, max_seq, a.num_key_value_heads, a.head_dim, dtype)

    def attention(self, i, x, kv):
        """x (T, d) normed -> (T, d): the attention block of layer i (o_proj applied)."""
        a, L, lin = self.args, self.layers[i], self.linear
        T, start = x.shape[0], kv.length
        q = lin(L.wq, x).reshape(T, a.num_attention_heads, a.head_dim)
        k = lin(L.wk, x).reshape(T, a.num_key_value_heads, a.head_dim)
        v = lin(L.wv, x).reshape(T, a.num_key_value_heads, a.head_dim)
        if L.q_norm is not None:  # per head, over head_dim, before RoPE (gemma3)
            q = rms_norm(q, L.q_norm, a.rms_norm_eps)
            k = rms_norm(k, L.k_norm, a.rms_norm_eps)
        L.rope.apply_(q, start)
        L.rope.apply_(k, start)
        keys, values = kv.append(i, k, v)
        out = attention(q, keys, values, start, self.scale, L.window, a.attn_logit_softcapping)
        return lin(L.wo, out)

    def forward(self, ids, kv, last_only=False):
        """ids (T,) int -> logits (T, vocab) float32 (or (1, vocab) with last_only, for prefill).

        Appends the T positions to kv (GenerationError if they do not fit).
        """
        a = self.args
        eps = a.rms_norm_eps
        ids = np.asarray(ids)
        kv.check_room(len(ids))
        x = embed(self.embed_tokens, ids)  # (T, d) float32, the residual stream
        x *= self.embed_scale
        for i, L in enumerate(self.layers):
            if a.extra_norms:
                n_in, n_post_attn, n_pre_ffn, n_post_ffn = L.norms
                x += rms_norm(self.attention(i, rms_norm(x, n_in, eps), kv), n_post_attn, eps)
                x += rms_norm(self.ffn(i, rms_norm(x, n_pre_ffn, eps)), n_post_ffn, eps)
            else:
                n_in, n_pre_ffn = L.norms
                x += self.attention(i, rms_norm(x, n_in, eps), kv)
                x += self.ffn(i, rms_norm(x, n_pre_ffn, eps))
        kv.advance(len(ids))
        if last_only:
            x = x[-1:]
        logits = self.linear(self.lm_head, rms_norm(x, self.norm, eps))
        if a.final_logit_softcapping is not None:
            _softcap(logits, a.final_logit_softcapping)
        return logits

    __call__ = forward
