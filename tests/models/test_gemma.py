"""The Gemma family (gemma, gemma2, gemma3_text): its tiny random checkpoints
(tests/fixtures/make_hf_fixtures.py) run against transformers' logits batched, token by token
and prefill-then-decode in test_models.py (HF_FIXTURES); here, that they exercise what Gemma
adds (GeGLU, (1 + w) norms, embedding scale, soft-capping, sliding-window layers, q/k norms,
per-layer RoPE), its config reading and what it refuses."""
import numpy as np
import pytest

from flashrt.errors import ModelFormatError, UnsupportedModelError
from flashrt.models import build_model, gemma

from test_models import TOL, NumpyFFN, load_fixture


def test_the_fixtures_exercise_what_gemma_adds():
    """Each feature changes the logits: the fixtures could not pass without implementing it."""
    config, weights, ids, expected = load_fixture("gemma2")
    args = gemma.ModelArgs.from_dict(config)
    assert args.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert args.sliding_window < len(ids) and args.attn_logit_softcapping and args.final_logit_softcapping
    assert args.query_pre_attn_scalar != args.head_dim
    for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                   {"sliding_window": 1000}, {"query_pre_attn_scalar": args.head_dim}):
        model = build_model("gemma", {**config, **change}, weights, NumpyFFN("gemma", config, weights))
        assert np.abs(model.forward(ids, model.make_cache(32)) - expected).max() > 100 * TOL, change
    config3, weights3, ids3, expected3 = load_fixture("gemma3")
    args3 = gemma.ModelArgs.from_dict(config3)
    assert args3.qk_norm and args3.rope_local_base_freq == 10000.0 and args3.rope_scaling["factor"] == 4.0
    flat = {**config3, "rope_parameters": None, "rope_theta": 1e6, "rope_local_base_freq": 1e6}
    model = build_model("gemma", flat, weights3, NumpyFFN("gemma", config3, weights3))
    assert np.abs(model.forward(ids3, model.make_cache(32)) - expected3).max() > 100 * TOL


def test_config_round_trips_through_to_config():
    for name in ("gemma", "gemma2", "gemma3"):
        config, *_ = load_fixture(name)
        args = gemma.ModelArgs.from_dict(config)
        assert gemma.ModelArgs.from_dict(args.to_config(config)) == args


def test_transformers4_config_spellings():
    config, *_ = load_fixture("gemma3")
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0},
               rope_local_base_freq=10000.0, sliding_window_pattern=2)
    args = gemma.ModelArgs.from_dict(old)
    new = gemma.ModelArgs.from_dict(config)
    assert args == new
    g2, *_ = load_fixture("gemma2")
    assert gemma.ModelArgs.from_dict({k: v for k, v in g2.items() if k != "layer_types"}).layer_types == \
        gemma.ModelArgs.from_dict(g2).layer_types
    g1, *_ = load_fixture("gemma")
    assert gemma.ModelArgs.from_dict({**g1, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}
                                     ).hidden_act == "gelu_tanh"


@pytest.mark.parametrize("change,err,match", [
    ({"hidden_activation": "swish"}, UnsupportedModelError, "swish"),
    ({"attention_bias": True}, UnsupportedModelError, "attention_bias"),
    ({"layer_types": ["full_attention"]}, ModelFormatError, "layer_types"),
    ({"final_logit_softcapping": -1.0}, ModelFormatError, "final_logit_softcapping"),
    ({"model_type": "llama"}, UnsupportedModelError, "Gemma"),
])
def test_refuses(change, err, match):
    config, *_ = load_fixture("gemma2")
    with pytest.raises(err, match=match):
        gemma.ModelArgs.from_dict({**config, **change})
