"""The Llama family (model_type llama, mistral, qwen2, bamboo; SmolLM is llama): everything
flashrt knows about it.

    ModelArgs.from_dict   the one validator of a config (converters and the runtime call it)
    tensors(args)         the tensor-name table: resident tensors and FFN parts, with shapes
    GGUF_NAMES            llama.cpp's tensor names -> Hugging Face's
    sanitize(weights)     drop tensors the forward pass does not use
    ffn_spec(args, w)     the FFN's kind (gated, its activation, no biases); FFN_PARTS its bundle parts
    Model                 the forward pass

RMSNorm -> attention (RoPE, GQA, optional q/k/v biases, optional sliding window) ->
residual -> RMSNorm -> FFN (the injected interface, gated) -> residual; final
RMSNorm; head. Weights use Hugging Face state-dict names and layouts.

The FFN is down(act(gate.x) * up.x) with `hidden_act` one of ACTIVATIONS: silu (SwiGLU),
relu (ReLU-fied Llama: ReluLLaMA), gelu (erf) / gelu_pytorch_tanh (GeGLU), fatrelu
(ProSparse: act(v) = v if v > hidden_act_param else 0). model_type "bamboo" (TurboSparse-
Mistral, Bamboo: their config says hidden_act "relu") is dReLU: relu(gate.x) * relu(up.x).
"""

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from flashrt._core import kernels
from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.ffn.base import FFNSpec
from flashrt.ffn.layout import GATED_PARTS
from flashrt.kv_cache import KVCache
from flashrt.linear import KernelLinear
from flashrt.models.base import Rope, attention, embed, fuse_rows, rms_norm, weight_getter
from flashrt.quant import QMatrix
from flashrt.models.config import DecoderArgs, check_family, config_int, decoder_fields, read_activation

ARCHITECTURE = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2", "bamboo")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # llama.cpp's general.architecture -> HF model_type
FFN_PARTS = GATED_PARTS
EMBED_NAME = "model.embed_tokens.weight"
# HF hidden_act -> the FFN's activation (ffn.base.ACT_CODES); "bamboo" turns relu into drelu
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "fatrelu": "fatrelu"}
DRELU_MODEL_TYPES = ("bamboo",)  # relu on both gate and up (PowerInfer's modeling_bamboo.py)
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


@dataclass(kw_only=True)
class ModelArgs(DecoderArgs):
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    hidden_act_param: float = 0.0   # fatrelu's threshold
    MODEL_TYPES: ClassVar[tuple] = MODEL_TYPES  # a variant family subclasses ModelArgs and sets these two
    ACTIVATIONS: ClassVar[dict] = ACTIVATIONS

    @classmethod
    def from_dict(cls, config, where="config", warn=False):
        """Keep the HF config.json keys this family uses (transformers 4 or 5 spellings);
        UnsupportedModelError for what flashrt does not implement, ModelFormatError for a
        config that cannot work. warn: say what the options mean at run time (converters)."""
        model_type = check_family(config, where, cls.MODEL_TYPES, REQUIRED)
        hidden_act = read_activation(config, where, model_type, cls.ACTIVATIONS)
        if model_type in DRELU_MODEL_TYPES and hidden_act != "relu":
            raise UnsupportedModelError(f"{where}: a {model_type} model is dReLU, its hidden_act must be 'relu', "
                                        f"got {hidden_act!r}")
        act_param = config.get("hidden_act_param", 0.0) if hidden_act == "fatrelu" else 0.0
        if (isinstance(act_param, bool) or not isinstance(act_param, (int, float))
                or not np.isfinite(act_param)):
            raise ModelFormatError(f"{where}: hidden_act_param (fatrelu's threshold) must be a finite number, "
                                   f"got {act_param!r}")
        if config.get("mlp_bias"):
            raise UnsupportedModelError(f"{where}: mlp_bias=True is not supported")
        if config.get("attention_bias") and model_type != "qwen2":
            raise UnsupportedModelError(f"{where}: attention_bias=True is not supported for {model_type}")
        fields = decoder_fields(config, where, model_type)
        window = config.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            window = None
        if window is not None and config_int(config, "sliding_window", where) >= fields["max_position_embeddings"]:
            window = None
        if warn and window is not None:
            warnings.warn(f"{where}: sliding_window={window}: each token attends to the last {window} "
                          f"positions only, as {model_type} does", stacklevel=3)
        return cls(**fields,
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                   attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                   sliding_window=None if window is None else int(window),
                   hidden_act=hidden_act, hidden_act_param=float(act_param))

    def to_config(self, config):
        """The config a converter writes into the manifest: the HF config with the keys the
        runtime relies on filled in (rope normalised)."""
        cfg = dict(config)
        cfg["num_key_value_heads"] = self.num_key_value_heads
        cfg["head_dim"] = self.head_dim
        cfg["rope_theta"], cfg["rope_scaling"] = self.rope_theta, self.rope_scaling
        cfg["hidden_act"] = self.hidden_act
        if self.hidden_act == "fatrelu":
            cfg["hidden_act_param"] = self.hidden_act_param
        cfg.setdefault("rms_norm_eps", 1e-6)
        cfg.setdefault("max_position_embeddings", 2048)
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
        return cfg

    @property
    def ffn_act(self):
        """The FFN's activation (a name of ffn.base.ACT_CODES): drelu for bamboo."""
        if self.model_type in DRELU_MODEL_TYPES:
            return "drelu"
        acts = self.ACTIVATIONS  # a dict (HF name -> FFN name), or a tuple of FFN names (a variant family)
        return acts[self.hidden_act] if isinstance(acts, dict) else self.hidden_act


