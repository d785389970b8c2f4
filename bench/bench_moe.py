"""A mixture of experts bigger than the memory limit: flashrt (experts on flash, expert caches)
against llama.cpp (mmap), each in its own memory cgroup whose limit is the whole process's.

    python bench/make_synthetic_moe.py /work/wt/moe-bench/qwen3moe                  # ~17 GB flashrt dir
    python bench/bench_moe.py flashrt /work/wt/moe-bench/qwen3moe --limit 8GB --tokens 32 --repeats 3
    python bench/bench_moe.py flashrt /work/wt/moe-bench/qwen3moe --sweep 3GB 4GB 6GB 8GB
    python bench/make_synthetic_moe.py /work/wt/moe-bench/qwen3moe.gguf --gguf       # the same model, GGUF
    python bench/bench_moe.py llama.cpp /work/wt/moe-bench/qwen3moe.gguf --limit 8GB --tokens 16 --repeats 3
    python bench/bench_moe.py fio /work/wt/moe-bench/qwen3moe                         # random expert reads

Both engines decode from the same random prompt token ids (--prompt, 16 by default), sampling at temperature 1 with
their own generators (the synthetic model repeats the current token with probability ~0.3,
bench/make_synthetic_moe.py), the KV cache 512 positions, 2 threads. The cgroup's limit is
memory.max (v2) / memory.limit_in_bytes (v1) = LIMIT for the whole process: interpreter,
imports, the model's resident tensors, caches, page cache and mmap'ed pages all count. flashrt's
memory budget is LIMIT minus the process's charge before the model opens, minus 5%. Each run
starts with the model's files evicted from the page cache. Decode tokens/s = (tokens - 1) / the
time from the first generated token to the last.

"fio": the disk's random-read throughput at the expert size through flashrt's own loader
(O_DIRECT), reading top_k random experts of one layer per call, as decode does: the physical
limit for a token is (bytes it missed) / (that throughput).
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

import memcg  # noqa: E402

N_CTX = 512
PROMPT = 16

_COMMON = """
    import json, os, re, sys, time
    import numpy as np
    path, limit, n_tokens, cgdir, version, seed, n_prompt = sys.argv[1:8]
    limit, n_tokens, version, seed, n_prompt = int(limit), int(n_tokens), int(version), int(seed), int(n_prompt)
    usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    baseline = int(open(os.path.join(cgdir, usage_file)).read())
    open(os.path.join(cgdir, limit_file), "w").write(str(limit))
    prompt = [int(t) for t in np.random.default_rng(seed).integers(3, 500, n_prompt)]
    def majflt():
        st = dict(l.split() for l in open(os.path.join(cgdir, "memory.stat")).read().splitlines())
        return int(st.get("pgmajfault", st.get("total_pgmajfault", 0)))
"""

FLASHRT_CHILD = textwrap.dedent(_COMMON + """
    import warnings; warnings.simplefilter("ignore")
    import flashrt, flashrt.api, flashrt.ffn.moe, flashrt._core.kernels, flashrt._core.loader, flashrt._core.cache
    budget = int((limit - int(open(os.path.join(cgdir, usage_file)).read())) * 0.95)
    budget = int(os.environ.get("BENCH_BUDGET") or budget)  # --budget: the planner's budget, the limit unchanged
    t0 = time.perf_counter()
    g = flashrt.Generator(path, mode=os.environ.get("BENCH_MODE", "flash"), memory_budget=budget,
                          max_context=%d, threads=2, progress=False)
    if os.environ.get("BENCH_PREFETCH") == "1":
        g.ffn.prefetch = True
    t_open = time.perf_counter() - t0
    m0 = majflt()
    times, ids = [], []
    for tok in g.stream_tokens(prompt, max_new_tokens=n_tokens, temperature=1.0, seed=seed, stop_at_eos=False):
        times.append(time.perf_counter()); ids.append(int(tok))
    st = g.stats.ffn
    ids = np.array(ids)
    print("RESULT " + json.dumps(dict(engine="flashrt", budget=budget, baseline=baseline, open_seconds=round(t_open, 1),
        cache_experts=g.ffn.cache_experts, plan=g.plan.describe(), tokens=len(ids), flashrt=flashrt.__file__,
        tokens_per_second=(len(times) - 1) / (times[-1] - times[0]), repeat_rate=float(np.mean(ids[1:] == ids[:-1])),
        pgmajfault_decode=majflt() - m0, ffn=st)))
