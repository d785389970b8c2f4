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


# -- repetition penalty, min-p, log-probabilities --------------------------------------------
def penalty_oracle(logits, history, penalty, last_n):
    """llama.cpp's rule written as a plain loop over the distinct recent tokens."""
    out = [float(v) for v in logits]
    for t in set(history[-last_n:] if last_n else []):
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return np.array(out, np.float32)


@given(logit_rows, st.lists(st.integers(0, 63), max_size=40), st.floats(0.5, 3.0), st.integers(0, 70))
def test_repeat_penalty_matches_the_loop_oracle(logits, history, penalty, last_n):
    from flashrt.sampling import penalize

    history = [t % logits.size for t in history]
    want = penalty_oracle(logits, history, penalty, last_n)
    np.testing.assert_allclose(penalize(logits, history, penalty, last_n), want, rtol=1e-6)
    p = SamplingParams(repeat_penalty=penalty, repeat_last_n=last_n)
    assert sample(logits, p, np.random.default_rng(0), history) == int(np.argmax(want))


def test_repeat_penalty_breaks_a_greedy_loop():
    logits = np.array([3.0, 2.9, 0.0], np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0), [0, 0]) == 0
    assert sample(logits, SamplingParams(repeat_penalty=1.1), np.random.default_rng(0), [0, 0]) == 1
    assert sample(logits, SamplingParams(repeat_penalty=1.1, repeat_last_n=1), np.random.default_rng(0), [0, 2]) == 0


@given(logit_rows, st.floats(0.0, 1.0), st.floats(0.2, 3.0), st.integers(0, 2**32 - 1))
def test_min_p_samples_only_tokens_near_the_best(logits, min_p, temperature, seed):
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    allowed = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    p = SamplingParams(temperature=temperature, min_p=min_p)
    rng = np.random.default_rng(seed)
    assert all(sample(logits, p, rng) in allowed for _ in range(10))


def test_min_p_follows_the_renormalised_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(3)
    p = SamplingParams(temperature=1.0, min_p=0.25)  # keeps p >= 0.125: the first three
    counts = np.bincount([sample(logits, p, rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, np.array([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03)


@given(logit_rows, st.integers(1, 8))
def test_top_logprobs_are_the_log_softmax(logits, k):
    from flashrt.sampling import top_logprobs

    z = logits.astype(np.float64)
    want = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
    token = int(np.argmin(logits))
    chosen, top = top_logprobs(logits, token, k)
    assert chosen == pytest.approx(want[token], abs=1e-9)
    k = min(k, logits.size)
    # the k largest, best first (ties in float64 may come in either order: compare values)
    np.testing.assert_allclose(list(top.values()), np.sort(want)[::-1][:k], atol=1e-9)
    assert len(top) == k and all(v == pytest.approx(want[i], abs=1e-9) for i, v in top.items())


def test_settings_that_do_nothing_at_temperature_zero_are_named():
    assert SamplingParams(top_p=0.9, min_p=0.1).ignored_at_greedy == ["top_p", "min_p"]
    assert SamplingParams(temperature=0.7, top_k=5).ignored_at_greedy == []


@pytest.mark.parametrize("kwargs", [dict(min_p=-0.1), dict(min_p=1.5), dict(min_p="x"), dict(repeat_penalty=0),
                                    dict(repeat_penalty=float("inf")), dict(repeat_last_n=-1),
                                    dict(repeat_last_n=2.0)])
def test_absurd_penalty_and_min_p_are_refused(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
