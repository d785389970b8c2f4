"""SentencePiece GGUF vocabularies (tokenizer.ggml.model = "llama"): flashrt's ids equal
llama.cpp's. Two vocabularies trained with the sentencepiece package on tinyshakespeare
(Unigram and BPE, byte fallback, two user-defined tokens) and llama.cpp's ids for 1014 texts
are committed (tests/fixtures/make_spm_fixture.py); the live tests ask llama.cpp itself."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flashrt.tokenizer import Tokenizer, tokenizer_from_gguf

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "spm_vocabs.json").read_text(encoding="utf-8"))
TEXTS = FIXTURE["texts"]
KINDS = sorted(FIXTURE["vocabs"])
MARKED = ("<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>")


class Field:
    """Stands in for a gguf ReaderField."""

    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def reader_of(vocab, **extra):
    fields = {"tokenizer.ggml.model": Field("llama"),
              "tokenizer.ggml.tokens": Field(vocab["tokens"]),
              "tokenizer.ggml.scores": Field(vocab["scores"]),
              "tokenizer.ggml.token_type": Field(vocab["token_type"])}
    fields |= {f"tokenizer.ggml.{k}": Field(v) for k, v in extra.items()}
    return SimpleNamespace(fields=fields)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def tok(kind):
    return Tokenizer.from_json(*tokenizer_from_gguf(reader_of(FIXTURE["vocabs"][kind])))


def test_ids_match_llamacpp_fixture(kind, tok):
    want = FIXTURE["vocabs"][kind]["ids"]
    bad = [(t, tok.encode(t, add_bos=False), ids) for t, ids in zip(TEXTS, want)
           if tok.encode(t, add_bos=False) != ids]
    assert not bad, f"{len(bad)} of {len(TEXTS)} differ, first: {bad[0]}"


def test_bos_and_special_tokens(kind, tok):
    # <end_of_turn> ends generation too, as llama.cpp detects it (its llama_vocab_is_eog)
    assert tok.add_bos_token and tok.bos_token_id == 1
    assert tok.eos_token_ids == {2, tok.token_to_id("<end_of_turn>")}
    assert tok.encode("hello") == FIXTURE["vocabs"][kind]["hello_with_bos"]
    assert tok.encode("<s></s>", add_bos=False) == [1, 2]
    start = tok.token_to_id("<start_of_turn>")
    assert tok.encode("<start_of_turn>", add_bos=False) == [start]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""
    assert tok.encode("", add_bos=False) == [] and tok.encode("") == [1]


def test_decode_inverts_encode(tok):
    for text in TEXTS:  # a "▁" in the text is a space to SentencePiece (and to llama.cpp)
        if not any(m in text for m in MARKED + ("\u2581",)):
            assert tok.decode(tok.encode(text, add_bos=False)) == text
            assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_stream_keeps_the_leading_space(tok):
    ids = tok.encode(" once more", add_bos=False)
    dec = tok.decode_stream()
    assert "".join(dec.step(i) for i in ids) + dec.flush() == "  once more"
    assert tok.decode(ids) == " once more"


def test_byte_fallback(tok):
    ids = tok.encode("\U00040000", add_bos=False)
    assert [tok.id_to_token(i) for i in ids[-4:]] == ["<0xF1>", "<0x80>", "<0x80>", "<0x80>"]


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60) | \
    st.lists(st.sampled_from(["  ", "\n", "\t", "1", "22", "a", "é", "😀", " the", "thee", "KING",
                              "<s>", "</s>", "<start_of_turn>", "日本", "\r\n", "▁", "...", "’",
                              "\U00040000", "x"]), max_size=20).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_no_space_prefix_is_prefix_with_a_space(kind, text):
    """add_space_prefix = false (Gemma) tokenizes " " + text as the default does text."""
    vocab = FIXTURE["vocabs"][kind]
    plain = Tokenizer.from_json(*tokenizer_from_gguf(reader_of(vocab, add_space_prefix=False)))
    prefixed = Tokenizer.from_json(*tokenizer_from_gguf(reader_of(vocab)))
    if any(m in text for m in MARKED) or text == "":
        return
    assert plain.encode(" " + text, add_bos=False) == prefixed.encode(text, add_bos=False)
    if "\u2581" not in text:
        assert plain.decode(plain.encode(text, add_bos=False)) == text


# -- live: llama.cpp reads the same vocabulary --------------------------------------------
@pytest.fixture(scope="module")
def llamacpp(kind, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf_writer import write_vocab_gguf

    vocab = FIXTURE["vocabs"][kind]
    out = {}
    for prefix in (True, False):
        path = tmp_path_factory.mktemp("spm") / f"{kind}-{prefix}.gguf"
        write_vocab_gguf(path, vocab["tokens"], vocab["token_type"], scores=vocab["scores"],
                         add_space_prefix=prefix)
        out[prefix] = (llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False),
                       Tokenizer.from_json(*tokenizer_from_gguf(reader_of(vocab, add_space_prefix=prefix))))
    return out


def test_end_of_generation_ids_match_llamacpp_live(llamacpp, kind):
    import llama_cpp

    llama, ours = llamacpp[True]
    vocab = llama_cpp.llama_model_get_vocab(llama._model.model)
    eog = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert ours.eos_token_ids == eog


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(text=TEXT, prefix=st.booleans())
def test_ids_match_llamacpp_live(llamacpp, text, prefix):
    llama, ours = llamacpp[prefix]
    assert ours.encode(text) == llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
