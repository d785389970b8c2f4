"""OPT (pre-LayerNorm variants: do_layer_norm_before=True): everything flashrt knows about it.

    ModelArgs.from_dict   the one validator of a config (converters and the runtime call it)
    tensors(args)         the tensor-name table: resident tensors and FFN parts, with shapes
    sanitize(weights)     HF names normalised to `model.decoder....`
    ffn_spec(args, w)     the FFN's kind (ReLU or GELU, fc1/fc2 biases); FFN_PARTS its bundle parts
    Model                 the forward pass

token + learned position embeddings (offset 2) -> per layer: LayerNorm -> attention
(biases, q scaled by head_dim**-0.5) -> residual -> LayerNorm -> FFN (the injected
interface; fc1/fc2 biases are the FFN's) -> residual; final LayerNorm; head (tied).
"""

from dataclasses import dataclass

import numpy as np

from flashrt.errors import GenerationError, UnsupportedModelError
from flashrt.ffn.base import FFNSpec
from flashrt.ffn.layout import RELU_PARTS
from flashrt.kv_cache import KVCache
from flashrt.models.base import attention, embed, layer_norm, weight_getter
from flashrt.models.config import check_family, config_int, read_activation

ARCHITECTURE = "opt"
MODEL_TYPES = ("opt",)
FFN_PARTS = RELU_PARTS
EMBED_NAME = "model.decoder.embed_tokens.weight"
GGUF_NAMES = None  # flashrt converts OPT from Hugging Face checkpoints only
POSITION_OFFSET = 2  # HF OPTLearnedPositionalEmbedding
LAYER_NORM_EPS = 1e-5
ACTIVATIONS = ("relu", "gelu")
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "ffn_dim")


@dataclass
class ModelArgs:
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    model_type: str = "opt"

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        """Keep the HF config.json keys OPT uses; UnsupportedModelError for the variants
        flashrt does not implement, ModelFormatError for a config that cannot work."""
        check_family(config, where, MODEL_TYPES, REQUIRED, family="OPT")
        hidden = config_int(config, "hidden_size", where)
        if not config.get("do_layer_norm_before", True):
            raise UnsupportedModelError(
                f"{where}: OPT with do_layer_norm_before=False (post-LN, e.g. opt-350m) is not supported")
        wdim = config_int(config, "word_embed_proj_dim", where, hidden)
        if wdim != hidden:
            raise UnsupportedModelError(
                f"{where}: OPT with project_in/project_out (word_embed_proj_dim={wdim} != "
                f"hidden_size={hidden}) is not supported")
        if config.get("_remove_final_layer_norm"):
            raise UnsupportedModelError(f"{where}: OPT with _remove_final_layer_norm=True is not supported")
        if not config.get("enable_bias", True) or not config.get("layer_norm_elementwise_affine", True):
            raise UnsupportedModelError(
                f"{where}: OPT without biases or without affine LayerNorms is not supported")
        act = read_activation(config, where, "OPT", ACTIVATIONS, keys=("activation_function",))
        return cls(
            hidden_size=hidden,
            ffn_dim=config_int(config, "ffn_dim", where),
            num_hidden_layers=config_int(config, "num_hidden_layers", where),
            num_attention_heads=config_int(config, "num_attention_heads", where),
            vocab_size=config_int(config, "vocab_size", where),
            max_position_embeddings=config_int(config, "max_position_embeddings", where, 2048),
            activation_function=act,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        )

    def to_config(self, config):
        """The config a converter writes into the manifest: the HF config with the keys the
        runtime relies on filled in."""
        cfg = dict(config)
        cfg.setdefault("num_key_value_heads", self.num_attention_heads)
        if cfg["num_key_value_heads"] is None:
            cfg["num_key_value_heads"] = self.num_attention_heads
        if cfg.get("head_dim") is None:
            cfg["head_dim"] = self.head_dim
        cfg["activation_function"] = self.activation_function
        cfg.setdefault("max_position_embeddings", 2048)
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("do_layer_norm_before", True)
        return cfg

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self):
        return self.num_attention_heads

    @property
    def n_neurons(self):
        return self.ffn_dim

    @property
    def ffn_act(self):
        """The FFN's activation (a name of ffn.base.ACT_CODES)."""
        return self.activation_function


