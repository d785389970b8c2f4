"""The Phi family (model_type phi: Phi-1, Phi-1.5, Phi-2): everything flashrt knows about it.

A parallel block: one LayerNorm feeds both the attention and the FFN, and both outputs join
the residual together (x + attn(ln(x)) + ffn(ln(x))). Attention has q/k/v and output biases
and rotates only the first partial_rotary_factor of each head (Phi-2: 32 of 80 dims). The FFN
is fc1 -> gelu_new (tanh GELU) -> fc2, with biases, not gated. The head has a bias.

    ModelArgs.from_dict   the one validator of a config
    tensors(args)         the tensor-name table: resident tensors and FFN parts, with shapes
    GGUF_NAMES            llama.cpp's tensor names (phi2; its attn_qkv is split by `fused`)
    fused(args)           the row blocks of a fused q/k/v matrix and bias (GGUF)
    sanitize(weights)     drop tensors the forward pass does not use
    ffn_spec(args, w)     up/down with biases, tanh GELU; FFN_PARTS its bundle parts
    Model                 the forward pass
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.ffn.base import FFNSpec
from flashrt.ffn.layout import RELU_PARTS
from flashrt.kv_cache import KVCache
from flashrt.models.base import Rope, attention, embed, fused_qkv, layer_norm, weight_getter
from flashrt.models.config import DecoderArgs, check_family, decoder_fields, read_activation

ARCHITECTURE = "phi"
MODEL_TYPES = ("phi",)
GGUF_ARCHITECTURES = {"phi2": "phi"}
FFN_PARTS = RELU_PARTS
EMBED_NAME = "model.embed_tokens.weight"
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


@dataclass(kw_only=True)
class ModelArgs(DecoderArgs):
    rotary_dim: int                  # the rotated leading dims of each head
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_tanh"    # the kernels' name

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        model_type = check_family(config, where, MODEL_TYPES, REQUIRED, family="Phi")
        act = read_activation(config, where, model_type, ACTIVATIONS, default="gelu_new")
        if config.get("qk_layernorm"):
            raise UnsupportedModelError(f"{where}: qk_layernorm=True is not supported for phi")
        fields = decoder_fields(config, where, model_type)
        rp = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        partial = rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ModelFormatError(f"{where}: partial_rotary_factor must be in (0, 1], got {partial!r}")
        rotary_dim = int(fields["head_dim"] * partial)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ModelFormatError(f"{where}: partial_rotary_factor {partial} gives {rotary_dim} rotated "
                                   f"dims per head; it must be even and at least 2")
        return cls(**fields, rotary_dim=rotary_dim, layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                   hidden_act=ACTIVATIONS[act])

    def to_config(self, config):
        cfg = {k: v for k, v in config.items() if k != "rope_parameters"}
        cfg.update(num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                   partial_rotary_factor=self.rotary_dim / self.head_dim, rope_theta=self.rope_theta,
                   rope_scaling=self.rope_scaling, layer_norm_eps=self.layer_norm_eps,
                   max_position_embeddings=self.max_position_embeddings,
                   tie_word_embeddings=self.tie_word_embeddings)
        return cfg


def tensors(args):
    """The tensor-name table: (resident {HF name: shape}, ffn [per layer {part: (HF name, shape)}])."""
    d, n_ff, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q_dim, kv_dim = args.num_attention_heads * hd, args.num_key_value_heads * hd
    resident = {EMBED_NAME: (args.vocab_size, d), "model.final_layernorm.weight": (d,),
                "model.final_layernorm.bias": (d,), "lm_head.bias": (args.vocab_size,)}
    if not args.tie_word_embeddings:
        resident["lm_head.weight"] = (args.vocab_size, d)
    ffn = []
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        resident |= {p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                     a + "q_proj.weight": (q_dim, d), a + "q_proj.bias": (q_dim,),
                     a + "k_proj.weight": (kv_dim, d), a + "k_proj.bias": (kv_dim,),
                     a + "v_proj.weight": (kv_dim, d), a + "v_proj.bias": (kv_dim,),
                     a + "dense.weight": (d, q_dim), a + "dense.bias": (d,),
                     p + "mlp.fc1.bias": (n_ff,), p + "mlp.fc2.bias": (d,)}
        ffn.append({"up": (p + "mlp.fc1.weight", (n_ff, d)), "down": (p + "mlp.fc2.weight", (d, n_ff))})
    return resident, ffn


# llama.cpp (GGUF) tensor names -> Hugging Face (its phi2 converter keeps q/k/v separate or fuses
# them into attn_qkv, depending on the checkpoint; `fused` splits the latter)
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.final_layernorm.weight",
    "output_norm.bias": "model.final_layernorm.bias",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_norm.bias": "model.layers.{}.input_layernorm.bias",
    "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv.weight",
    "blk.{}.attn_qkv.bias": "model.layers.{}.self_attn.qkv.bias",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.dense.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.dense.bias",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.fc1.weight",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.fc1.bias",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.fc2.weight",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.fc2.bias",
}


def fused(args):
    """{fused name: [(part name, rows), ...]}: a GGUF's attn_qkv weight and bias as q, k, v."""
    return fused_qkv(args, "model.layers.{}.self_attn.", "qkv", ("q_proj", "k_proj", "v_proj"), ("weight", "bias"))


def gguf_config(get, arch, n_layers):
    """phi2 GGUF metadata beyond llama's: LayerNorm eps, the rotated dims, gelu_new."""
    cfg = {"hidden_act": "gelu_new", "layer_norm_eps": get("attention.layer_norm_epsilon", 1e-5)}
    head_dim = get("attention.key_length", None) or get("embedding_length") // get("attention.head_count")
    rot = get("rope.dimension_count", None)
    if rot is not None:
        cfg["partial_rotary_factor"] = rot / head_dim
    return cfg


