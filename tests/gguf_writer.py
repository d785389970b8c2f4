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
    """What llama.cpp's converter does: GGUF names, Q/K rows permuted (the llama architecture
    only: qwen2/qwen3 keep HF's rows), F32 (or Q8_0) data; q/k/v biases and q/k norms when `t`
    has them; qtypes: {HF name: GGMLQuantizationType} for tensors stored quantized.
    hp may also give head_dim, rope_theta and rms_norm_eps."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if extra:
        extra(w)
    w.add_block_count(hp["n_layers"])
    w.add_context_length(256)
    w.add_embedding_length(hp["d"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv"])
    if "head_dim" in hp:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(hp.get("rope_theta", 20000.0))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    optional = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias",                                   # qwen2
                "self_attn.q_norm.weight": "attn_q_norm.weight",
                "self_attn.k_norm.weight": "attn_k_norm.weight"}                          # qwen3
    for i in range(hp["n_layers"]):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
        for hf, g in optional.items():
            if f"model.layers.{i}.{hf}" in t:
                names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"
    permute = arch == "llama"
    for hf, g in names.items():
        a = t[hf]
        if permute and hf.endswith("q_proj.weight"):
            a = llamacpp_permute(a, hp["heads"], hp["heads"])
        elif permute and hf.endswith("k_proj.weight"):
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


def write_hf_fixture_gguf(path, src_dir, arch):
    """A transformers-made checkpoint (tests/fixtures/hf/<name>: config.json + model.safetensors)
    written as a float32 GGUF of llama.cpp architecture `arch`; no tokenizer."""
    import json
    import os

    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    t = load_file(os.path.join(src_dir, "model.safetensors"))
    heads = cfg["num_attention_heads"]
    hp = dict(n_layers=cfg["num_hidden_layers"], d=cfg["hidden_size"], n_ff=cfg["intermediate_size"],
              heads=heads, kv=cfg.get("num_key_value_heads", heads), vocab=cfg["vocab_size"],
              head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg["rms_norm_eps"],
              rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    head = None if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    write_llama_gguf(path, hp, t, arch=arch, untied_head=head)
    return cfg


# -- a vocabulary-only GGUF (what llama.cpp reads with vocab_only=True) ------------------
def write_vocab_gguf(path, tokens, types, *, model="llama", scores=None, merges=None, pre=None,
                     bos=1, eos=2, add_bos=None, add_space_prefix=None):
    """A GGUF holding only a vocabulary (and the minimal llama hyperparameters)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- a transformers-made checkpoint as llama.cpp's converter writes it (gemma*, phi3) -------
NORM_SHIFTED = ("gemma", "gemma2", "gemma3")  # convert_hf_to_gguf.py stores Gemma's norms as 1 + w


def write_family_gguf(path, src_dir, arch, fuse_qkv=False):
    """tests/fixtures/hf/<name> (config.json + model.safetensors) as a float32 GGUF of llama.cpp
    architecture `arch`: tensor names from gguf-py's own TensorNameMap (llama.cpp's table), no
    Q/K permutation (these are rope-type neox architectures), Gemma norms + 1, the hyperparameters
    llama.cpp's converter writes; no tokenizer. fuse_qkv (phi2): one attn_qkv weight and bias,
    as GGUFs of the original Phi-2 checkpoints have."""
    import json
    import os

    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    t = load_file(os.path.join(src_dir, "model.safetensors"))
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg.get("intermediate_size") or cfg["ffn_hidden_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(1 if arch == "falcon" else cfg["num_key_value_heads"])
    if arch != "falcon":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if "rms_norm_eps" in cfg:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    else:
        w.add_layer_norm_eps(cfg.get("layer_norm_eps", cfg.get("layer_norm_epsilon")))
    rp = cfg.get("rope_parameters") or {}
    rp = rp.get("full_attention", rp)
    w.add_rope_freq_base(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    if arch == "phi3":
        w.add_rope_dimension_count(head_dim)
    if arch == "phi2":
        w.add_rope_dimension_count(int(head_dim * rp["partial_rotary_factor"]))
    if cfg.get("sliding_window") is not None:
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "gemma3":  # the fixture's own layer pattern (llama.cpp's default is every sixth full)
        w.add_sliding_window_pattern([lt == "sliding_attention" for lt in cfg["layer_types"]])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    if fuse_qkv:
        for i in range(n_layers):
            a = f"model.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                qkv = np.concatenate([t.pop(f"{a}{p}_proj.{kind}") for p in "qkv"])
                w.add_tensor(f"blk.{i}.attn_qkv.{kind}", np.ascontiguousarray(qkv, dtype=np.float32))
    for hf, a in t.items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if arch in NORM_SHIFTED and hf.endswith("norm.weight"):
            a = a + np.float32(1.0)
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- a mixture-of-experts GGUF (Mixtral: llama with experts; Qwen3-MoE: qwen3moe) from an HF checkpoint
def write_moe_gguf(path, config, t, expert_qtype=None, expert_shapes=None):
    """What llama.cpp's converter writes for Mixtral (the llama architecture with expert_count
    and expert_used_count, Q/K rows permuted) or Qwen3-MoE (qwen3moe: q/k norms, rows as HF's,
    expert_feed_forward_length): the router as ffn_gate_inp, each layer's experts stacked into
    one tensor per part (ffn_gate_exps, ffn_up_exps: (n_experts, n_ff, d); ffn_down_exps:
    (n_experts, d, n_ff), in NumPy order). expert_qtype: a GGMLQuantizationType for the expert
    tensors (None: F32); expert_shapes: {part: a wrong NumPy shape} to write instead."""
    qwen = config["model_type"] == "qwen3_moe"
    arch = "qwen3moe" if qwen else "llama"
    w = gguf.GGUFWriter(str(path), arch=arch)
    n_layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    E = config.get("num_experts", config.get("num_local_experts"))  # transformers 4 or 5 spelling
    n_ff = config["moe_intermediate_size"] if qwen else config["intermediate_size"]
    w.add_block_count(n_layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    if qwen:
        w.add_expert_feed_forward_length(n_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_expert_count(E)
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    if not config.get("tie_word_embeddings"):
        w.add_tensor("output.weight", t["lm_head.weight"])
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}
    if qwen:
        per_layer |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}
        expert = {"gate": "mlp.experts.{}.gate_proj", "up": "mlp.experts.{}.up_proj", "down": "mlp.experts.{}.down_proj"}
    else:
        per_layer["block_sparse_moe.gate"] = "ffn_gate_inp"
        expert = {p: "block_sparse_moe.experts.{}." + h for p, h in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for hf, g in per_layer.items():
            a = t[p + hf + ".weight"]
            if hf == "self_attn.q_proj" and not qwen:
                a = llamacpp_permute(a, heads, heads)
            elif hf == "self_attn.k_proj" and not qwen:
                a = llamacpp_permute(a, heads, kv)
            w.add_tensor(f"blk.{i}.{g}.weight", a)
        for part, hf in expert.items():
            a = np.stack([t[p + hf.format(e) + ".weight"] for e in range(E)])
            if expert_shapes and part in expert_shapes:
                a = np.zeros(expert_shapes[part], np.float32)
            name = f"blk.{i}.ffn_{part}_exps.weight"
            if expert_qtype is not None:
                w.add_tensor(name, quantize(a, expert_qtype), raw_dtype=expert_qtype)
            else:
                w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