def tensors(args):
    """The tensor-name table: (resident {HF name: shape}, ffn [per layer {part: (HF name, shape)}])."""
    d, n_ff = args.hidden_size, args.ffn_dim
    resident = {EMBED_NAME: (args.vocab_size, d),
                "model.decoder.embed_positions.weight": (args.max_position_embeddings + POSITION_OFFSET, d),
                "model.decoder.final_layer_norm.weight": (d,),
                "model.decoder.final_layer_norm.bias": (d,)}
    if not args.tie_word_embeddings:
        resident["lm_head.weight"] = (args.vocab_size, d)
    ffn = []
    for i in range(args.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            resident[p + f"self_attn.{proj}.weight"] = (d, d)
            resident[p + f"self_attn.{proj}.bias"] = (d,)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            resident[p + f"{ln}.weight"] = (d,)
            resident[p + f"{ln}.bias"] = (d,)
        resident[p + "fc1.bias"] = (n_ff,)
        resident[p + "fc2.bias"] = (d,)
        ffn.append({"up": (p + "fc1.weight", (n_ff, d)),
                    "down": (p + "fc2.weight", (d, n_ff))})
    return resident, ffn


def sanitize(weights):
    """Normalise HF OPT names to `model.decoder....` (hub checkpoints often lack `model.`)."""
    out = {}
    for k, v in weights.items():
        if k.startswith("decoder."):
            k = "model." + k
        out[k] = v
    return out


def ffn_spec(args, weights):
    """A ReLU/GELU FFN with fc1 (up) and fc2 (down) biases, per layer float32."""
    def bias(i, name):
        return np.ascontiguousarray(weights[f"model.decoder.layers.{i}.{name}.bias"], np.float32)

    n = args.num_hidden_layers
    return FFNSpec(gated=False, act=args.activation_function,
                   up_bias=[bias(i, "fc1") for i in range(n)], down_bias=[bias(i, "fc2") for i in range(n)])


@dataclass
class _Layer:
    ln1_w: np.ndarray   # (d,) float32  self_attn_layer_norm
    ln1_b: np.ndarray
    ln2_w: np.ndarray   # (d,) float32  final_layer_norm (before the FFN)
    ln2_b: np.ndarray
    wq: np.ndarray      # (d, d)
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray      # (d, d) out_proj
    bq: np.ndarray      # (d,) float32
    bk: np.ndarray
    bv: np.ndarray
    bo: np.ndarray


class Model:
    """forward(ids (T,), kv) -> logits (T, vocab) float32; positions come from kv.length."""

    def __init__(self, args, weights, ffn, linear):
        self.args = args
        self.ffn = ffn
        self.linear = linear
        w = sanitize(weights)
        if "model.decoder.project_in.weight" in w or "model.decoder.project_out.weight" in w:
            raise UnsupportedModelError("OPT with project_in/project_out is not supported")
        get = weight_getter(w, "an OPT checkpoint")

        d = "model.decoder."
        self.embed_tokens = get(d + "embed_tokens.weight")        # (vocab, d)
        self.embed_positions = get(d + "embed_positions.weight")  # (max_pos + 2, d)
        self.final_ln_w = get(d + "final_layer_norm.weight", True)
        self.final_ln_b = get(d + "final_layer_norm.bias", True)
        head = w.get("lm_head.weight")
        self.lm_head = self.embed_tokens if (head is None or args.tie_word_embeddings) else head
        self.layers = []
        for i in range(args.num_hidden_layers):
            p = f"{d}layers.{i}."
            a = p + "self_attn."
            self.layers.append(_Layer(
                ln1_w=get(p + "self_attn_layer_norm.weight", True), ln1_b=get(p + "self_attn_layer_norm.bias", True),
                ln2_w=get(p + "final_layer_norm.weight", True), ln2_b=get(p + "final_layer_norm.bias", True),
                wq=get(a + "q_proj.weight"), wk=get(a + "k_proj.weight"),
                wv=get(a + "v_proj.weight"), wo=get(a + "out_proj.weight"),
                bq=get(a + "q_proj.bias", True), bk=get(a + "k_proj.bias", True),
                bv=get(a + "v_proj.bias", True), bo=get(a + "out_proj.bias", True),
            ))
        self.scale = args.head_dim ** -0.5

    def make_cache(self, max_seq, dtype=np.float32):
        a = self.args
        max_seq = min(max_seq, a.max_position_embeddings)  # learned positions end there
        return KVCache(a.num_hidden_layers, max_seq, a.num_attention_heads, a.head_dim, dtype)

    def attention(self, i, x, kv):
        """x (T, d) normed -> (T, d): the attention block of layer i (out_proj applied)."""
        a, L, lin = self.args, self.layers[i], self.linear
        T, start = x.shape[0], kv.length
        shape = (T, a.num_attention_heads, a.head_dim)
        q = lin(L.wq, x, L.bq).reshape(shape)
        q *= np.float32(self.scale)  # HF scales q (bias included) before q @ k.T
        k = lin(L.wk, x, L.bk).reshape(shape)
        v = lin(L.wv, x, L.bv).reshape(shape)
        keys, values = kv.append(i, k, v)
        out = attention(q, keys, values, start, 1.0)
        return lin(L.wo, out, L.bo)

    def forward(self, ids, kv, last_only=False):
        """ids (T,) int -> logits (T, vocab) float32 (or (1, vocab) with last_only, for prefill)."""
        ids = np.asarray(ids)
        T, start = len(ids), kv.length
        kv.check_room(T)
        if start + T > self.args.max_position_embeddings:
            raise GenerationError(
                f"context full: OPT has learned positions for {self.args.max_position_embeddings} tokens, "
                f"asked for {start + T}"
            )
        x = embed(self.embed_tokens, ids)  # (T, d) float32, the residual stream
        x += self.embed_positions[start + POSITION_OFFSET:start + T + POSITION_OFFSET]
        for i, L in enumerate(self.layers):
            x += self.attention(i, layer_norm(x, L.ln1_w, L.ln1_b, LAYER_NORM_EPS), kv)
            x += self.ffn(i, layer_norm(x, L.ln2_w, L.ln2_b, LAYER_NORM_EPS))
        kv.advance(T)
        if last_only:
            x = x[-1:]
        return self.linear(self.lm_head, layer_norm(x, self.final_ln_w, self.final_ln_b, LAYER_NORM_EPS))

    __call__ = forward
