"""The model families, one module per family (Hugging Face names throughout), and the
registry that maps a config's model_type to its family.

    family = family_for(config)                   # the module, e.g. flashrt.models.llama
    args = family.ModelArgs.from_dict(config)     # the one validator
    model = family.Model(args, weights, ffn, linear)
    kv = model.make_cache(max_seq=2048)
    logits = model.forward(np.array(ids), kv)     # (T, vocab) float32

A family module provides ARCHITECTURE (the manifest's name for it), MODEL_TYPES (the HF
model_types it runs), FFN_PARTS (its bundle parts), EMBED_NAME, GGUF_NAMES (or None) and
GGUF_ARCHITECTURES (llama.cpp's general.architecture -> model_type; optional),
ModelArgs (from_dict, to_config, n_neurons, head_dim, num_key_value_heads), tensors(args),
sanitize(weights), ffn_spec(args, weights) and Model; optionally fused(args) (the row blocks of
fused checkpoint matrices, split by both converters), LAYER_PATTERN (the regex of its layer
names, if not model.layers.N) and the GGUF hooks convert/gguf.py names. Adding a family is one
new module and its name in FAMILY_MODULES.
"""

import importlib

from flashrt.errors import UnsupportedModelError
from flashrt.models.base import Linear, numpy_linear

FAMILY_MODULES = ("llama", "opt", "qwen3", "gemma", "phi3", "phi", "falcon", "mixtral", "qwen3_moe")  # the registry: one module of flashrt.models per family

FAMILIES = {m.ARCHITECTURE: m for m in (importlib.import_module(f"{__name__}.{name}") for name in FAMILY_MODULES)}
MODEL_TYPES = {mt: arch for arch, m in FAMILIES.items() for mt in m.MODEL_TYPES}  # HF model_type -> family
GGUF_ARCHITECTURES = {g: mt for m in FAMILIES.values()                      # GGUF architecture -> HF model_type
                      for g, mt in getattr(m, "GGUF_ARCHITECTURES", {}).items()}


def family(architecture):
    """The family module of a manifest's `architecture`; UnsupportedModelError otherwise."""
    if architecture not in FAMILIES:
        raise UnsupportedModelError(f"unknown architecture {architecture!r} (expected one of {sorted(FAMILIES)})")
    return FAMILIES[architecture]


def architecture_for(config, where="config"):
    """The family name for an HF config dict (by its model_type); UnsupportedModelError otherwise."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; flashrt runs {', '.join(sorted(MODEL_TYPES))} "
            f"(SmolLM is llama)")
    return MODEL_TYPES[model_type]


def family_for(config, where="config"):
    """The family module for an HF config dict."""
    return FAMILIES[architecture_for(config, where)]


def parts_for(architecture):
    """The FFN bundle parts of a family ("llama" -> gate, up, down; "opt" -> up, down)."""
    return family(architecture).FFN_PARTS


def model_args(architecture, config):
    """The family's ModelArgs for a config dict (validates it)."""
    return family(architecture).ModelArgs.from_dict(config)


def build_model(architecture, config, weights, ffn, linear=numpy_linear):
    """Model for `architecture` over resident `weights` (HF names), an FFN and a linear function."""
    return family(architecture).Model(model_args(architecture, config), weights, ffn, linear)


__all__ = ["FAMILIES", "FAMILY_MODULES", "GGUF_ARCHITECTURES", "MODEL_TYPES", "Linear", "architecture_for", "build_model", "family",
           "family_for", "model_args", "numpy_linear", "parts_for"]
