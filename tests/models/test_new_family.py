"""Adding a family is one module and its registry entry: a Llama variant with a gated GELU
FFN, written here as a module, converts from a Hugging Face checkpoint and runs in every
mode, matching a NumPy forward pass with erf-GELU."""
import json
import shutil
import sys
import types
from math import erf

import numpy as np
import pytest
from safetensors.numpy import load_file

import flashrt
import flashrt.models as models
from flashrt.convert import convert
from flashrt.models import llama

FAMILY_SOURCE = '''
from flashrt.models import llama
from flashrt.models.llama import EMBED_NAME, FFN_PARTS, Model, ffn_spec, sanitize, tensors

ARCHITECTURE = "gelu_llama"
MODEL_TYPES = ("gelu_llama",)
GGUF_NAMES = None


class ModelArgs(llama.ModelArgs):
    MODEL_TYPES = MODEL_TYPES
    ACTIVATIONS = ("gelu",)
'''


@pytest.fixture
def gelu_family(monkeypatch):
    """The module registered as models/__init__.py would (FAMILY_MODULES) register it."""
    module = types.ModuleType("flashrt.models.gelu_llama")
    exec(compile(FAMILY_SOURCE, "gelu_llama.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(models.FAMILIES, module.ARCHITECTURE, module)
    monkeypatch.setitem(models.MODEL_TYPES, "gelu_llama", module.ARCHITECTURE)
    return module


def numpy_logits(src, config, ids):
    w = load_file(str(src / "model.safetensors"))
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0))))

    def ffn(layer, x):
        p = f"model.layers.{layer}.mlp."
        g = x.astype(np.float64) @ w[p + "gate_proj.weight"].T
        h = gelu(g) * (x @ w[p + "up_proj.weight"].T)
        return (h @ w[p + "down_proj.weight"].T).astype(np.float32)

    model = llama.Model(llama.ModelArgs.from_dict({**config, "model_type": "llama", "hidden_act": "silu"}), w, ffn,
                        lambda W, x, bias=None: x @ W.T + (0 if bias is None else bias))
    return model.forward(np.array(ids), model.make_cache(16))


def test_a_new_family_is_one_module(gelu_family, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(__import__("conftest").FIXTURES / "hf" / "llama", src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gelu_llama", hidden_act="gelu")
    (src / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert json.loads((out / "manifest.json").read_text())["architecture"] == "gelu_llama"
    ids = [1, 5, 9, 2, 7, 3]
    want = numpy_logits(src, config, ids)
    for mode, kw in (("dense", {}), ("flash", {"select": "all"}), ("naive", {})):
        with flashrt.Generator(out, mode=mode, threads=1, progress=False, **kw) as g:
            np.testing.assert_allclose(g.logits(ids), want, atol=1e-4, rtol=0, err_msg=mode)
            np.testing.assert_allclose(g.decode_logits(ids), want, atol=1e-4, rtol=0, err_msg=mode)