def tensors(args):
    """The tensor-name table: (resident {HF name: shape}, ffn [per layer {part: (HF name, shape)}])."""
    d, n_ff, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q_dim = args.num_attention_heads * hd
    kv_dim = args.num_key_value_heads * hd
    qkv_bias = args.model_type == "qwen2"
    resident = {EMBED_NAME: (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_word_embeddings:
        resident["lm_head.weight"] = (args.vocab_size, d)
    ffn = []
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        resident[p + "input_layernorm.weight"] = (d,)
        resident[p + "post_attention_layernorm.weight"] = (d,)
        resident[p + "self_attn.q_proj.weight"] = (q_dim, d)
        resident[p + "self_attn.k_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.v_proj.weight"] = (kv_dim, d)
        resident[p + "self_attn.o_proj.weight"] = (d, q_dim)
        if qkv_bias:
            resident[p + "self_attn.q_proj.bias"] = (q_dim,)
            resident[p + "self_attn.k_proj.bias"] = (kv_dim,)
            resident[p + "self_attn.v_proj.bias"] = (kv_dim,)
        ffn.append({"gate": (p + "mlp.gate_proj.weight", (n_ff, d)),
                    "up": (p + "mlp.up_proj.weight", (n_ff, d)),
                    "down": (p + "mlp.down_proj.weight", (d, n_ff))})
    return resident, ffn


# llama.cpp (GGUF) tensor names -> Hugging Face ("{}" is the layer)
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",   # qwen2
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def sanitize(weights):
    """Drop tensors the forward pass does not use (rotary buffers)."""
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def ffn_spec(args, weights):
    """A gated FFN without biases, with the config's activation (and fatrelu's threshold)."""
    return FFNSpec(gated=True, act=args.ffn_act, up_bias=None, down_bias=None, act_param=args.hidden_act_param)


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
    q_norm: Optional[np.ndarray] = None  # (head_dim,) float32 | None: RMSNorm of each q head (qwen3)
    k_norm: Optional[np.ndarray] = None  # (head_dim,) float32 | None: RMSNorm of each k head (qwen3)
    # decode: q, k, v as row blocks of one matrix (base.fuse_rows), made at the layer's first
    # decode step (wq, wk, wv then become views of it, so the separate arrays are freed one
    # layer at a time); False where they cannot be fused
    wqkv: object = None          # ((n_heads + 2 * n_kv_heads) * head_dim, d) | False | None (not yet)
    bqkv: Optional[np.ndarray] = None  # its bias, float32, or None


class Model:
    """forward(ids (T,), kv) -> logits (T, vocab) float32; positions come from kv.length.

    QK_NORM: the attention normalises each head of q and k (RMSNorm over head_dim) before
    RoPE (Qwen3 sets it; its checkpoints then must hold self_attn.{q,k}_norm.weight).
    """

    QK_NORM: ClassVar[bool] = False

    def __init__(self, args, weights, ffn, linear):
        self.args = args
        self.ffn = ffn
        self.linear = linear
        get = weight_getter(sanitize(weights), f"a {args.model_type} checkpoint")

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
                q_norm=get(a + "q_norm.weight", True) if self.QK_NORM else None,
                k_norm=get(a + "k_norm.weight", True) if self.QK_NORM else None,
            ))
        self.rope = Rope(args.head_dim, args.rope_theta, args.rope_scaling,
                         n_positions=min(args.max_position_embeddings, 4096))
        self.scale = args.head_dim ** -0.5
        self.fuse_qkv = True  # decode: q, k, v in one GEMV (False: three, the reference path)
        self.step_kernel = True  # decode: one kernels.attn_step per layer (False: the separate calls)
        self._step_scratch = None  # decode: kernels.attn_step's buffers (False: it cannot run here)

    def make_cache(self, max_seq, dtype=np.float32):
        a = self.args
        return KVCache(a.num_hidden_layers, max_seq, a.num_key_value_heads, a.head_dim, dtype)

    def attention(self, i, x, kv):
        """x (T, d) normed -> (T, d): the attention block of layer i (o_proj applied)."""
        a, L, lin = self.args, self.layers[i], self.linear
        T, start = x.shape[0], kv.length
        if T == 1 and self.fuse_qkv:
            self._fuse(L)
        if T == 1 and self.fuse_qkv and L.wqkv is not False:  # one GEMV for the three
            nq, nk = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
            qkv = lin(L.wqkv, x, L.bqkv)[0]
            q = qkv[:nq].reshape(1, a.num_attention_heads, a.head_dim)
            k = qkv[nq:nq + nk].reshape(1, a.num_key_value_heads, a.head_dim)
            v = qkv[nq + nk:].reshape(1, a.num_key_value_heads, a.head_dim)
        else:
            q = lin(L.wq, x, L.bq).reshape(T, a.num_attention_heads, a.head_dim)
            k = lin(L.wk, x, L.bk).reshape(T, a.num_key_value_heads, a.head_dim)
            v = lin(L.wv, x, L.bv).reshape(T, a.num_key_value_heads, a.head_dim)
        if L.q_norm is not None:  # per head, over head_dim, before RoPE (qwen3)
            q = rms_norm(q, L.q_norm, a.rms_norm_eps)
            k = rms_norm(k, L.k_norm, a.rms_norm_eps)
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
        if len(ids) == 1 and self._step_kernel_ok(kv):
            self._decode_layers(x[0], kv)
        else:
            for i, L in enumerate(self.layers):
                x += self.attention(i, rms_norm(x, L.input_norm, a.rms_norm_eps), kv)
                x += self.ffn(i, rms_norm(x, L.post_norm, a.rms_norm_eps))
        kv.advance(len(ids))
        if last_only:
            x = x[-1:]
        return self.linear(self.lm_head, rms_norm(x, self.norm, a.rms_norm_eps))

    __call__ = forward

    # ------------------------------------------------------------------ one decode step

    @staticmethod
    def _fuse(L):
        """Make L's fused q/k/v matrix (base.fuse_rows) once, at its first decode step."""
        if L.wqkv is None:
            fused = fuse_rows([L.wq, L.wk, L.wv], [L.bq, L.bk, L.bv])
            L.wqkv = False if fused is None else fused[0]
            if fused is not None:
                (L.wq, L.wk, L.wv), L.bqkv = fused[1], fused[2]

    def _step_kernel_ok(self, kv):
        """Can this decode step run kernels.attn_step? Its products must be the kernels'
        (a KernelLinear), the cache float32, the q/k/v matrices fused and no per-head norm."""
        if not (self.step_kernel and self.fuse_qkv and not self.QK_NORM and isinstance(self.linear, KernelLinear)
                and kv.dtype == np.float32 and kv.k.flags.c_contiguous and kv.v.flags.c_contiguous):
            return False
        if self._step_scratch is None:
            for L in self.layers:
                self._fuse(L)
                if L.wqkv is False or not all(_kernel_weights(W) for W in (L.wqkv, L.wo)):
                    self._step_scratch = False
                    return False
            a = self.args
            nq, nk = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
            weights = [_kernel_weights(L.wqkv) + _kernel_weights(L.wo) for L in self.layers]
            self._step_scratch = (np.empty(nq + 2 * nk, np.float32), np.empty(nq, np.float32),
                                  np.empty(a.hidden_size, np.float32), weights)  # qkv, att, o; per layer (Wqkv, qtype, Wo, qtype)
        return self._step_scratch is not False

    def _decode_layers(self, x, kv):
        """Every layer for one token, x (d,) float32 the residual stream (updated in place):
        per layer one kernels.attn_step (norm, q/k/v, RoPE, KV write, attention, o_proj,
        residual, norm: the operations of attention() and forward's loop, bit for bit) and
        the FFN, whose output the next step adds."""
        a, pos = self.args, kv.length
        qkv, att, o, weights = self._step_scratch
        cos, sin = self.rope.row(pos)
        window = a.sliding_window
        first = pos + 1 - window if window is not None and pos + 1 > window else 0
        n_threads = self.linear.threads()
        y = None
        for i, (L, (wqkv, tqkv, wo, to)) in enumerate(zip(self.layers, weights)):
            xn = np.empty(a.hidden_size, np.float32)  # the FFN's input (new: an FFN may keep it)
            kernels.attn_step(x, y, L.input_norm, L.post_norm, a.rms_norm_eps, wqkv, tqkv, L.bqkv,
                              wo, to, L.bo, a.num_attention_heads, cos, sin, kv.k[i], kv.v[i],
                              pos, first, self.scale, qkv, att, o, xn, n_threads)
            y = self.ffn(i, xn[None])[0]
        x += y


def _kernel_weights(W):
    """(array, qtype) as the kernels take a weight matrix, or None for one they do not."""
    if isinstance(W, QMatrix):
        return W.data, W.qtype
    if isinstance(W, np.ndarray) and W.ndim == 2 and W.dtype in (np.float16, np.float32) and W.flags.c_contiguous:
        return W, None
    return None