""" % N_CTX)

# llama-cpp-python imported, and BENCH_NO_REPACK=1 keeps the weights as mmap'ed file pages (its CPU
# backend otherwise copies Q4_0 weights into repacked anonymous buffers, which cannot be evicted)
_NO_REPACK = """
    import llama_cpp, llama_cpp.llama_cpp as C
    if os.environ.get("BENCH_NO_REPACK") == "1":
        _defaults = C.llama_model_default_params
        def _params():
            p = _defaults()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = _params
"""

LLAMA_CHILD = textwrap.dedent(_COMMON + _NO_REPACK + """
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=%d, verbose=False, seed=seed)
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    V = llm.n_vocab()
    def step(toks):
        llm.eval(toks)
        z = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,)).astype(np.float64)
        p = np.exp(z - z.max()); p /= p.sum()
        return int(rng.choice(V, p=p))
    m0 = majflt()
    tok = step(prompt)
    times, ids = [time.perf_counter()], [tok]
    for _ in range(n_tokens - 1):
        tok = step([tok])
        times.append(time.perf_counter()); ids.append(tok)
    ids = np.array(ids)
    print("RESULT " + json.dumps(dict(engine="llama.cpp", baseline=baseline, open_seconds=round(t_open, 1),
        tokens=len(ids), tokens_per_second=(len(times) - 1) / (times[-1] - times[0]),
        repeat_rate=float(np.mean(ids[1:] == ids[:-1])), pgmajfault_decode=majflt() - m0)))
""" % N_CTX)


def evict(path):
    p = Path(path)
    if p.is_dir():
        memcg.evict_page_cache(p)
    else:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(engine, path, limit, n_tokens, seed, timeout=3600, mode="flash", n_prompt=PROMPT, no_repack=False,
        repo=None, prefetch=False, budget=None):
    env = dict(os.environ)
    repo = str(repo or Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_PREFETCH"] = "1" if prefetch else "0"
    env["BENCH_BUDGET"] = str(budget or "")
    env["BENCH_MODE"] = mode
    env["BENCH_NO_REPACK"] = "1" if no_repack else "0"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    evict(path)
    child = FLASHRT_CHILD if engine == "flashrt" else LLAMA_CHILD
    with memcg.MemCgroup() as cg:
        before = cg.counters()
        t0 = time.perf_counter()
        r = cg.run([sys.executable, "-c", child, str(path), str(limit), str(n_tokens), str(cg.dir), str(cg.version),
                    str(seed), str(n_prompt)], timeout=timeout, env=env, cwd=repo)  # cwd: `-c` puts it first on sys.path
        wall = time.perf_counter() - t0
        after = cg.counters()
    res = {"returncode": r.returncode, "wall_seconds": round(wall, 1), "limit": limit}
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if m:
        res.update(json.loads(m.group(1)))
    else:
        res["stderr"] = r.stderr[-1500:]
    for k in ("failcnt", "oom_kill", "pgmajfault"):
        res[k] = after[k] - before[k]
    res["max_usage"] = after["max_usage"]
    return res


def random_expert_reads(model_dir, n_calls=40, seed=0):
    """MB/s of O_DIRECT reads of top_k random experts of one layer per call (flashrt's loader)."""
    import numpy as np

    from flashrt._core.loader import Loader, aligned_empty
    from flashrt.format.reader import ModelFiles

    files = ModelFiles.open(model_dir)
    cfg = files.config
    E, k, n = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]
    eb = n * files.ffn_row_bytes
    evict(model_dir)
    rng = np.random.default_rng(seed)
    dest = aligned_empty((k, eb), np.uint8)
    with Loader(str(files.ffn_path)) as ld:
        t0 = time.perf_counter()
        for _ in range(n_calls):
            layer = int(rng.integers(files.n_layers))
            ids = np.sort(rng.choice(E, k, replace=False)).astype(np.int64)
            ld.read_rows(files.ffn_layer_offset(layer), eb, ids, dest)
        dt = time.perf_counter() - t0
        st = ld.stats()
    return {"expert_bytes": eb, "experts_per_call": k, "calls": n_calls, "seconds": round(dt, 2),
            "MB_per_s": round(st["bytes_read"] / dt / 1e6, 1), "direct": True, "reads": st["n_reads"]}


