"""The flashrt model directory: manifest, resident tensors, FFN bundles, tokenizer."""
from .manifest import ALIGNMENT, FORMAT_VERSION, MAGIC, Manifest
from .reader import ModelFiles
from .writer import ModelWriter, OutputExistsError, register_file

__all__ = ["ALIGNMENT", "FORMAT_VERSION", "MAGIC", "Manifest", "ModelFiles", "ModelWriter",
           "OutputExistsError", "register_file"]
