"""Generator.stream_generate (the response stream), generate(logprobs=k), the repetition
penalty and min-p through a real model.

Oracles: the batch forward pass (Generator.logits over the prompt and the tokens so far) with
NumPy's log-softmax and the penalty written as a plain loop; stream_tokens for the ids.
"""
import numpy as np
import pytest

import flashrt
from conftest import CHAT_TEMPLATE, tiny_model
from flashrt.errors import GenerationError

PROMPT = "Once upon"


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    path = tiny_model("llama", tmp_path_factory.mktemp("sg") / "llama", {"chat_template": CHAT_TEMPLATE})
    with flashrt.Generator(path, progress=False) as gen:
        yield gen


def log_softmax(z):
    z = z.astype(np.float64) - z.max()
    return z - np.log(np.exp(z).sum())


def test_the_response_stream_carries_text_tokens_finish_and_speed(g):
    out = list(g.stream_generate(PROMPT, 12))
    assert [r.token for r in out] == list(g.stream_tokens(g.tokenizer.encode(PROMPT), 12))
    assert "".join(r.text for r in out) == g.generate(PROMPT, 12)
    assert [r.finish_reason for r in out] == [None] * 11 + ["length"]
    assert [r.generation_tokens for r in out] == list(range(1, 13))
    assert all(r.prompt_tokens == len(PROMPT) for r in out)
    assert out[-1].prompt_tps > 0 and out[-1].generation_tps > 0
    assert g.stats.finish_reason == "length" and "finish: length" in g.stats.summary()


def test_eos_and_stop_strings_finish_with_stop(g):
    ids = g.tokenizer.encode(PROMPT)
    free = list(g.stream_tokens(ids, 10, stop_at_eos=False))
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    g.tokenizer.eos_token_ids = {free[k]}
    try:
        out = list(g.stream_generate(PROMPT, 10))
    finally:
        g.tokenizer.eos_token_ids = set()
    assert [r.token for r in out] == free[:k + 1] and out[-1].finish_reason == "stop" and out[-1].text == ""
    assert "".join(r.text for r in out) == "".join(r.text for r in g.stream_generate(PROMPT, k))
    text = g.generate(PROMPT, 40)
    stop = text[2:4]
    out = list(g.stream_generate(PROMPT, 40, stop=stop))
    assert out[-1].finish_reason == "stop" and "".join(r.text for r in out) == text[:text.find(stop)]


def test_max_new_tokens_none_runs_to_the_end_of_the_context(g):
    out = list(g.stream_generate(PROMPT, None))
    assert len(out) == g.max_context - len(PROMPT) and out[-1].finish_reason == "length"
    out = list(g.stream_generate(PROMPT, 0))
    assert len(out) == 1 and out[0].token is None and out[0].finish_reason == "length"


def test_logprobs_equal_the_log_softmax_of_the_batch_forward_pass(g):
    ids = g.tokenizer.encode(PROMPT)
    result = g.generate(PROMPT, 6, logprobs=3)
    assert result.text == g.generate(PROMPT, 6) and result.finish_reason == "length"
    for i, token in enumerate(result.tokens):
        want = log_softmax(g.logits(ids + result.tokens[:i])[-1])
        assert result.logprobs[i] == pytest.approx(want[token], abs=1e-4)
        assert all(v == pytest.approx(want[t], abs=1e-4) for t, v in result.top_logprobs[i].items())
        np.testing.assert_allclose(list(result.top_logprobs[i].values()), np.sort(want)[::-1][:3], atol=1e-4)
    assert g.generate(PROMPT, 2, logprobs=0).top_logprobs == [{}, {}]
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(GenerationError, match="logprobs"):
            g.generate(PROMPT, 2, logprobs=bad)


def test_repeat_penalty_through_the_model_equals_a_plain_loop(g):
    ids = g.tokenizer.encode(PROMPT)
    penalty, last_n = 1.5, 8
    want = []
    for _ in range(10):
        seq = ids + want
        z = g.logits(seq)[-1].astype(np.float64)
        for t in set(seq[-last_n:]):
            z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
        want.append(int(np.argmax(z)))
    got = list(g.stream_tokens(ids, 10, repeat_penalty=penalty, repeat_last_n=last_n))
    assert got == want
    assert got != list(g.stream_tokens(ids, 10))  # the penalty did change the greedy path


def test_sampling_with_min_p_is_reproducible_and_min_p_one_is_greedy(g):
    a = g.generate(PROMPT, 8, temperature=1.0, min_p=0.05, seed=3)
    assert a == g.generate(PROMPT, 8, temperature=1.0, min_p=0.05, seed=3)
    assert g.generate(PROMPT, 8, temperature=1.5, min_p=1.0, seed=5) == g.generate(PROMPT, 8)


def test_chat_is_stream_generate_over_encode_chat(g):
    msgs = [{"role": "user", "content": "hi"}]
    ids = g.encode_chat(msgs)
    assert g.tokenizer.decode(ids) == "<user>hi\n<assistant>"
    assert g.chat(msgs, 10) == "".join(r.text for r in g.stream_generate(ids, 10))