def sanitize(weights):
    """Drop tensors the forward pass does not use (rotary buffers)."""
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def ffn_spec(args, weights):
    """fc1 (up) and fc2 (down) with biases, per layer float32; not gated."""
    def bias(i, name):
        return np.ascontiguousarray(weights[f"model.layers.{i}.mlp.{name}.bias"], np.float32)

    n = args.num_hidden_layers
    return FFNSpec(gated=False, act=args.hidden_act, up_bias=[bias(i, "fc1") for i in range(n)],
                   down_bias=[bias(i, "fc2") for i in range(n)])


@dataclass
class _Layer:
    ln_w: np.ndarray             # (d,) float32
    ln_b: Optional[np.ndarray]   # (d,) float32
    wq: np.ndarray               # (n_heads * head_dim, d)
    wk: np.ndarray               # (n_kv_heads * head_dim, d)
    wv: np.ndarray               # (n_kv_heads * head_dim, d)
    wo: np.ndarray               # (d, n_heads * head_dim)
    bq: Optional[np.ndarray]     # (n_heads * head_dim,) float32 | None
    bk: Optional[np.ndarray]
    bv: Optional[np.ndarray]
    bo: Optional[np.ndarray]     # (d,) float32 | None


class Model:
    """forward(ids (T,), kv) -> logits (T, vocab) float32; positions come from kv.length.

    NAMES: the checkpoint's tensor names ("{}" the layer); a family with the same parallel block
    under other names (Falcon) subclasses Model and sets them. Biases are optional."""

    NAMES = {"embed": EMBED_NAME, "final_w": "model.final_layernorm.weight",
             "final_b": "model.final_layernorm.bias", "head": "lm_head.weight", "head_b": "lm_head.bias",
             "ln_w": "model.layers.{}.input_layernorm.weight", "ln_b": "model.layers.{}.input_layernorm.bias",
             "q": "model.layers.{}.self_attn.q_proj.", "k": "model.layers.{}.self_attn.k_proj.",
             "v": "model.layers.{}.self_attn.v_proj.", "o": "model.layers.{}.self_attn.dense."}
    CHECKPOINT = "a phi checkpoint"

    def __init__(self, args, weights, ffn, linear):
        self.args = args
        self.ffn = ffn
        self.linear = linear
        N = self.NAMES
        get = weight_getter(sanitize(weights), self.CHECKPOINT)
        self.embed_tokens = get(N["embed"])                      # (vocab, d)
        self.final_w = get(N["final_w"], True)                   # (d,) float32
        self.final_b = get(N["final_b"], True, True)
        head = get(N["head"], optional=True)
        self.lm_head = self.embed_tokens if (head is None or args.tie_word_embeddings) else head
        self.lm_bias = get(N["head_b"], True, True)              # (vocab,) float32 | None
        self.layers = []
        for i in range(args.num_hidden_layers):
            w = {key: get(N[key].format(i) + "weight") for key in "qkvo"}
            b = {key: get(N[key].format(i) + "bias", True, True) for key in "qkvo"}
            self.layers.append(_Layer(
                ln_w=get(N["ln_w"].format(i), True), ln_b=get(N["ln_b"].format(i), True, True),
                wq=w["q"], wk=w["k"], wv=w["v"], wo=w["o"], bq=b["q"], bk=b["k"], bv=b["v"], bo=b["o"]))
        self.rope = Rope(args.rotary_dim, args.rope_theta, args.rope_scaling,
                         n_positions=min(args.max_position_embeddings, 4096))
        self.scale = args.head_dim ** -0.5

    def make_cache(self, max_seq, dtype=np.float32):
        a = self.args
        return KVCache(a.num_hidden_layers, max_seq, a.num_key_value_heads, a.head_dim, dtype)

    def attention(self, i, x, kv):
        """x (T, d) normed -> (T, d): the attention block of layer i (dense applied)."""
        a, L, lin = self.args, self.layers[i], self.linear
        T, start, r = x.shape[0], kv.length, a.rotary_dim
        q = lin(L.wq, x, L.bq).reshape(T, a.num_attention_heads, a.head_dim)
        k = lin(L.wk, x, L.bk).reshape(T, a.num_key_value_heads, a.head_dim)
        v = lin(L.wv, x, L.bv).reshape(T, a.num_key_value_heads, a.head_dim)
        self.rope.apply_(q[..., :r], start)  # in place through the view: the leading dims only
        self.rope.apply_(k[..., :r], start)
        keys, values = kv.append(i, k, v)
        return lin(L.wo, attention(q, keys, values, start, self.scale), L.bo)

    def forward(self, ids, kv, last_only=False):
        """ids (T,) int -> logits (T, vocab) float32 (or (1, vocab) with last_only, for prefill)."""
        a = self.args
        ids = np.asarray(ids)
        kv.check_room(len(ids))
        x = embed(self.embed_tokens, ids)  # (T, d) float32, the residual stream
        for i, L in enumerate(self.layers):
            h = layer_norm(x, L.ln_w, L.ln_b, a.layer_norm_eps)
            x += self.attention(i, h, kv)
            x += self.ffn(i, h)
        kv.advance(len(ids))
        if last_only:
            x = x[-1:]
        return self.linear(self.lm_head, layer_norm(x, self.final_w, self.final_b, a.layer_norm_eps), self.lm_bias)

    __call__ = forward
