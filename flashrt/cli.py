"""The `flashrt` command: convert | generate | chat | serve | info | perplexity | calibrate | models.

Every flashrt error becomes one line on stderr and exit code 1 (2 for usage errors), every
warning one line `flashrt: warning: ...`. The short flags follow llama.cpp's (-m -p -f -n -t -c).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter

from . import __version__
from .errors import FlashrtError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help of every flag that has one (None and False say nothing)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model_options(p: argparse.ArgumentParser, modes: bool = True) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model directory, GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    if modes:
        p.add_argument("--mode", choices=["dense", "flash", "naive"], default="dense",
                       help="dense: all in DRAM; flash: FFN neurons read from flash on demand; naive: whole FFN read every token")
        p.add_argument("--memory-budget", default=None, help="e.g. 200MB, 1.5GB (flash/naive modes)")
        p.add_argument("--select", choices=["all", "oracle", "predictor"], default=None,
                       help="flash mode: which FFN neurons to read (default: predictor if calibrated, else all)")
        p.add_argument("--sparsity", type=float, default=None, help="fraction of FFN neurons skipped per token (flash mode)")
        p.add_argument("--window", type=int, default=5, help="flash mode: tokens a neuron stays cached")
        p.add_argument("-c", "--max-context", "--ctx-size", dest="max_context", type=int, default=None,
                       help="context length in tokens: the KV cache (default: the model's, at most 2048)")


def _open_generator(args):
    from .api import Generator  # start-up cost: a command loads only what it runs

    kwargs = {}
    if getattr(args, "mode", None):
        kwargs = dict(mode=args.mode, memory_budget=args.memory_budget, select=args.select,
                      sparsity=args.sparsity, window=args.window, max_context=args.max_context)
    return Generator(args.model, threads=args.threads, **kwargs)


def cmd_convert(args) -> int:
    from .convert import convert  # start-up cost: a command loads only what it runs

    t0 = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def _warn_greedy_ignores(args) -> None:
    """Temperature 0 is greedy: say so when truncation flags were given that cannot act."""
    if args.temperature == 0:
        names = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p))
                 if v is not None]
        if names:
            warnings.warn(f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no effect at temperature 0 "
                          "(greedy decoding takes the most likely token); pass --temp above 0 to sample")


def _read_prompt(args) -> str:
    """The prompt: positional, -p TEXT, -p - (stdin) or -f FILE."""
    given = [x for x in (args.prompt, args.prompt_opt, args.file) if x is not None]
    if args.file is not None or args.prompt_opt == "-":
        name = "stdin" if args.file is None else args.file
        raw = sys.stdin.buffer.read() if args.file is None else open(args.file, "rb").read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FlashrtError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return given[0]


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    _warn_greedy_ignores(args)
    with _open_generator(args) as g:
        has_template = bool(g.tokenizer is not None and g.tokenizer.chat_template)
        use_chat = args.chat or args.system is not None or (not args.raw and has_template)
        if use_chat and not has_template:
            raise FlashrtError(f"{g.path.name} has no chat template; drop --chat/--system to continue the raw prompt")
        if use_chat:
            messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                       [{"role": "user", "content": prompt}]
            source = g.encode_chat(messages)
        else:
            source = prompt
        text, tokens, finish = [], [], None
        for r in g.stream_generate(source, args.max_tokens, stop=args.stop, **_sampling_kwargs(args)):
            if r.token is not None:
                tokens.append(r.token)
            finish = r.finish_reason or finish
            text.append(r.text)
            if not args.json and r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
        st = g.stats
        if args.json:
            out = {"text": "".join(text), "tokens": tokens, "finish_reason": finish, "chat": use_chat,
                   "prompt_tokens": st.n_prompt_tokens, "generated_tokens": st.n_generated_tokens,
                   "timings": {"prompt_seconds": st.prefill_seconds,
                               "prompt_tokens_per_second": st.prefill_tokens_per_second,
                               "decode_seconds": st.decode_seconds,
                               "decode_tokens_per_second": st.decode_tokens_per_second}}
            if st.ffn:
                out["ffn"] = st.ffn
            print(json.dumps(out))
        else:
            sys.stdout.write("\n")
        if args.stats:
            print(st.summary(), file=sys.stderr)
    return 0


def _fit_history(g, system: list, turns: list, reserve: int):
    """The prompt ids of system + turns, dropping the oldest user/assistant pairs until the
    reply has `reserve` tokens of room. (ids or None when the last message alone does not fit,
    number of turns dropped)."""
    dropped = 0
    while True:
        ids = g.encode_chat(system + turns)
        if len(ids) + reserve <= g.max_context or len(turns) <= 1:
            break
        del turns[:2]
        dropped += 1
    if len(ids) >= g.max_context:
        return None, dropped
    return ids, dropped


def cmd_chat(args) -> int:
    _warn_greedy_ignores(args)
    with _open_generator(args) as g:
        if g.tokenizer is None or not g.tokenizer.chat_template:
            raise FlashrtError(f"{g.path.name} has no chat template; use `flashrt generate --raw`")
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        system = [{"role": "system", "content": args.system}] if args.system else []
        turns = []
        n = args.max_tokens
        reserve = min(n, g.max_context // 2) if n is not None else g.max_context // 4
        print(f"flashrt chat ({g.path.name}, context {g.max_context} tokens): Ctrl-C stops a reply; "
              "Ctrl-D or an empty line quits", file=sys.stderr)
        while True:
            try:
                user = input("> ")
            except EOFError:
                break
            if not user.strip():
                break
            turns.append({"role": "user", "content": user})
            reply, finish, stream = [], None, None
            try:  # Ctrl-C from here on stops this reply, not the session
                ids, dropped = _fit_history(g, system, turns, reserve)
                if dropped:
                    print(f"flashrt: dropped the oldest {dropped} turn(s) to fit the context of "
                          f"{g.max_context} tokens", file=sys.stderr)
                if ids is None:
                    turns.pop()
                    print(f"flashrt: that message does not fit the context of {g.max_context} tokens; "
                          "send a shorter one (or raise -c)", file=sys.stderr)
                    continue
                stream = g.stream_generate(ids, n, stop=args.stop, **_sampling_kwargs(args))
                for r in stream:
                    reply.append(r.text)
                    finish = r.finish_reason
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                finish = "interrupted"
            finally:
                if stream is not None:
                    stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if finish == "interrupted":
                print("flashrt: reply stopped (Ctrl-C); the conversation goes on", file=sys.stderr)
            elif finish == "length":
                where = f"the -n limit of {n} tokens" if n is not None and g.stats.n_generated_tokens >= n \
                    else f"the end of the context ({g.max_context} tokens)"
                print(f"flashrt: reply cut at {where}", file=sys.stderr)
            if args.stats:
                print(g.stats.summary(), file=sys.stderr)
            turns.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_serve(args) -> int:
    from .server import serve  # start-up cost, and the optional extra: only `serve` needs it

    return serve(args)


def cmd_info(args) -> int:
    from .format.reader import ModelFiles  # start-up cost: a command loads only what it runs
    from .home import resolve_model_path  # start-up cost: a command loads only what it runs

    with ModelFiles.open(resolve_model_path(args.model)) as files:
        if args.verify:
            files.verify(full=True)
        m = files.manifest
        info = {
            "path": str(files.path),
            "architecture": files.architecture,
            "model_type": files.config.get("model_type"),
            **_ffn_kind(files, args.measure),
            "dtype": files.storage,
            "ffn_down_dtype": files.manifest.ffn.get("down_dtype", files.storage),
            "resident_quantized": dict(sorted(Counter(m.tensor_dtypes.values()).items())),
            "layers": files.config.get("num_hidden_layers"),
            "hidden_size": files.dim,
            "ffn_neurons": files.n_neurons,
            "ffn_parts": list(files.ffn_parts),
            "ffn_row_bytes": files.ffn_row_bytes,
            **({"experts": f"{files.config['num_local_experts']} per layer of "
                           f"{files.config['intermediate_size']} neurons "
                           f"({files.config['intermediate_size'] * files.ffn_row_bytes} bytes each), "
                           f"top-{files.config['num_experts_per_tok']} per token"}
               if files.config.get("num_local_experts") else {}),
            "bytes_resident": files.resident_bytes,
            "bytes_ffn": files.ffn_bytes,
            "vocab_size": files.config.get("vocab_size"),
            "max_position_embeddings": files.config.get("max_position_embeddings"),
            "tokenizer": files.tokenizer_dir is not None,
            "predictors": (files.path / "predictors.npz").is_file(),
            "format_version": getattr(m, "format_version", None),
            "verified": bool(args.verify),
        }
        curves = _quality_curves(files) if info["predictors"] else []
        if args.json:
            info["quality_curves"] = [dict(c.to_dict(), scoring=name, budgets=b) for name, c, b in curves]
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                print(f"{k}: {v}")
            for name, c, budgets in curves:
                print(f"{name} scoring, {c.summary(budgets)}")
    return 0


def _ffn_kind(files, measure_tokens):
    """The FFN's family, activation and sparsity class; its measured share of exactly-zero
    neurons from `--measure N` (a dense pass over N tokens) or else from calibration (ReLU-kind
    predictors record it), None when neither."""
    from .api import model_args  # start-up cost: a command loads only what it runs
    from .ffn.base import sparsity_class

    _, margs = model_args(files)
    act = getattr(margs, "ffn_act", None)
    gated = "gate" in files.ffn_parts
    zero, source = None, None
    if measure_tokens:
        from .calibration import measure_ffn_sparsity  # start-up cost

        got = measure_ffn_sparsity(files.path, measure_tokens)
        zero, source = got["zero_fraction"], f"measured on {got['tokens']} tokens (dense pass)"
    elif (files.path / "predictors.npz").is_file():
        from .errors import ModelFormatError
        from .predictor import PredictorSet  # start-up cost

        try:
            pset = PredictorSet.load(files.path)
            if pset.kind == "relu":
                fires = [r["true_fraction"] for r in pset.info.get("layers", []) if "true_fraction" in r]
                if fires:
                    zero, source = 1.0 - sum(fires) / len(fires), "calibration (held-out tokens)"
        except ModelFormatError:
            pass
    out = {"family": files.architecture, "activation": act, "ffn_gated": gated}
    if act == "fatrelu":
        out["activation_threshold"] = getattr(margs, "hidden_act_param", None)
    out.update({"ffn_sparsity_class": sparsity_class(act, gated, zero),
                "ffn_zero_fraction": None if zero is None else round(zero, 4),
                "ffn_zero_fraction_source": source})
    return out


def _quality_curves(files):
    """[(scoring, QualityCurve, budgets per point)] calibration stored with the predictors."""
    from .api import _tokenizer_bytes, model_args  # start-up cost: a command loads only what it runs
    from .errors import ModelFormatError
    from .policy import curve_budgets  # start-up cost
    from .predictor import PredictorSet  # start-up cost

    try:
        pset = PredictorSet.load(files.path)
    except ModelFormatError:
        return []
    size = (files.path / "predictors.npz").stat().st_size
    n_ctx = int(files.config.get("max_position_embeddings") or 2048)
    margs = model_args(files)[1]
    tok_bytes = _tokenizer_bytes(files.tokenizer_dir, 0)
    out = []
    for name, curve, gate_first in (("product", pset.quality_curve, False),
                                    ("gate-first", pset.quality_curve_gate_first, True)):
        if curve is not None:
            out.append((name, curve, curve_budgets(files, margs, curve, size, tok_bytes, gate_first,
                                                   n_ctx_model=n_ctx)))
    return out


def cmd_perplexity(args) -> int:
    from .perplexity import perplexity  # start-up cost: a command loads only what it runs

    with open(args.text, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlashrtError(f"{args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    with _open_generator(args) as g:
        result = perplexity(g, text, context=args.context, max_tokens=args.max_tokens, progress=not args.quiet)
    for key, value in result.items():
        if key != "perplexity":
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"perplexity: {result['perplexity']:.4f}")
    return 0


def cmd_calibrate(args) -> int:
    from .home import resolve_model_path  # start-up cost: a command loads only what it runs
    from .calibration import calibrate  # start-up cost: a command loads only what it runs

    text = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    model_dir = resolve_model_path(args.model)
    report = calibrate(model_dir, texts=text, n_tokens=args.tokens, sparsity=args.sparsity,
                       rank=args.rank, progress=not args.quiet, n_threads=args.threads)
    print(report.summary())
    return 0


def cmd_models(args) -> int:
    from . import home  # start-up cost: a command loads only what it runs

    if args.models_command == "rm":
        if bool(args.names) == bool(args.all):
            raise FlashrtError("name the models to remove (`flashrt models` lists them), or pass --all")
        names = [m.name for m in home.list_models()] if args.all else args.names
        for name in names:
            print(f"removed {home.remove_model(name)}")
        if args.all and not names:
            print(f"no cached models in {home.models_dir()}")
        return 0
    models = home.list_models()
    if args.json:
        print(json.dumps([dict(vars(m), path=str(m.path)) for m in models], indent=2))
        return 0
    print(f"{home.models_dir()}: {len(models)} cached model(s), "
          f"{home.human_bytes(sum(m.bytes for m in models))}")
    for m in models:
        print(f"{m.name}  {home.human_bytes(m.bytes)}  {m.storage}{'  calibrated' if m.calibrated else ''}"
              f"  from {m.source_kind} {m.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashrt", description="Run LLMs from flash on the CPU.")
    parser.add_argument("--version", action="version", version=f"flashrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file into a flashrt model")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "float16", "q8_0", "q4_0", "q4_1"], default=None,
                   help="storage type (default: a GGUF's own type, e.g. Q4_1 -> q4_1; float16 for "
                        "Hugging Face checkpoints)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    def sampling(p, max_tokens, stats=True):
        p.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                       help="tokens to generate at most" + ("" if max_tokens else
                                                            " (default: up to the end of the context)"))
        p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0,
                       help="sampling temperature; 0 = greedy (top-k/top-p/min-p then change nothing)")
        p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
        p.add_argument("--top-p", type=float, default=None,
                       help="sample among the smallest set reaching probability p (default: off)")
        p.add_argument("--min-p", type=float, default=None,
                       help="drop tokens less than min-p times as likely as the best (default: off)")
        p.add_argument("--repeat-penalty", type=float, default=1.0,
                       help="divide the logits of recently seen tokens by this (1 = off; llama.cpp's rule)")
        p.add_argument("--repeat-last-n", type=int, default=64, help="how many recent tokens the penalty looks at")
        p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: fresh entropy)")
        if stats:
            p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                           help="stop before this text (repeatable)")
            p.add_argument("--stats", action="store_true",
                           help="print tokens/s, the finish reason (and flash I/O figures) to stderr")

    new_parser = lambda *a, **kw: sub.add_parser(*a, formatter_class=_HelpFormatter, **kw)  # noqa: E731

    p = new_parser("generate", help="continue a prompt (chat-templated for instruct models), streaming to stdout")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or -p / -f)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", default=None, metavar="TEXT",
                   help="the prompt; '-' reads it from stdin")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this UTF-8 file")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true",
                      help="apply the model's chat template to the prompt (default: on when the model has one)")
    chat.add_argument("--raw", action="store_true", help="continue the prompt as raw text, no chat template")
    p.add_argument("--system", default=None, help="a system message (implies --chat)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, tokens, finish reason, timings")
    _add_model_options(p)
    sampling(p, 128)
    p.set_defaults(func=cmd_generate, usage_error=p.error)

    p = new_parser("chat", help="interactive chat (models with a chat template)")
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    _add_model_options(p)
    sampling(p, None)
    p.set_defaults(func=cmd_chat)

    p = new_parser("serve", help="an OpenAI-compatible HTTP server (pip install \"flashrt[server]\")")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: FLASHRT_API_KEY, else none)")
    p.add_argument("--name", default=None, help="the model id in /v1/models (default: the model directory's name)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait while one runs; more get HTTP 429")
    _add_model_options(p)
    sampling(p, None, stats=False)
    p.set_defaults(func=cmd_serve)

    p = new_parser("info", help="describe a converted model")
    p.add_argument("-m", "--model", default=None, help="the model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--verify", action="store_true", help="check full checksums of every file")
    p.add_argument("--measure", type=int, nargs="?", const=64, default=0, metavar="N",
                   help="measure the share of exactly-zero FFN neurons with a dense pass over N tokens "
                        "(default 64; reads the whole FFN into DRAM)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("--text", required=True)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--quiet", action="store_true")
    _add_model_options(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("calibrate", help="fit the FFN sparsity predictors of a model")
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--text", default=None, help="calibration text (default: sampled from the model)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=None,
                   help="one predictor rank for every layer (default: per-layer ranks, under 5%% of the FFN's MACs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("models", help="list the cached conversions (`flashrt models rm NAME|--all` removes them)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models, models_command=None)
    rm = p.add_subparsers(dest="models_command").add_parser("rm", help="remove cached conversions")
    rm.add_argument("names", nargs="*", metavar="NAME")
    rm.add_argument("--all", action="store_true", help="remove every cached conversion")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate" and sum(x is not None for x in (args.prompt, args.prompt_opt, args.file)) != 1:
        args.usage_error("give exactly one prompt: PROMPT, -p TEXT, -p - (read stdin) or -f FILE")
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except FlashrtError as e:
        _error(str(e))
        return 1
    except FileNotFoundError as e:
        _error(f"{e.filename or e}: no such file")
        return 1
    except BrokenPipeError:  # stdout closed early (`flashrt generate ... | head`): not an error
        try:
            sys.stdout = open(os.devnull, "w")  # the interpreter's final flush must not fail again
        except OSError:
            pass
        return 141
    except OSError as e:  # a file flashrt was asked to read or write (not a model file)
        _error(f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        print("flashrt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a flashrt bug: still one line, unless asked for the traceback
        if os.environ.get("FLASHRT_DEBUG") == "1":
            raise
        print("flashrt: internal error: " + " ".join(f"{type(e).__name__}: {e}".split())
              + " (set FLASHRT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, no source line."""
    print("flashrt: warning: " + " ".join(str(message).split()), file=sys.stderr)


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    print("flashrt: error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
