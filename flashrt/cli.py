"""The `flashrt` command: convert | generate | chat | info | perplexity | calibrate | models.

Every flashrt error becomes one line on stderr and exit code 1 (2 for usage errors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from . import __version__
from .errors import FlashrtError


def _add_model_options(p: argparse.ArgumentParser, modes: bool = True) -> None:
    p.add_argument("--model", default=None, help="model directory, GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    if modes:
        p.add_argument("--mode", choices=["dense", "flash", "naive"], default="dense",
                       help="dense: all in DRAM; flash: FFN neurons read from flash on demand; naive: whole FFN read every token")
        p.add_argument("--memory-budget", default=None, help="e.g. 200MB, 1.5GB (flash/naive modes)")
        p.add_argument("--select", choices=["all", "oracle", "predictor"], default=None,
                       help="flash mode: which FFN neurons to read (default: predictor if calibrated, else all)")
        p.add_argument("--sparsity", type=float, default=None, help="fraction of FFN neurons skipped per token (flash mode)")
        p.add_argument("--window", type=int, default=5, help="flash mode: tokens a neuron stays cached")
        p.add_argument("--max-context", type=int, default=None, help="KV cache length")


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


def cmd_generate(args) -> int:
    with _open_generator(args) as g:
        for piece in g.stream(args.prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats:
            print(g.stats.summary(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    with _open_generator(args) as g:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        print("flashrt chat — empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                user = input("> ")
            except EOFError:
                break
            if not user.strip():
                break
            messages.append({"role": "user", "content": user})
            reply = []
            for piece in g.stream_chat(messages, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if args.stats:
                print(g.stats.summary(), file=sys.stderr)
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


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
            "dtype": files.storage,
            "ffn_down_dtype": files.manifest.ffn.get("down_dtype", files.storage),
            "resident_quantized": dict(sorted(Counter(m.tensor_dtypes.values()).items())),
            "layers": files.config.get("num_hidden_layers"),
            "hidden_size": files.dim,
            "ffn_neurons": files.n_neurons,
            "ffn_parts": list(files.ffn_parts),
            "ffn_row_bytes": files.ffn_row_bytes,
            "bytes_resident": files.resident_bytes,
            "bytes_ffn": files.ffn_bytes,
            "vocab_size": files.config.get("vocab_size"),
            "max_position_embeddings": files.config.get("max_position_embeddings"),
            "tokenizer": files.tokenizer_dir is not None,
            "predictors": (files.path / "predictors.npz").is_file(),
            "format_version": getattr(m, "format_version", None),
            "verified": bool(args.verify),
        }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                print(f"{k}: {v}")
    return 0


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

    def sampling(p):
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stats", action="store_true", help="print tokens/s (and flash I/O figures) to stderr")

    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    p.add_argument("prompt")
    _add_model_options(p)
    sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (models with a chat template)")
    p.add_argument("--system", default=None)
    _add_model_options(p)
    sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="describe a converted model")
    p.add_argument("--model", default=None)
    p.add_argument("--verify", action="store_true", help="check full checksums of every file")
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
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None, help="calibration text (default: sampled from the model)")
    p.add_argument("--tokens", type=int, default=4096)
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


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    print("flashrt: error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
