"""Tokenizer: a `tokenizers.Tokenizer` plus BOS/EOS rules and the chat template.

Built from a model directory's tokenizer.json + tokenizer_config.json (`from_dir`),
or from GGUF metadata (`tokenizer_from_gguf`, used by the GGUF converter).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers as pt

from .errors import GenerationError, ModelFormatError, UnsupportedModelError

# -- GGUF vocabularies -----------------------------------------------------------------
# llama.cpp's BPE pre-types: the regexes each splits the text with, in order (llama-vocab.cpp's
# llm_tokenizer_bpe; its case-insensitive contractions spelled out), and whether a word that is
# itself a token skips the merges.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TYPES = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
    "llama3": ([_LLAMA3], True),
    "dbrx": ([_LLAMA3], False),
    "chatglm-bpe": ([_LLAMA3], False),
    "qwen2": ([_QWEN2], False),
    "gpt-2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False),
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"], False),
    "bloom": ([r" ?[^(\s|.,!?…。，、।۔،)]+"], False),
}
# llama.cpp's other names for the same pre-types (llama-vocab.cpp, llama_vocab::impl::load)
_PRE_ALIASES = {
    "llama-bpe": "llama3", "llama-v3": "llama3", "falcon3": "llama3", "pixtral": "llama3",
    "smaug-bpe": "dbrx", "glm4": "chatglm-bpe",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2", "hunyuan": "qwen2",
    "phi-2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2", "trillion": "gpt-2",
    "jina-es": "gpt-2", "jina-de": "gpt-2", "gigachat": "gpt-2", "jina-v2-es": "gpt-2",
    "jina-v2-de": "gpt-2", "exaone4": "gpt-2", "roberta-bpe": "gpt-2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "poro-chat": "bloom", "gpt3-finnish": "bloom",
}
# Token texts llama.cpp treats as the end of a generation wherever they are in the vocabulary
# (llama-vocab.cpp's auto-detection: Gemma's <end_of_turn>, Phi-3's <|end|>, ...)
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                           "<|end_of_text|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<end_of_utterance>")
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6
SPM_SPACE = "\u2581"  # "▁": SentencePiece's space


def _pre_tokenizer(pre: str):
    """(pre_tokenizer, ignore_merges) for a llama.cpp BPE pre-type name."""
    name = _PRE_ALIASES.get(pre, pre)
    if name not in _PRE_TYPES:
        known = ", ".join(sorted(set(_PRE_TYPES) | set(_PRE_ALIASES)))
        raise UnsupportedModelError(
            f"GGUF tokenizer pre-type {pre!r} is not supported (flashrt knows {known}); "
            f"convert the Hugging Face checkpoint instead")
    regexes, ignore_merges = _PRE_TYPES[name]
    splits = [pt.Split(Regex(r), behavior="isolated") for r in regexes]
    return pt.Sequence(splits + [pt.ByteLevel(add_prefix_space=False, use_regex=False)]), ignore_merges


def _drop_missing_bytes(pre_tokenizer, vocab, merges):
    """Some vocabularies lack byte tokens (SmolLM2 lacks 21, e.g. 0x04 and 0xF1). llama.cpp
    keeps such a byte as a symbol that blocks merges across it, then drops it; `tokenizers`
    drops it first and merges its neighbours. Splitting there (and removing it) after the
    byte-level mapping gives llama.cpp's ids."""
    in_merges = {c for a, b in merges for c in a + b}
    missing = sorted(c for c in pt.ByteLevel.alphabet() if c not in vocab and c not in in_merges)
    if not missing:
        return pre_tokenizer
    cls = "".join("\\" + c if c in "[]\\^-" else c for c in missing)
    return pt.Sequence([pre_tokenizer, pt.Split(Regex(f"[{cls}]"), behavior="removed")])


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _spm_merges(tokens, scores, types):
    """llama.cpp's SentencePiece tokenizer as BPE merges. llama.cpp starts from the text's
    characters and repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring token (the leftmost on ties). Every split of a token into two tokens is
    a merge, ranked by the joined token's score (then by its id); equal scores of different
    tokens competing for one character are the only place the two can differ."""
    vocab = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            vocab.setdefault(t, i)
    ranked = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-float(scores[i]), i, vocab[a], a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def _spm_tokenizer(tokens, scores, types, add_space_prefix: bool):
    """A `tokenizers` BPE over the whole text (no pre-tokenizer) with byte fallback: spaces
    become "▁" (one prepended to every text fragment between special tokens when
    add_space_prefix), characters without a token become their <0xXX> byte tokens."""
    from tokenizers import normalizers

    if scores is None:
        scores = [0.0] * len(tokens)
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_UNKNOWN), None)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tk = HFTokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=unk,
                                byte_fallback=True, fuse_unk=False))
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tk.normalizer = normalizers.Sequence(steps)
    tk.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    return tk


