"""flashrt: run large language models from flash on the CPU (Apple's "LLM in a flash").

The whole public face:
    Generator    open a model and generate text (dense, flash or naive mode)
    convert      Hugging Face safetensors directory or GGUF file -> flashrt model directory
    FlashrtError the base class of every error flashrt raises
"""
__version__ = "0.1.0"

from .errors import FlashrtError  # noqa: E402


def __getattr__(name):  # lazy: `import flashrt` stays cheap
    if name == "Generator":
        from .api import Generator

        return Generator
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(f"module 'flashrt' has no attribute {name!r}")


__all__ = ["Generator", "convert", "FlashrtError", "__version__"]
