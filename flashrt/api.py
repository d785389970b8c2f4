"""Generator: open a model directory, plan the memory budget, generate text.

    with flashrt.Generator() as g:                 # the default model, everything in DRAM
        print(g.generate("The capital of France is", max_new_tokens=20))

    g = flashrt.Generator(path, mode="flash", memory_budget="200MB")   # FFN read from flash

Loading is load_model() (shared with calibration): the family validates the manifest's
config, the resident tensors are checked against its table, the FFN is built from its spec.
Decoding is in named steps: _prefill (the prompt, last-position logits only), _decode_one
(one token), and the _steps loop (sample -> yield -> decode one) under stream_generate (the
response stream: text, token, finish reason, speed) and stream/generate/chat on top of it.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .budget import BudgetPlan, check_dense_budget, plan_budget
from .errors import BudgetError, FlashrtError, GenerationError, ModelFormatError
from .ffn.dense import DenseFFN
from .ffn.moe import FlashMoEFFN, MoEFFN, MoESpec
from .ffn.flash import FlashFFN
from .ffn.selection import AllSelector, GateFirstSelector, OracleSelector, PredictorSelector
from .format.manifest import MANIFEST_NAME
from .format.reader import ModelFiles
from .home import resolve_model_path
from .kv_cache import KVCache
from .linear import KernelLinear
from .models import family
from .policy import choose_policy, warn_once
from .predictor import PREDICTORS_NAME, PredictorSet
from .predictor.store import predictor_ram_bytes
from .sampling import SamplingParams, sample, top_logprobs
from .threads import blas_single_threaded, default_threads
from .tokenizer import Tokenizer

MODES = ("dense", "flash", "naive")
SELECTS = ("all", "oracle", "predictor")
DEFAULT_MAX_CONTEXT = 2048


# ---------------------------------------------------------------------- loading a model
def model_args(files: ModelFiles):
    """(family module, ModelArgs) of an opened model directory: its config validated by the
    family, and the FFN file checked to hold what the config says."""
    where = files.path / MANIFEST_NAME
    fam = family(files.architecture)
    args = fam.ModelArgs.from_dict(files.config, where=str(where))
    if (args.n_neurons, args.hidden_size) != (files.n_neurons, files.dim):
        raise ModelFormatError(
            f"{where}: the FFN holds {files.n_neurons} neurons of dim {files.dim}, the config says "
            f"{args.n_neurons} of {args.hidden_size}; re-run `flashrt convert` to rebuild the model directory")
    return fam, args


def load_model(files: ModelFiles, make_ffn, n_threads: int | None = None):
    """The model of an opened directory: resident tensors loaded and checked against the
    family's table, the FFN that `make_ffn(spec, weights)` builds from the family's FFNSpec.
    Returns the family's Model (its FFN is `model.ffn`)."""
    fam, args = model_args(files)
    weights = files.load_resident()
    files.check_resident(weights, fam.tensors(args)[0])
    ffn = make_ffn(fam.ffn_spec(args, weights), weights)
    return fam.Model(args, weights, ffn, KernelLinear(n_threads))


def predictors_path(files: ModelFiles) -> Path:
    return files.path / PREDICTORS_NAME


def choose_select(files: ModelFiles, select: str | None) -> str:
    """The selection policy: the caller's, else the predictor when the model has one, else all."""
    if select is not None:
        if select not in SELECTS:
            raise FlashrtError(f"select must be one of {', '.join(SELECTS)}; got {select!r}")
        if select == "predictor" and not predictors_path(files).is_file():
            raise FlashrtError(f"{files.path} has no predictors; run `flashrt calibrate --model {files.path}` first")
        return select
    if predictors_path(files).is_file():
        return "predictor"
    warnings.warn(
        f"{files.path.name} has no sparsity predictors, so flash mode reads every FFN neuron (select='all'); "
        f"run `flashrt calibrate --model {files.path}` to read only the neurons each token needs",
        stacklevel=3,
    )
    return "all"


