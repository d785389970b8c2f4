"""Soak test: generate for a long time in flash mode under a tight memory budget and watch
that nothing drifts -- RSS (flat after warm-up), file descriptors, threads -- and that no
call fails.

    python bench/soak.py                       # the default model, 10 minutes
    python bench/soak.py --minutes 2 --interval 10 --json soak.json
    python bench/soak.py --model DIR --cache-share 0.1 --reopen-every 50

Each iteration streams one completion (greedy or sampled, varied prompts and lengths,
now and then a chat turn or a fresh `logits` pass); every --interval seconds one line of
figures is printed. RSS is split into anonymous memory (what flashrt allocates: the
honest number under a budget) and file-backed pages (mapped files, e.g. the oracle
selection's memory map of ffn.bin, which the kernel can drop at will).

Exit status 0 when there were no errors and nothing drifted, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import flashrt  # noqa: E402
from flashrt.errors import BudgetError  # noqa: E402
from flashrt.api import model_args  # noqa: E402
from flashrt.budget import fmt_bytes, parse_size, plan_budget  # noqa: E402
from flashrt.format import ModelFiles  # noqa: E402
from flashrt.home import resolve_model_path  # noqa: E402

PROMPTS = [
    "The history of the printing press",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
    "Les avantages du train sont",
    "A recipe for bread: first,",
    "The three laws of thermodynamics are",
    "Once upon a time, in a city made of glass,",
    "Explain how a hash table works.",
    "数字 1, 2, 3 之后是",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
]


# -- process figures (Linux /proc) -------------------------------------------------------
def proc_status() -> dict:
    """VmRSS, RssAnon, RssFile in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def n_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# -- budget ------------------------------------------------------------------------------
def tight_budget(path: Path, cache_share: float, max_context: int) -> int:
    """Fixed costs (resident tensors, tokenizer, KV cache, buffers) + `cache_share` of the
    FFN for the neuron caches. The tokenizer is measured here, on its first load in the
    process (the Generator measures it too, by RSS, which a second load no longer shows)."""
    from flashrt.tokenizer import Tokenizer

    files = ModelFiles.open(path)
    before = proc_status()["RssAnon"]
    tok = Tokenizer.from_dir(path) if files.tokenizer_dir else None
    tokenizer_bytes = max(proc_status()["RssAnon"] - before, 0)
    del tok
    n_ctx = int(files.config.get("max_position_embeddings") or 2048)
    plan = plan_budget(files, model_args(files)[1], "flash", None, max_context, n_ctx, tokenizer_bytes=tokenizer_bytes)
    fixed = plan.total - plan.cache_bytes
    return int(fixed + cache_share * files.ffn_bytes)


def open_tight(path: Path, budget: int, args) -> "flashrt.Generator":
    """A flash Generator under `budget`, raised in 2% steps only as far as it must be to open."""
    for _ in range(60):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flashrt.Generator(path, mode="flash", memory_budget=budget, select=args.select,
                                         sparsity=args.sparsity, max_context=args.max_context, threads=args.threads,
                                         progress=False)
        except BudgetError:
            budget = int(budget * 1.02)
    raise SystemExit(f"soak: no budget up to {fmt_bytes(budget)} opens {path}")