def tokenizer_from_gguf(reader):
    """(tokenizer_json_str, tokenizer_config dict) from a gguf.GGUFReader's metadata.

    BPE vocabularies ("gpt2" model): BPE(vocab, merges), the pre-type's pre-tokenizer, a
    ByteLevel decoder. SentencePiece vocabularies ("llama" model): llama.cpp's score-ranked
    merges with byte fallback (`_spm_tokenizer`). Control and unknown tokens are special
    tokens, user-defined ones added tokens (matched in the text before the model runs).
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError("the GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    if model not in ("gpt2", "llama"):
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported (flashrt reads BPE 'gpt2' and "
            f"SentencePiece 'llama' vocabularies); convert the Hugging Face checkpoint instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError("the GGUF file's tokenizer has no tokens (tokenizer.ggml.tokens)")
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    spm = model == "llama"
    if spm:
        add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tk = _spm_tokenizer(tokens, _field(reader, "tokenizer.ggml.scores"), types, add_space_prefix)
        special_types = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    else:
        add_space_prefix = False
        pre_tokenizer, ignore_merges = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        vocab = {t: i for i, t in enumerate(tokens)}
        tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tk.pre_tokenizer = _drop_missing_bytes(pre_tokenizer, vocab, merges)
        tk.decoder = decoders.ByteLevel()
        special_types = (TOKEN_TYPE_CONTROL,)
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in special_types]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok(key, default=None):
        i = _field(reader, key, default)
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    # llama.cpp's defaults for SentencePiece vocabularies: BOS 1, EOS 2, BOS added
    bos_id, bos = tok("tokenizer.ggml.bos_token_id", 1 if spm else None)
    eos_id, eos = tok("tokenizer.ggml.eos_token_id", 2 if spm else None)
    eos_ids = [eos_id] if eos_id is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i, _ = tok(key)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    if spm:  # as llama.cpp: a turn's end ends generation though the metadata names only <eos>
        ids = {t: i for i, t in enumerate(tokens)}
        eos_ids += [ids[t] for t in END_OF_GENERATION_TEXTS if t in ids and ids[t] not in eos_ids]
    config = {"chat_template": _field(reader, "tokenizer.chat_template"),
              "bos_token": bos, "eos_token": eos,
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", spm)),
              "bos_token_id": bos_id, "eos_token_ids": eos_ids}
    if add_space_prefix:
        config["strip_space_prefix"] = True
    return tk.to_str(), config


# -- chat templates -------------------------------------------------------------------
def _raise_exception(message):
    from jinja2.exceptions import TemplateError  # start-up cost: jinja2 (~0.25 s) only for chat

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_template(source: str):
    from jinja2.ext import loopcontrols  # start-up cost: jinja2 (~0.25 s) only for chat
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # start-up cost, as above

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# Limits of one chat-template render, so that a hostile or buggy template cannot hang chat():
# loop iterations over range() in total, and characters rendered beyond the messages' own.
TEMPLATE_MAX_STEPS = 1_000_000
TEMPLATE_MAX_EXTRA_CHARS = 1 << 20


def _check_messages(messages) -> list:
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise GenerationError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                              f"got {type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise GenerationError("messages is empty: pass at least one {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GenerationError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                  f"got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise GenerationError(f"messages[{i}] needs a non-empty string 'role', got {m.get('role')!r}")
        content = m.get("content")
        if not (content is None or isinstance(content, str)
                or (isinstance(content, list) and all(isinstance(c, dict) for c in content))):
            raise GenerationError(f"messages[{i}]['content'] must be a string (or a list of "
                                  f"content-part dicts), got {type(content).__name__}")
    return messages


def _bounded_range(max_steps: int):
    """A range() for templates that counts iterations across the whole render."""
    left = [max_steps]

    def range_(*args):
        r = range(*args)

        def steps():
            for i in r:
                left[0] -= 1
                if left[0] < 0:
                    raise GenerationError(f"the chat template loops more than {max_steps} times "
                                          f"(range() iterations); the template is broken")
                yield i

        return steps()

    return range_


def _check_config(config, vocab_size: int) -> dict:
    """The tokenizer config's fields, type- and range-checked: ModelFormatError naming the field."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ModelFormatError(f"tokenizer config must be a JSON object, got {type(config).__name__}")

    def bad(field, want):
        raise ModelFormatError(f"tokenizer config: {field} must be {want}, got {config[field]!r}; "
                               f"re-run `flashrt convert` (or fix tokenizer_config.json)")

    def is_id(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size

    for field in ("chat_template", "bos_token", "eos_token"):
        if config.get(field) is not None and not isinstance(config[field], str):
            bad(field, "a string")
    if config.get("bos_token_id") is not None and not is_id(config["bos_token_id"]):
        bad("bos_token_id", f"a token id below the vocabulary size {vocab_size}")
    ids = config.get("eos_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(is_id(i) for i in ids)):
        bad("eos_token_ids", f"a list of token ids below the vocabulary size {vocab_size}")
    for field in ("add_bos_token", "strip_space_prefix"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, "true or false")
    return dict(config)


# -- the tokenizer --------------------------------------------------------------------
class Tokenizer:
    """encode/decode with the model's BOS rule; chat template rendering."""

    def __init__(self, tokenizer, config: dict | None = None):
        cfg = _check_config(config, tokenizer.get_vocab_size())
        self._tk = tokenizer  # tokenizers.Tokenizer
        self.chat_template = cfg.get("chat_template")
        self.bos_token = cfg.get("bos_token")
        self.eos_token = cfg.get("eos_token")
        bos_id = cfg.get("bos_token_id")
        if bos_id is None and self.bos_token is not None:
            bos_id = tokenizer.token_to_id(self.bos_token)
        self.bos_token_id = bos_id
        eos_ids = set(int(i) for i in cfg.get("eos_token_ids") or [])
        if self.eos_token is not None and tokenizer.token_to_id(self.eos_token) is not None:
            eos_ids.add(tokenizer.token_to_id(self.eos_token))
        self.eos_token_ids = eos_ids
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        # SentencePiece vocabularies prepend a space to the text: decode() drops it again
        self.strip_space_prefix = bool(cfg.get("strip_space_prefix", False))
        if self.add_bos_token and self.bos_token_id is None:
            raise ModelFormatError("tokenizer config asks to add BOS but names no BOS token")
        self._template = None

    @classmethod
    def from_json(cls, tokenizer_json: str, config: dict | None = None) -> "Tokenizer":
        return cls(HFTokenizer.from_str(tokenizer_json), config)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """From `<path>/tokenizer.json` and (optional) `<path>/tokenizer_config.json`."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelFormatError(f"{path}: no tokenizer.json (this model was converted "
                                   f"without a tokenizer; pass token ids instead)")
        tc = path / "tokenizer_config.json"
        try:
            config = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
            return cls.from_json(tj.read_text(encoding="utf-8"), config)
        except ModelFormatError:
            raise
        except Exception as e:
            raise ModelFormatError(f"{path}: cannot load the tokenizer ({e}); re-run "
                                   f"`flashrt convert`") from e

    # -- ids -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list:
        """Token ids of `text` (special tokens written in the text are matched);
        BOS prepended iff add_bos_token (or `add_bos`)."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (the space a SentencePiece vocabulary prepends dropped)."""
        text = self._decode_raw(ids, skip_special_tokens)
        return text[1:] if self.strip_space_prefix and text.startswith(" ") else text

    def _decode_raw(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int):
        return self._tk.id_to_token(int(token_id))

    def decode_stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder: feed ids one at a time, get text deltas back."""
        return StreamDecoder(self, skip_special_tokens)

    # -- chat ----------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template."""
        from jinja2.exceptions import TemplateError  # start-up cost: jinja2 (~0.25 s) only for chat

        if not self.chat_template:
            raise ModelFormatError("this model has no chat template; use plain generation")
        messages = _check_messages(messages)
        if self._template is None:
            try:
                self._template = _compile_template(self.chat_template)
            except TemplateError as e:
                raise GenerationError(f"the model's chat template does not compile: {e}") from None
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "range": _bounded_range(TEMPLATE_MAX_STEPS)}
        variables.update(kwargs)
        cap = TEMPLATE_MAX_EXTRA_CHARS + 4 * len(json.dumps(messages, default=str))
        out, n = [], 0
        try:
            for piece in self._template.generate(messages=messages,
                                                 add_generation_prompt=add_generation_prompt, **variables):
                n += len(piece)
                if n > cap:
                    raise GenerationError(f"the chat template rendered more than {cap} characters for "
                                          f"these messages; the template is broken")
                out.append(piece)
        except GenerationError:
            raise
        except TemplateError as e:  # raise_exception(...), undefined names, sandbox refusals
            raise GenerationError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # type errors and the like inside the template
            raise GenerationError(f"the chat template failed on these messages: "
                                  f"{type(e).__name__}: {e}") from None
        return "".join(out)


class StreamDecoder:
    """Text deltas for a growing id sequence; holds back incomplete UTF-8 (U+FFFD) tails.
    Generated text keeps its leading space (it continues the prompt)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = []
        self._prefix = 0  # ids[prefix:read] were already emitted (context for the decoder)
        self._read = 0

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._tok._decode_raw(self._ids[self._prefix:self._read], self._skip)
        text = self._tok._decode_raw(self._ids[self._prefix:], self._skip)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (at the end of generation)."""
        before = self._tok._decode_raw(self._ids[self._prefix:self._read], self._skip)
        text = self._tok._decode_raw(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(before):]