def main():
    from flashrt.budget import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", choices=["flashrt", "llama.cpp", "fio"])
    ap.add_argument("path")
    ap.add_argument("--limit", default="8GB")
    ap.add_argument("--sweep", nargs="*", help="limits to run flashrt at, one run each")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mode", default="flash", choices=["flash", "naive"])
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens (random ids)")
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp: use_extra_bufts=False (by default its CPU backend copies Q4_0 weights into "
                         "repacked anonymous buffers, so the mmap'ed model is not page cache any more)")
    ap.add_argument("--repos", nargs="*", help="flashrt checkouts to run (built), alternating within each repeat "
                                               "(e.g. the commit before a change against this one)")
    ap.add_argument("--prefetch", choices=["off", "on", "both"], default="off",
                    help="flashrt: prefetch the next layer's guessed experts (both: alternate off/on in each repeat)")
    ap.add_argument("--budget", help="flashrt: the memory budget handed to the planner (default: 95%% of the "
                                     "limit left after the interpreter); the cgroup limit stays --limit")
    ap.add_argument("--out", help="append each run's JSON to this file")
    a = ap.parse_args()
    print(f"# {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE (set by the bench)')}", flush=True)
    if a.engine == "fio":
        print(json.dumps(random_expert_reads(a.path)))
        return
    limits = a.sweep or [a.limit]
    repos = a.repos or [None]
    prefetches = {"off": [False], "on": [True], "both": [False, True]}[a.prefetch]
    rows = []
    for rep in range(a.repeats):
        for lim in limits:
            for i, (repo, pf) in enumerate([(r, p) for r in repos for p in prefetches]):
                if rep % 2:  # alternate the order between repeats
                    repo, pf = [(r, p) for r in repos for p in prefetches][::-1][i]
                res = run(a.engine, a.path, parse_size(lim), a.tokens, seed=rep, mode=a.mode, n_prompt=a.prompt,
                          no_repack=a.no_repack, repo=repo, prefetch=pf,
                          budget=parse_size(a.budget) if a.budget else None)
                res.update(limit_arg=lim, repo=repo or "this", prefetch=pf, loadavg=os.getloadavg()[0])
                rows.append(res)
                print(json.dumps(res), flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(res) + "\n")
    for lim in limits:
        for repo in repos:
            for pf in prefetches:
                sel = [r for r in rows if r["limit_arg"] == lim and r["repo"] == (repo or "this") and r["prefetch"] == pf]
                tps = [r.get("tokens_per_second", 0.0) for r in sel]
                cache = [r.get("ffn", {}).get("ms_cache_per_token", 0.0) for r in sel]
                hit = [r.get("ffn", {}).get("expert_hit_rate", 0.0) for r in sel]
                print(f"# {a.engine} limit {lim} repo {repo or 'this'} prefetch {pf}: median {statistics.median(tps):.3f} "
                      f"tok/s, cache {statistics.median(cache):.1f} ms/token, hit rate {statistics.median(hit):.3f} "
                      f"over {len(tps)} runs {[round(t, 3) for t in tps]}")


if __name__ == "__main__":
    main()
