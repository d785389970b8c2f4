"""The forward passes, one module per architecture family (Hugging Face names throughout).

    model = build_model("llama", config, weights, ffn, linear)
    kv = model.make_cache(max_seq=2048)
    logits = model.forward(np.array(ids), kv)        # (T, vocab) float32

`architecture` is the manifest's forward-pass family ("llama" or "opt");
`architecture_for(config)` maps an HF config's model_type to it.
"""

from flashrt.errors import UnsupportedModelError
from flashrt.models import llama, opt
from flashrt.models.base import FFN, Linear, numpy_linear

ARCHITECTURES = {"llama": llama, "opt": opt}

# HF model_type -> forward-pass family
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}


def architecture_for(config):
    """The family ("llama" | "opt") for an HF config dict; UnsupportedModelError otherwise."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; flashrt runs {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[model_type]


def model_args(architecture, config):
    """The architecture's ModelArgs for an HF config dict (validates it)."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture].ModelArgs.from_dict(config)


def build_model(architecture, config, weights, ffn, linear=numpy_linear):
    """Model for `architecture` over resident `weights` (HF names), an FFN and a linear function."""
    return ARCHITECTURES[architecture].Model(model_args(architecture, config), weights, ffn, linear)


__all__ = ["ARCHITECTURES", "MODEL_TYPES", "FFN", "Linear", "architecture_for", "build_model",
           "model_args", "numpy_linear"]