# -- the soak ----------------------------------------------------------------------------
def soak(args) -> int:
    path = resolve_model_path(args.model, progress=True)
    select = args.select
    if select is None:
        select = "predictor" if (path / "predictors.npz").is_file() else "oracle"
    args.select = select
    import tokenizers  # noqa: F401 -- libraries loaded before the baseline: the budget excludes them
    baseline = proc_status()["RssAnon"]
    budget = parse_size(args.budget) if args.budget != "auto" else \
        tight_budget(path, args.cache_share, args.max_context)
    g = open_tight(path, budget, args)
    budget = g.plan.budget
    print(f"soak: {path.name}, flash mode, select={select}, sparsity={args.sparsity}, "
          f"{args.minutes:g} min, threads={g.n_threads}")
    print(f"soak: {g.plan.describe()}")
    if select == "oracle":
        print("soak: (no predictors: the oracle selection memory-maps ffn.bin, which shows in RssFile, not RssAnon)")

    rng = random.Random(args.seed)
    samples, errors = [], []
    count = {"iterations": 0, "tokens": 0}
    n_reopen = 0
    t0 = time.monotonic()
    t_end = t0 + 60 * args.minutes
    last_tokens, last_t = 0, t0

    def sample(final=False):
        """One line of figures (from the sampler thread, every --interval seconds)."""
        nonlocal last_tokens, last_t
        now = time.monotonic()
        st = proc_status()
        n_iter, n_tokens = count["iterations"], count["tokens"]
        s = {"t": round(now - t0, 1), "iterations": n_iter, "tokens": n_tokens,
             "tok_per_s": round((n_tokens - last_tokens) / max(now - last_t, 1e-9), 2),
             "rss": st["VmRSS"], "rss_anon": st["RssAnon"], "rss_file": st["RssFile"],
             "fds": n_fds(), "threads": n_threads(), "py_threads": threading.active_count(),
             "errors": len(errors)}
        samples.append(s)
        last_tokens, last_t = n_tokens, now
        print(f"  t={s['t']:7.1f}s  iter={n_iter:5d}  tokens={n_tokens:7d}  {s['tok_per_s']:6.1f} tok/s  "
              f"rss={s['rss'] / 1e6:7.1f} MB (anon {s['rss_anon'] / 1e6:6.1f}, file {s['rss_file'] / 1e6:6.1f})  "
              f"fds={s['fds']}  threads={s['threads']}  errors={len(errors)}" + ("  (final)" if final else ""),
              flush=True)

    last_stats = None
    stop = threading.Event()

    def sampler():
        sample()
        while not stop.wait(args.interval):
            sample()

    sampler_thread = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
    sampler_thread.start()
    while time.monotonic() < t_end:
        count["iterations"] += 1
        n_iter = count["iterations"]
        try:
            if args.reopen_every and n_iter % args.reopen_every == 0:
                g.close()
                g = open_tight(path, budget, args)
                n_reopen += 1
            kind = rng.random()
            sampling = {} if rng.random() < 0.5 else dict(temperature=rng.choice([0.7, 1.0]), top_p=0.95,
                                                          seed=rng.randrange(1 << 30))
            max_new = rng.randint(8, args.max_tokens)
            if kind < 0.05:
                ids = np.array(g.tokenizer.encode(rng.choice(PROMPTS)))
                if not np.isfinite(g.logits(ids)).all():
                    raise RuntimeError("non-finite logits")
                continue
            if kind < 0.15 and g.tokenizer.chat_template:
                text = "".join(g.stream_chat(rng.choice(CHATS), max_new_tokens=max_new, **sampling))
            else:
                text = "".join(g.stream(rng.choice(PROMPTS), max_new_tokens=max_new, **sampling))
            text.encode("utf-8")  # valid text (no lone surrogates)
            count["tokens"] += g.stats.n_generated_tokens
            last_stats = g.stats
        except Exception as e:  # noqa: BLE001 -- the soak counts every failure
            errors.append(f"iteration {n_iter}: {type(e).__name__}: {e}")
            print(f"  ERROR {errors[-1]}", flush=True)
            if len(errors) >= args.max_errors:
                break
    stop.set()
    sampler_thread.join()
    sample(final=True)
    g.close()

    # -- verdict ----------------------------------------------------------------------
    warm = [s for s in samples if s["t"] >= args.warmup] or samples[-1:]
    anon = np.array([s["rss_anon"] for s in warm], float)
    t = np.array([s["t"] for s in warm], float)
    slope = float(np.polyfit(t / 60, anon / 1e6, 1)[0]) if len(warm) >= 3 else 0.0  # MB per minute
    growth = float(anon[-1] - anon[0])
    fds = [s["fds"] for s in warm]
    threads = [s["threads"] for s in warm]
    flat = growth < max(args.flat_mb * 1e6, 0.02 * anon[0])
    summary = {
        "model": str(path), "select": select, "budget": budget, "plan": g.plan.describe(),
        "minutes": round((time.monotonic() - t0) / 60, 2), "iterations": count["iterations"],
        "tokens": count["tokens"], "decode_tok_per_s": round(count["tokens"] / max(time.monotonic() - t0, 1e-9), 2),
        "reopens": n_reopen, "errors": len(errors), "error_messages": errors[:20],
        "rss_anon_before_open_mb": round(baseline / 1e6, 1),
        "rss_anon_over_baseline_max_mb": round((anon.max() - baseline) / 1e6, 1),
        "within_budget": bool(anon.max() - baseline <= budget),
        "rss_anon_after_warmup_mb": round(anon[0] / 1e6, 1), "rss_anon_final_mb": round(anon[-1] / 1e6, 1),
        "rss_anon_max_mb": round(anon.max() / 1e6, 1), "rss_anon_growth_mb": round(growth / 1e6, 2),
        "rss_anon_slope_mb_per_min": round(slope, 3), "rss_final_mb": round(samples[-1]["rss"] / 1e6, 1),
        "fds": [min(fds), max(fds)], "threads": [min(threads), max(threads)],
        "rss_flat": bool(flat), "fds_flat": max(fds) == min(fds),
    }
    if last_stats is not None:
        print("soak: the last generation")
        for line in last_stats.summary().splitlines():
            print(f"  {line}")
    print("soak: summary")
    for k, v in summary.items():
        if k not in ("plan", "error_messages") or v:
            print(f"  {k}: {v}")
    ok = not errors and flat and summary["fds_flat"]
    print(f"soak: {'PASS' if ok else 'FAIL'} (errors {len(errors)}, RSS {'flat' if flat else 'GREW'}, "
          f"fds {'flat' if summary['fds_flat'] else 'DRIFTED'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS is expected to be flat")
    p.add_argument("--budget", default="auto", help="memory budget, or 'auto': fixed costs + --cache-share of the FFN")
    p.add_argument("--cache-share", type=float, default=0.25, help="share of the FFN the neuron caches may hold")
    p.add_argument("--select", choices=["all", "oracle", "predictor"], default=None,
                   help="neuron selection (default: predictor if calibrated, else oracle)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=96, help="longest completion")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reopen-every", type=int, default=0, help="close and reopen the Generator every N iterations")
    p.add_argument("--flat-mb", type=float, default=10.0, help="RSS growth after warm-up still called flat")
    p.add_argument("--max-errors", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write samples and summary here")
    return soak(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
