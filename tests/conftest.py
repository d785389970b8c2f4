"""Shared fixtures: tiny converted models and the default model (SmolLM2), converted once per session."""
import warnings
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
HF_NAMES = ("opt", "llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> converted float32 flashrt model directory, for the transformers-made tiny checkpoints."""
    from flashrt.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny checkpoints have no tokenizer
        for name in HF_NAMES:
            out[name] = convert(FIXTURES / "hf" / name, root / name, dtype="float32", progress=False)
    return {k: Path(v) for k, v in out.items()}


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model, converted (float16) into FLASHRT_HOME on first use."""
    from flashrt.home import default_model_path

    return default_model_path(progress=False)
