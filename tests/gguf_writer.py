"""A tiny llama checkpoint in HF layout, written as a GGUF the way llama.cpp's converter does
(GGUF names, Q/K rows permuted, F32 or quantized data): the source the GGUF converter tests,
the model-cache tests and the fuzzer convert. Oracle for the permutation: llama.cpp's own."""
import gguf
import numpy as np
from gguf.quants import quantize


def llamacpp_permute(weights, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (NumPy for torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))



# -- a tiny llama GGUF built from an HF-layout checkpoint ---------------------------------
def tiny_hf_llama(seed=0, n_layers=2, d=32, n_ff=48, heads=4, kv=2, vocab=40):
    rng = np.random.default_rng(seed)
    hd = d // heads

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": w(d)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": w(d), p + "post_attention_layernorm.weight": w(d),
              p + "self_attn.q_proj.weight": w(heads * hd, d),
              p + "self_attn.k_proj.weight": w(kv * hd, d),
              p + "self_attn.v_proj.weight": w(kv * hd, d),
              p + "self_attn.o_proj.weight": w(d, heads * hd),
              p + "mlp.gate_proj.weight": w(n_ff, d), p + "mlp.up_proj.weight": w(n_ff, d),
              p + "mlp.down_proj.weight": w(d, n_ff)}
    return dict(n_layers=n_layers, d=d, n_ff=n_ff, heads=heads, kv=kv, vocab=vocab), t


def write_llama_gguf(path, hp, t, arch="llama", untied_head=None, q8_names=(), extra=None,
                     qtypes=None):
    """What llama.cpp's converter does: GGUF names, Q/K rows permuted, F32 (or Q8_0) data;
    qtypes: {HF name: GGMLQuantizationType} for tensors stored quantized."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if extra:
        extra(w)
    w.add_block_count(hp["n_layers"])
    w.add_context_length(256)
    w.add_embedding_length(hp["d"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(20000.0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(hp["n_layers"]):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf, g in names.items():
        a = t[hf]
        if hf.endswith("q_proj.weight"):
            a = llamacpp_permute(a, hp["heads"], hp["heads"])
        elif hf.endswith("k_proj.weight"):
            a = llamacpp_permute(a, hp["heads"], hp["kv"])
        qt = gguf.GGMLQuantizationType.Q8_0 if hf in q8_names else (qtypes or {}).get(hf)
        if qt is not None:
            w.add_tensor(g, quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, a)
    if untied_head is not None:
        w.add_tensor("output.weight", untied_head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
