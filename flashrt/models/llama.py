"""The Llama family forward pass (model_type llama, mistral, qwen2; SmolLM is llama).

RMSNorm -> attention (RoPE, GQA, optional q/k/v biases) -> residual ->
RMSNorm -> FFN (the injected interface, gated SiLU) -> residual; final RMSNorm; head.
Weights use Hugging Face state-dict names and layouts.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.kv_cache import KVCache
from flashrt.models.base import Rope, attention, embed, rms_norm, rope_inv_freq

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config):
        """Keep the HF config.json keys this family uses (transformers 4 or 5 spellings)."""
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a Llama-family model ({', '.join(MODEL_TYPES)})"
            )
        try:
            hidden = int(config["hidden_size"])
            n_heads = int(config["num_attention_heads"])
            args = dict(
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or n_heads),
                vocab_size=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or hidden // n_heads),
            )
        except KeyError as e:
            raise ModelFormatError(f"config is missing {e.args[0]!r} (a {model_type} config needs it)") from None
        # transformers >= 5 nests rope_theta and the scaling into rope_parameters.
        rope = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        window = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            window = None
        if window is not None and window >= int(config.get("max_position_embeddings", 2048)):
            window = None
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {hidden_act!r} is not supported (Llama family needs 'silu')")
        args.update(
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            sliding_window=None if window is None else int(window),
            hidden_act=hidden_act,
        )
        if args["num_attention_heads"] % args["num_key_value_heads"]:
            raise ModelFormatError(
                f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads "
                f"{args['num_key_value_heads']}"
            )
        rope_inv_freq(args["head_dim"], args["rope_theta"], scaling)  # refuses unknown rope types
        return cls(**args)

    @property
    def n_neurons(self):
        return self.intermediate_size

    @property
    def ffn_activation(self):
        return "silu"


def sanitize(weights):
    """Drop tensors the forward pass does not use (rotary buffers, a head duplicating a tied embedding)."""
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


@dataclass
class _Layer:
    input_norm: np.ndarray       # (d,) float32
    post_norm: np.ndarray        # (d,) float32
    wq: np.ndarray               # (n_heads * head_dim, d)
    wk: np.ndarray               # (n_kv_heads * head_dim, d)
    wv: np.ndarray               # (n_kv_heads * head_dim, d)
    wo: np.ndarray               # (d, n_heads * head_dim)
    bq: Optional[np.ndarray]     # (n_heads * head_dim,) float32 | None (qwen2)
    bk: Optional[np.ndarray]
    bv: Optional[np.ndarray]
    bo: Optional[np.ndarray]


class Model:
    """forward(ids (T,), kv) -> logits (T, vocab) float32; positions come from kv.length."""

    def __init__(self, args, weights, ffn, linear):
        self.args = args
        self.ffn = ffn
        self.linear = linear
        w = sanitize(weights)

        def get(name, float32=False, optional=False):
            if name not in w:
                if optional:
                    return None
                raise ModelFormatError(f"weights are missing {name!r} (a {args.model_type} checkpoint has it)")
            a = w[name]
            return np.asarray(a, dtype=np.float32) if float32 else a

        self.embed_tokens = get("model.embed_tokens.weight")  # (vocab, d) float16|float32
        self.norm = get("model.norm.weight", float32=True)     # (d,) float32
        head = get("lm_head.weight", optional=True)
        self.lm_head = self.embed_tokens if (head is None or args.tie_word_embeddings) else head  # (vocab, d)
        self.layers = []
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(_Layer(
                input_norm=get(p + "input_layernorm.weight", float32=True),
                post_norm=get(p + "post_attention_layernorm.weight", float32=True),
                wq=get(a + "q_proj.weight"), wk=get(a + "k_proj.weight"),
                wv=get(a + "v_proj.weight"), wo=get(a + "o_proj.weight"),
                bq=get(a + "q_proj.bias", True, True), bk=get(a + "k_proj.bias", True, True),
                bv=get(a + "v_proj.bias", True, True), bo=get(a + "o_proj.bias", True, True),
            ))
        self.rope = Rope(args.head_dim, args.rope_theta, args.rope_scaling,
                         n_positions=min(args.max_position_embeddings, 4096))
        self.scale = args.head_dim ** -0.5

    def make_cache(self, max_seq, dtype=np.float32):
        a = self.args
        return KVCache(a.num_hidden_layers, max_seq, a.num_key_value_heads, a.head_dim, dtype)

    def attention(self, i, x, kv):
        """x (T, d) normed -> (T, d): the attention block of layer i (o_proj applied)."""
        a, L, lin = self.args, self.layers[i], self.linear
        T, start = x.shape[0], kv.length
        q = lin(L.wq, x, L.bq).reshape(T, a.num_attention_heads, a.head_dim)
        k = lin(L.wk, x, L.bk).reshape(T, a.num_key_value_heads, a.head_dim)
        v = lin(L.wv, x, L.bv).reshape(T, a.num_key_value_heads, a.head_dim)
        self.rope.apply_(q, start)
        self.rope.apply_(k, start)
        keys, values = kv.append(i, k, v)
        out = attention(q, keys, values, start, self.scale, a.sliding_window)
        return lin(L.wo, out, L.bo)

    def forward(self, ids, kv, last_only=False):
        """ids (T,) int -> logits (T, vocab) float32 (or (1, vocab) with last_only, for prefill).

        Appends the T positions to kv (GenerationError if they do not fit).
        """
        a = self.args
        ids = np.asarray(ids)
        kv.check_room(len(ids))
        x = embed(self.embed_tokens, ids)  # (T, d) float32, the residual stream
        for i, L in enumerate(self.layers):
            x += self.attention(i, rms_norm(x, L.input_norm, a.rms_norm_eps), kv)
            x += self.ffn(i, rms_norm(x, L.post_norm, a.rms_norm_eps))
        kv.advance(len(ids))
        if last_only:
            x = x[-1:]
        return self.linear(self.lm_head, rms_norm(x, self.norm, a.rms_norm_eps))

    __call__ = forward