def flash_ffn(files: ModelFiles, spec, plan: BudgetPlan, mode: str, select: str, sparsity, window: int,
              n_threads: int, predictors=None, gate_first: bool = False) -> FlashFFN:
    """The FlashFFN for an opened model, its selector built from `select`.

    predictors: the PredictorSet already loaded (else read from the model directory);
    gate_first: score with the exact gate rows, read into DRAM here (see flashrt/policy.py)."""
    if not isinstance(window, int) or window < 1:
        raise FlashrtError(f"window must be a positive integer, got {window!r}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise FlashrtError(f"sparsity must be in [0, 1), got {sparsity!r}")
    keep = None if sparsity is None else 1.0 - sparsity
    if mode == "naive" or select == "all":
        selector = AllSelector(files.n_neurons)
    elif select == "oracle":
        selector = OracleSelector(files, spec.gated, spec.act_code, spec.up_bias, keep if keep is not None else 0.5,
                                  n_threads, spec.act_param, spec.relu_sparse)
    else:
        pset = (predictors if predictors is not None
                else PredictorSet.load(files.path, files.dim, files.n_neurons, files.n_layers))
        if gate_first:
            selector = GateFirstSelector(pset, GateFirstSelector.read_gates(files), keep, n_threads, files.qtype)
        else:
            selector = PredictorSelector(pset, keep)
    return FlashFFN(files, spec, plan, mode, selector, window, n_threads)


@dataclass
class GenerationStats:
    """Speed of the last generation, and (flash modes) what the FFN cost per decoded token."""

    n_prompt_tokens: int = 0
    n_generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ffn: dict = field(default_factory=dict)  # flash/naive: per-token I/O and cache figures
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" (max_new_tokens or the context)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.n_prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from the prefill's logits: decode steps = n - 1
        n = max(self.n_generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"prompt: {self.n_prompt_tokens} tokens in {self.prefill_seconds:.2f} s "
            f"({self.prefill_tokens_per_second:.1f} tok/s)",
            f"decode: {self.n_generated_tokens} tokens in {self.decode_seconds:.2f} s "
            f"({self.decode_tokens_per_second:.1f} tok/s)",
        ]
        if self.finish_reason is not None:
            lines.append(f"finish: {self.finish_reason}")
        for key, value in self.ffn.items():
            lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        return "\n".join(lines)


@dataclass
class GenerationResponse:
    """One step of Generator.stream_generate (mlx-lm's GenerationResponse): the text this token
    added (may be "" while a stop string or a split UTF-8 character is held back), the token id
    (None only on the closing item of a generation that decoded nothing), and, on the last item
    only, why the generation ended."""

    text: str
    token: int | None
    finish_reason: str | None = None  # None, then "stop" (EOS or a stop string) or "length" on the last item
    logprob: float | None = None  # logprobs=k: log-probability of `token` under the model
    top_logprobs: dict | None = None  # logprobs=k: {token id: log-probability} of the k most likely, best first
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0  # tokens decoded so far, this one included
    generation_tps: float = 0.0


@dataclass
class Generation:
    """generate(..., logprobs=k): the text, the token ids, their log-probabilities and the top k
    alternatives per token (GenerationResponse.logprob / top_logprobs), and the finish reason."""

    text: str
    tokens: list
    logprobs: list
    top_logprobs: list
    finish_reason: str | None


class Generator:
    """A language model ready to generate text.

    path          a converted flashrt model directory, a GGUF file or a Hugging Face directory
                  (the last two are converted once into FLASHRT_HOME); None = the default model.
    mode          "dense" (all weights in DRAM), "flash" (FFN neurons read from flash on demand,
                  kept in a sliding-window cache) or "naive" (every FFN weight read every token).
    memory_budget bytes (int) or a size like "200MB" (flash/naive): resident tensors, neuron
                  caches, KV cache and buffers are planned to fit; too small -> BudgetError.
    threads       compute threads (default: FLASHRT_THREADS, OMP_NUM_THREADS or all cores).
    select        flash mode neuron selection: "all", "oracle" or "predictor" (default: the
                  predictor when the model has one and calibration measured it within +5% at
                  this budget, else "all"; above +10% it warns, see flashrt/policy.py).
    sparsity      fraction of FFN neurons skipped per token (predictor/oracle selection).
    window        tokens a neuron stays cached after it was last selected (flash mode).
    max_context   KV-cache length (default: min(model's, 2048), smaller under a tight budget).
    scoring       predictor selection: "product" (low-rank gate and up estimates), "gate-first"
                  (exact gate rows held in DRAM x the low-rank up estimate) or None: the one the
                  calibration curve says keeps quality best at this budget (flashrt/policy.py).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        mode: str = "dense",
        memory_budget: int | str | None = None,
        threads: int | None = None,
        select: str | None = None,
        sparsity: float | None = None,
        window: int = 5,
        max_context: int | None = None,
        progress: bool = True,
        scoring: str | None = None,
    ):
        if mode not in MODES:
            raise FlashrtError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise FlashrtError(f"threads must be a positive integer, got {threads!r}")
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer))
                                        or max_context < 1):
            raise GenerationError(f"max_context must be a positive integer, got {max_context!r}")
        self.mode = mode
        self.n_threads = threads or default_threads()
        self.path = resolve_model_path(path, progress=progress)
        self._lock = threading.Lock()  # one generation at a time per Generator
        self._closed = False
        self.files = ModelFiles.open(self.path)
        try:
            self.config = self.files.config
            _, args = model_args(self.files)  # the config validated before anything is built
            rss_before = _rss_bytes()
            self.tokenizer = Tokenizer.from_dir(self.files.tokenizer_dir) if self.files.tokenizer_dir else None
            _return_freed_memory()  # the parse's scratch (~31 MB for SmolLM2) is freed: hand it back
            tokenizer_bytes = _tokenizer_bytes(self.files.tokenizer_dir, _rss_bytes() - rss_before)
            n_ctx_model = int(self.config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT)
            self.plan = None
            self.select = None
            if mode == "dense":
                self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, n_ctx_model)
                if memory_budget is not None:
                    check_dense_budget(self.files, args, memory_budget, self.max_context)
            else:
                if getattr(args, "n_experts", None):  # a mixture of experts: the router selects, exactly
                    if select not in (None, "all"):
                        raise FlashrtError(f"select={select!r}: a mixture-of-experts model is routed exactly by its "
                                           f"router; leave select unset")
                    self.select = "all"
                else:
                    self.select = choose_select(self.files, select) if mode == "flash" else "all"
                pred = predictors_path(self.files)
                pred_bytes = 0
                if self.select == "predictor":  # counted as held in RAM (float32 scoring copies), not as the file
                    pred_bytes = predictor_ram_bytes(pred, self.files.dim, self.files.n_neurons)
                pset = None
                # loaded only where the budget holds them: a load the policy then refuses would sit in DRAM
                # beside the resident tensors until the open ends (OPT-1.3B q4_0: 64 MB over its budget,
                # OOM-killed in a memory cgroup of the budget); the policy computes every neuron instead
                if self.select == "predictor" and _plan_fits(self.files, args, mode, memory_budget, max_context,
                                                             n_ctx_model, pred_bytes, tokenizer_bytes):
                    pset = PredictorSet.load(self.files.path, self.files.dim, self.files.n_neurons,
                                             self.files.n_layers)
                self.policy = choose_policy(self.files, args, mode, self.select, select, memory_budget, max_context,
                                            n_ctx_model, pred_bytes, tokenizer_bytes, pset, scoring)
                if self.policy.select != "predictor":
                    pset = None  # the policy chose not to use them: free them before the model loads
                if self.policy.warning:
                    warn_once(self.policy.warning)
                self.select, self.plan = self.policy.select, self.policy.plan
                self.max_context = self.plan.max_context

            def make_ffn(spec, weights):  # held by self at once: close() releases it if the model fails
                if isinstance(spec, MoESpec):
                    self.ffn = (MoEFFN.from_files(self.files, spec, n_threads=self.n_threads) if mode == "dense"
                                else FlashMoEFFN(self.files, spec, self.plan.cache_rows, self.n_threads,
                                                 reuse=mode == "flash"))
                elif mode == "dense":
                    self.ffn = DenseFFN.from_files(self.files, spec, n_threads=self.n_threads)
                else:
                    self.ffn = flash_ffn(self.files, spec, self.plan, mode, self.select, sparsity, window,
                                         self.n_threads, pset if self.select == "predictor" else None,
                                         self.policy.gate_first)
                return self.ffn

            self.model = load_model(self.files, make_ffn, self.n_threads)
            self.kv = KVCache(args.num_hidden_layers, self.max_context, args.num_key_value_heads, args.head_dim)
            _return_freed_memory()  # the load's scratch is freed: hand it back before the first token
        except BaseException as e:
            self.close()
            if isinstance(e, (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError)) and \
                    not isinstance(e, FlashrtError):  # a config that passed the checks but cannot work
                raise ModelFormatError(
                    f"{self.path}: cannot build the model from its files ({type(e).__name__}: {e}); "
                    "re-run `flashrt convert` to rebuild the model directory") from e
            raise
        self.stats = GenerationStats()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release files, threads and caches. The Generator cannot be used afterwards.

        Called while a generation runs (another thread, or an unfinished stream), the
        release happens when that generation ends; it stops at its next token."""
        if self._closed:
            return
        self._closed = True
        if not self._lock.acquire(blocking=False):
            return  # the running generation frees everything in _release()
        try:
            self._free()
        finally:
            self._lock.release()

    def _free(self) -> None:
        ffn = getattr(self, "ffn", None)  # absent when the constructor failed before it
        if ffn is not None:
            ffn.close()
        files = getattr(self, "files", None)
        if files is not None:
            files.close()
        self.model = self.ffn = self.kv = self.tokenizer = None
        _return_freed_memory()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FlashrtError("this Generator is closed; open a new one")

    def _acquire(self) -> None:
        """Take the Generator for one call (one thread at a time) and quiet NumPy's BLAS threads."""
        self._check_open()
        if not self._lock.acquire(blocking=False):
            raise FlashrtError(
                "this Generator is already generating (in another thread, or a stream() that was "
                "neither exhausted nor closed); use one Generator per thread or serialise the calls"
            )
        self._blas_limit = blas_single_threaded()
        self._blas_limit.__enter__()

    def _release(self) -> None:
        self._blas_limit.__exit__(None, None, None)
        self._lock.release()
        # close() was called during the generation: free now (checked after the release, so a
        # close() racing with it either sees the lock free or leaves _closed for this check)
        if self._closed and self._lock.acquire(blocking=False):
            try:
                self._free()
            finally:
                self._lock.release()

    def _check_finite(self, logits: np.ndarray, where: str) -> np.ndarray:
        """Non-finite logits mean corrupt weights (a flipped byte the cheap checks at open miss)."""
        if not np.isfinite(logits).all():
            raise ModelFormatError(
                f"{self.path}: the model produced non-finite logits ({where}); its weights are "
                f"probably corrupt: check every byte with `flashrt info --verify --model {self.path}` "
                "and re-run `flashrt convert`")
        return logits

    def _encode(self, text: str, **kwargs) -> list:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenerationError(
                f"the text is not valid Unicode ({e.reason} at index {e.start}: bytes that were not "
                "UTF-8?); decode it with the right encoding first") from None
        return self._require_tokenizer().encode(text, **kwargs)

    # ------------------------------------------------------------------ forward
    def _require_tokenizer(self):
        self._check_open()
        if self.tokenizer is None:
            raise FlashrtError(f"the model at {self.path} has no tokenizer; pass token ids to .logits()")
        return self.tokenizer

    def _reset(self) -> None:
        self.kv.reset()
        self.ffn.reset()

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError) as e:
            raise GenerationError(f"token ids must be a 1-D sequence of integers ({e})") from None
        if arr.ndim != 1 or arr.size == 0:
            raise GenerationError("need a non-empty 1-D sequence of token ids")
        if not np.issubdtype(arr.dtype, np.integer):
            raise GenerationError(f"token ids must be integers, got dtype {arr.dtype}")
        vocab = int(self.config["vocab_size"])
        if arr.min() < 0 or arr.max() >= vocab:
            raise GenerationError(f"token ids must be in [0, {vocab}); got {arr.min()}..{arr.max()}")
        if arr.size > self.max_context:
            raise GenerationError(
                f"{arr.size} tokens do not fit the context of {self.max_context}; "
                "shorten the input or raise max_context"
            )
        return arr.astype(np.int64)

    # the named steps of a generation (the gpt-fast habit); the caller holds the lock
    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        """A fresh sequence: the prompt ids (T,) through the model; logits (vocab,) of the last
        position only (the head runs over one row, not T)."""
        self._reset()
        return self._check_finite(self.model.forward(ids, self.kv, last_only=True)[0], "prompt")

    def _decode_one(self, token: int, where: str = "decode") -> np.ndarray:
        """One more token through the decode path; logits (vocab,) of its position."""
        logits = self.model.forward(np.array([token], dtype=np.int64), self.kv)[0]
        return self._check_finite(logits, where)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """A fresh forward pass over the ids as one batch: logits (n_tokens, vocab) float32."""
        self._acquire()
        try:
            ids = self._check_ids(token_ids)
            self._reset()
            return self._check_finite(self.model.forward(ids, self.kv), "forward pass")
        finally:
            self._release()

    def decode_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """A fresh sequence fed one token at a time through the decode path (in flash mode:
        predictor, window and cache at work): logits (n_tokens, vocab) float32, row i after
        token i. `stats.ffn` then holds the FFN's per-token figures over these tokens."""
        self._acquire()
        try:
            ids = self._check_ids(token_ids)
            self._reset()
            self.ffn.start_decode()
            rows = np.stack([self._decode_one(int(t), "decode_logits") for t in ids])
            self.stats = GenerationStats(n_prompt_tokens=0, ffn=self.ffn.decode_stats())
            return rows
        finally:
            self._release()

    # ------------------------------------------------------------------ generation
    def stream(
        self,
        prompt: str,
        max_new_tokens: int | None = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        **sampling,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is decoded. `sampling`:
        min_p, repeat_penalty, repeat_last_n (see SamplingParams)."""
        for r in self.stream_generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed, stop=stop, **sampling):
            if r.text:
                yield r.text

    def generate(self, prompt: str, max_new_tokens: int | None = 128, logprobs: int | None = None, **kwargs):
        """The continuation of `prompt` as one string (greedy unless temperature > 0). With
        logprobs=k, a Generation: the text with every token's log-probability and its top k."""
        if logprobs is None:
            return "".join(self.stream(prompt, max_new_tokens, **kwargs))
        out = list(self.stream_generate(prompt, max_new_tokens, logprobs=logprobs, **kwargs))
        steps = [r for r in out if r.token is not None and r.logprob is not None]
        return Generation(text="".join(r.text for r in out), tokens=[r.token for r in steps],
                          logprobs=[r.logprob for r in steps], top_logprobs=[r.top_logprobs for r in steps],
                          finish_reason=out[-1].finish_reason if out else None)

    def chat(self, messages: list[dict], max_new_tokens: int | None = 256, **kwargs) -> str:
        """The assistant's reply to a conversation [{"role": ..., "content": ...}, ...]."""
        return "".join(self.stream_chat(messages, max_new_tokens, **kwargs))

    def stream_chat(self, messages: list[dict], max_new_tokens: int | None = 256, **kwargs) -> Iterator[str]:
        for r in self.stream_generate(self.encode_chat(messages), max_new_tokens, **kwargs):
            if r.text:
                yield r.text

    def encode_chat(self, messages: list[dict]) -> list:
        """The token ids of a conversation rendered with the model's chat template, ready for the
        assistant's reply (stream_generate takes them as its prompt)."""
        tok = self._require_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return self._encode(text, add_bos=False)  # the template places any BOS itself

    def stream_generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int | None = 128,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int | None = None,
    ) -> Iterator[GenerationResponse]:
        """The response stream (as mlx-lm's stream_generate): one GenerationResponse per decoded
        token, the last one with its finish_reason. `prompt` is text (encoded with the model's
        BOS rule) or token ids (encode_chat(messages) for a conversation). max_new_tokens=None
        runs to the end of the context. logprobs=k adds each token's log-probability and the k
        most likely tokens' (k=0: the token's own only)."""
        if isinstance(prompt, str):
            self._require_tokenizer()
            if prompt == "":
                raise GenerationError("the prompt is empty; give at least one character")
            prompt = self._encode(prompt)
        elif not isinstance(prompt, (list, tuple, np.ndarray)):
            raise GenerationError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer))
                                     or not 0 <= logprobs <= 20):
            raise GenerationError(f"logprobs must be an integer from 0 to 20 or None, got {logprobs!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise GenerationError("stop must be a non-empty string or a list of them")
        ids, max_new_tokens, params, rng = self._generation_args(
            prompt, max_new_tokens, temperature, top_k, top_p, seed,
            min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        self._acquire()
        try:
            yield from self._responses(ids, max_new_tokens, params, rng, stops, logprobs)
        finally:
            self._release()

    def stream_tokens(self, token_ids: Sequence[int], max_new_tokens: int | None = 128, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      stop_at_eos: bool = True, **sampling) -> Iterator[int]:
        """Yield the token ids that continue `token_ids` (the prompt), one per decode step.
        stop_at_eos=False decodes all max_new_tokens (benchmarks). `stats` describes the run."""
        ids, max_new_tokens, params, rng = self._generation_args(token_ids, max_new_tokens, temperature, top_k,
                                                                 top_p, seed, **sampling)
        eos = self.tokenizer.eos_token_ids if stop_at_eos and self.tokenizer is not None else ()
        self._acquire()
        try:
            for token, _ in self._steps(ids, max_new_tokens, params, rng, eos):
                if token not in eos:
                    yield token
        finally:
            self._release()

    def _generation_args(self, ids, max_new_tokens, temperature, top_k, top_p, seed, **sampling):
        """The checked arguments of a generation: (ids, max_new_tokens clamped to the context,
        SamplingParams, rng). max_new_tokens=None: the rest of the context."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **sampling)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or
                                           not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0):
            raise GenerationError(f"max_new_tokens must be an integer >= 0 or None, got {max_new_tokens!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise GenerationError(f"seed must be a non-negative integer or None, got {seed!r}")
        ids = self._check_ids(ids)
        # Tokens past the context cannot be computed: clamp, documented in the README.
        room = self.max_context - ids.size
        max_new_tokens = room if max_new_tokens is None else min(int(max_new_tokens), room)
        return ids, max_new_tokens, params, np.random.default_rng(seed)

    def _steps(self, ids, max_new_tokens, params, rng, eos):
        """The decode loop: prefill, then sample -> yield (token, its logits) -> decode one, until
        max_new_tokens or a token in `eos` (yielded, then the loop ends). Fills self.stats (its
        finish_reason too), also when the caller stops early."""
        stats = self.stats = GenerationStats(n_prompt_tokens=int(ids.size))
        if max_new_tokens == 0:
            stats.finish_reason = "length"
            return
        history = ids.tolist() if params.repeat_penalty != 1.0 else None
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        stats.prefill_seconds = time.perf_counter() - t0
        self.ffn.start_decode()
        t_decode = time.perf_counter()
        try:
            for i in range(max_new_tokens):
                if self._closed:
                    raise FlashrtError("the Generator was closed during the generation")
                token = sample(logits, params, rng, history)
                stats.n_generated_tokens += 1
                if token in eos:
                    stats.finish_reason = "stop"
                    yield token, logits
                    break
                if i + 1 == max_new_tokens:
                    stats.finish_reason = "length"
                yield token, logits
                if history is not None:
                    history.append(token)
                if i + 1 < max_new_tokens:
                    logits = self._decode_one(token, f"token {i + 1}")
                    stats.decode_seconds = time.perf_counter() - t_decode
        finally:
            stats.decode_seconds = time.perf_counter() - t_decode
            stats.ffn = self.ffn.decode_stats()

    def _responses(self, ids, max_new_tokens, params, rng, stops, logprobs):
        """GenerationResponses of the continuation of ids: text held back at stop strings and
        split UTF-8, EOS shown as no text; the caller holds the lock."""
        tok = self.tokenizer
        eos = tok.eos_token_ids if tok is not None else ()
        detok = _IncrementalText(tok, stops) if tok is not None else None
        steps = self._steps(ids, max_new_tokens, params, rng, eos)
        stats = self.stats
        finish = None
        try:
            for token, logits in steps:
                stats = self.stats
                is_eos = token in eos
                text = "" if is_eos or detok is None else detok.push(token)
                if is_eos or (detok is not None and detok.stopped):
                    finish = "stop"
                elif stats.n_generated_tokens == max_new_tokens:
                    finish = "length"
                if finish is not None and detok is not None:
                    text += detok.flush()
                lp = top = None
                if logprobs is not None:
                    lp, top = top_logprobs(logits, token, logprobs)
                yield GenerationResponse(
                    text=text, token=int(token), finish_reason=finish, logprob=lp, top_logprobs=top,
                    prompt_tokens=stats.n_prompt_tokens, prompt_tps=stats.prefill_tokens_per_second,
                    generation_tokens=stats.n_generated_tokens, generation_tps=stats.decode_tokens_per_second)
                if finish is not None:
                    stats.finish_reason = finish
                    return
        finally:
            steps.close()
        stats = self.stats  # nothing decoded (max_new_tokens 0): one closing item
        yield GenerationResponse(text="", token=None, finish_reason=stats.finish_reason or "length",
                                 prompt_tokens=stats.n_prompt_tokens)

    def __repr__(self) -> str:
        return f"Generator({str(self.path)!r}, mode={self.mode!r})"


# What a loaded tokenizer holds, per byte of its tokenizer.json. Measured on SmolLM2 (1.56 MB of
# JSON, 49152 tokens, 48900 merges): Tokenizer.from_dir adds ~50 MB of RSS, but ~31 MB of that
# is the parse's scratch (the JSON text, serde's intermediate values), freed at once and kept by
# glibc until malloc_trim. What stays is ~19 MB: the vocabulary, merges and added-token matcher
# (~14 MB of heap) and the tokenizers library's pages (~4 MB), 12.4x the JSON. The old 32x
# charged the scratch too.
TOKENIZER_BYTES_PER_JSON_BYTE = 13


def _tokenizer_bytes(tokenizer_dir, measured: int) -> int:
    """DRAM the loaded tokenizer holds: what loading it added to RSS, but never less than the
    measured ratio to its JSON size (a second load in one process may reuse freed memory and
    show no growth, yet it holds as much)."""
    if tokenizer_dir is None:
        return 0
    json_path = Path(tokenizer_dir) / "tokenizer.json"
    floor = TOKENIZER_BYTES_PER_JSON_BYTE * json_path.stat().st_size if json_path.is_file() else 0
    return max(measured, floor)


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _plan_fits(files, args, mode, memory_budget, max_context, n_ctx_model, predictor_bytes, tokenizer_bytes) -> bool:
    """Does a plan with the predictors held fit the budget? (None: no budget, it always does)"""
    try:
        plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model, predictor_bytes, tokenizer_bytes)
    except BudgetError:
        return False
    return True


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps big freed blocks for reuse once its
    mmap threshold has adapted upwards, so without this a closed SmolLM2 Generator left
    ~150-300 MB in RSS (measured; ~6 MB with it). A no-op where malloc_trim does not exist."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class _IncrementalText:
    """Token ids -> text pieces: the tokenizer's stream decoder (which holds back incomplete
    UTF-8), plus stop strings: text that could still become a stop string is held back."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = tokenizer.decode_stream()
        self.stops = stops
        self.pending = ""  # decoded but not yet yielded
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.step(token)
        return self._take()

    def _take(self) -> str:
        for s in self.stops:
            at = self.pending.find(s)
            if at != -1:
                self.stopped = True
                piece, self.pending = self.pending[:at], ""
                return piece
        keep = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        piece = self._take()
        if self.stopped:
            return piece
        piece, self.pending = piece + self.pending, ""
        return piece
