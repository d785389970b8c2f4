"""Sampling: properties checked against plain NumPy definitions."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from flashrt.errors import GenerationError
from flashrt.sampling import SamplingParams, sample

logit_rows = arrays(np.float32, st.integers(2, 64), elements=st.floats(-20, 20, width=32), unique=True)


@given(logit_rows)
def test_greedy_is_argmax(logits):
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == int(np.argmax(logits))


@given(logit_rows, st.floats(0.1, 5.0), st.integers(0, 2**32 - 1))
def test_top_k_one_is_argmax_at_any_temperature(logits, temperature, seed):
    p = SamplingParams(temperature=temperature, top_k=1)
    assert sample(logits, p, np.random.default_rng(seed)) == int(np.argmax(logits))


@given(logit_rows, st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_top_k_samples_only_the_k_largest(logits, k, seed):
    k = min(k, logits.size)
    allowed = set(np.argsort(-logits)[:k].tolist())
    p = SamplingParams(temperature=1.0, top_k=k)
    rng = np.random.default_rng(seed)
    assert all(sample(logits, p, rng) in allowed for _ in range(10))


@given(logit_rows, st.floats(0.05, 0.99), st.integers(0, 2**32 - 1))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p, seed):
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    allowed = set(order[:n_keep].tolist())
    p = SamplingParams(temperature=1.0, top_p=top_p)
    rng = np.random.default_rng(seed)
    assert all(sample(logits, p, rng) in allowed for _ in range(10))


def test_seed_makes_sampling_reproducible_and_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    p = SamplingParams(temperature=1.0)
    a = [sample(logits, p, np.random.default_rng(7)) for _ in range(5)]
    assert len(set(a)) == 1
    rng = np.random.default_rng(1)
    counts = np.bincount([sample(logits, p, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_absurd_parameters_are_refused(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
