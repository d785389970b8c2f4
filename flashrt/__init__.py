"""flashrt: run large language models from flash on the CPU (Apple's "LLM in a flash").

The whole public face:
    Generator    open a model and generate text (dense, flash or naive mode)
    convert      Hugging Face safetensors directory or GGUF file -> flashrt model directory
    calibrate    fit a model's FFN sparsity predictors (flash mode uses them)
    FlashrtError the base class of every error flashrt raises; its subclasses ModelFormatError,
                 UnsupportedModelError, BudgetError, FlashIOError, GenerationError
"""
__version__ = "0.1.0"

import importlib

from .errors import (  # noqa: E402  (no imports: cheap)
    BudgetError,
    FlashIOError,
    FlashrtError,
    GenerationError,
    ModelFormatError,
    UnsupportedModelError,
)

# Imported on first use, so `import flashrt` stays cheap (NumPy and the compiled core load then).
_LAZY = {"Generator": ".api", "convert": ".convert", "calibrate": ".calibration"}

__all__ = ["Generator", "convert", "calibrate", "FlashrtError", "ModelFormatError", "UnsupportedModelError",
           "BudgetError", "FlashIOError", "GenerationError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashrt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
