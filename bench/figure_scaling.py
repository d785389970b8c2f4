"""Scaling at a memory limit (issue 14): decode ms/token against model size (the OPT-1.3B, 6.7B
and 13B shapes) and against the limit (a share of the model), flashrt flash / naive / dense
against llama.cpp, every run inside a memory cgroup whose limit is the whole process's.

    python bench/make_synthetic.py W/synthetic-opt-13b-q4_0 --shape opt-13b --dtype q4_0    # flashrt side
    python bench/figure_scaling.py gguf opt-13b W/llama-like-opt-13b.gguf   # llama.cpp side (or a flashrt dir)
    python bench/figure_scaling.py run --pair W/synthetic-opt-13b-q4_0 W/llama-like-opt-13b.gguf \\
        --shares 0.3 0.4 0.5 0.75 1.0 --tokens 8 --out bench/results/figure_scaling.jsonl
    python bench/figure_scaling.py report bench/results/figure_scaling.jsonl    # .md table + .png

The two sides. flashrt runs the synthetic ReLU OPT shapes of bench/make_synthetic.py (predictors
included). llama.cpp cannot run OPT, so its side is a Llama-architecture GGUF written here with
the same layers, width and heads, the same parameter count (its SwiGLU FFN has 3 matrices of
n_ff = 2/3 of OPT's FFN width, rounded to 32) and the same storage type (q4_0), so the same
bytes to within a few percent (both sizes are printed). Its weights are random q4_0 blocks
(bench/make_synthetic_moe.random_q4_0): llama.cpp's cost does not depend on the values; its
logits are sampled like bench/bench_moe.py's (any value works: the ids only feed the next step).

The limit. limit = share x the flashrt model's bytes (resident tensors + FFN file), for the
whole process: interpreter, imports, KV cache, page cache and mmap'ed pages all count
(memory.limit_in_bytes / memory.max, set by the child after its imports, bench/memcg.py's
MemCgroup, the model's files evicted from the page cache before each run). flashrt's memory
budget is 95% of what is left under the limit after its imports (bench_moe.py's rule); where that
is below its planner's minimum (resident tensors + predictors + KV) the row says so. dense runs
only where the planner says the whole model fits. llama.cpp runs with its defaults (mmap) and,
below the model's size, with use_extra_bufts=False as well: by default its CPU backend copies
Q4_0 weights into repacked anonymous buffers, which cannot be evicted (bench/results/
moe_qwen3-30b-a3b.md: OOM-killed at load) - the no-repack run keeps the weights as page cache.

Timing. Both decode from the same random prompt ids (--prompt 4), 2 threads, context --ctx.
Every child prints a line per token as it comes, so a run killed at --timeout still reports the
steps it finished (then "> X s/token" for a run that finished none). ms/token = the median of the
decode steps' times (the first token comes from the prefill); tok/s = 1000 / that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import bench_moe  # noqa: E402
import common  # noqa: E402
import memcg  # noqa: E402

Q4_0_BLOCK = 18

# ------------------------------------------------------------------------------ children
_IO = """
    def read_bytes():  # bytes this process had read from storage (page-cache misses, mmap faults, O_DIRECT)
        return int(re.search(r"read_bytes: (\\d+)", open("/proc/self/io").read()).group(1))
"""

FLASHRT_CHILD = textwrap.dedent(bench_moe._COMMON + _IO + """
    import warnings; warnings.simplefilter("ignore")
    import flashrt, flashrt.api, flashrt.ffn.flash, flashrt._core.kernels, flashrt._core.loader, flashrt._core.cache
    import flashrt.models, tokenizers, safetensors.numpy
    mode, n_ctx = os.environ["BENCH_MODE"], int(os.environ["BENCH_CTX"])
    left = limit - int(open(os.path.join(cgdir, usage_file)).read())
    budget = int(left * float(os.environ["BENCH_HEADROOM"]))
    print("BUDGET", budget, left, flush=True)
    t0 = time.perf_counter()
    try:
        g = flashrt.Generator(path, mode=mode, memory_budget=budget, max_context=n_ctx, threads=2, progress=False)
    except flashrt.FlashrtError as e:
        print("RESULT " + json.dumps(dict(engine="flashrt", mode=mode, budget=budget, baseline=baseline,
                                          error=str(e).splitlines()[0])), flush=True)
        sys.exit(0)
    t_open = time.perf_counter() - t0
    print("OPEN", round(t_open, 2), flush=True)
    m0 = majflt()
    times = []
    for tok in g.stream_tokens(prompt, max_new_tokens=n_tokens, temperature=1.0, seed=seed, stop_at_eos=False):
        times.append(time.perf_counter())
        print("TOK", len(times), round(times[-1] - t0, 4), flush=True)
        if len(times) == 1:
            rb0 = read_bytes()
    steps = np.diff(times)
    print("RESULT " + json.dumps(dict(engine="flashrt", mode=mode, budget=budget, baseline=baseline,
        open_seconds=round(t_open, 2), plan=g.plan.describe() if g.plan is not None else None, tokens=len(times), flashrt=flashrt.__file__,
        ms_per_token=float(np.median(steps)) * 1e3, prefill_seconds=round(g.stats.prefill_seconds, 2),
        disk_read_per_step=(read_bytes() - rb0) / max(len(times) - 1, 1),
        pgmajfault_decode=majflt() - m0, ffn=g.stats.ffn)), flush=True)
    g.close()
""")

LLAMA_CHILD = textwrap.dedent(bench_moe._COMMON + _IO + bench_moe._NO_REPACK + """
    n_ctx = int(os.environ["BENCH_CTX"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=n_ctx, verbose=False, seed=seed)
    t_open = time.perf_counter() - t0
    print("OPEN", round(t_open, 2), flush=True)
    rng = np.random.default_rng(seed)
    V = llm.n_vocab()
    def step(toks):
        llm.eval(toks)
        z = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,)).astype(np.float64)
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # random weights: any value will do
        p = np.exp(z - z.max()); p /= p.sum()
        return int(rng.choice(V, p=p))
    m0 = majflt()
    tok = step(prompt)
    times = [time.perf_counter()]
    rb0 = read_bytes()
    print("TOK", 1, round(times[-1] - t0, 4), flush=True)
    for _ in range(n_tokens - 1):
        tok = step([tok])
        times.append(time.perf_counter())
        print("TOK", len(times), round(times[-1] - t0, 4), flush=True)
    print("RESULT " + json.dumps(dict(engine="llama.cpp", baseline=baseline, open_seconds=round(t_open, 2),
        tokens=len(times), ms_per_token=float(np.median(np.diff(times))) * 1e3,
        disk_read_per_step=(read_bytes() - rb0) / max(len(times) - 1, 1), pgmajfault_decode=majflt() - m0)), flush=True)
""")


def run_one(engine, path, limit, n_tokens, seed=0, mode="flash", n_prompt=4, n_ctx=128, no_repack=False,
            timeout=600.0, headroom=0.95):
    """One run in a fresh memory cgroup of `limit` bytes; the child's RESULT (or what its TOK lines
    say when it was killed at `timeout`) plus the cgroup's counters."""
    env = dict(os.environ)
    repo = str(BENCH.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.update(BENCH_MODE=mode, BENCH_CTX=str(n_ctx), BENCH_HEADROOM=str(headroom), BENCH_NO_REPACK="1" if no_repack else "0",
               PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bench_moe.evict(path)
    child = FLASHRT_CHILD if engine == "flashrt" else LLAMA_CHILD
    res = {"engine": engine, "mode": mode if engine == "flashrt" else ("no-repack" if no_repack else "default"),
           "headroom": headroom, "ctx": n_ctx, "prompt_tokens": n_prompt,
           "path": str(path), "limit": int(limit), "tokens_asked": n_tokens, "timeout": timeout,
           "loadavg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%H:%M:%S")}
    with memcg.MemCgroup() as cg:
        before = cg.counters()
        t0 = time.perf_counter()
        try:
            r = cg.run([sys.executable, "-c", child, str(path), str(limit), str(n_tokens), str(cg.dir),
                        str(cg.version), str(seed), str(n_prompt)], timeout=timeout, env=env, cwd=repo)
            out, err, rc, timed_out = r.stdout, r.stderr, r.returncode, False
        except subprocess.TimeoutExpired as e:
            out, err, rc, timed_out = e.stdout or "", e.stderr or "", None, True
            out = out.decode() if isinstance(out, bytes) else out
            err = err.decode() if isinstance(err, bytes) else err
        wall = time.perf_counter() - t0
        after = cg.counters()
    res.update(returncode=rc, timed_out=timed_out, wall_seconds=round(wall, 1))
    m = re.search(r"^RESULT (.*)$", out, re.M)
    if m:
        res.update(json.loads(m.group(1)))
    toks = [float(x) for x in re.findall(r"^TOK \d+ ([0-9.]+)$", out, re.M)]
    res["token_times"] = toks
    if not m:
        res["stderr"] = err[-1500:]
        om = re.search(r"^OPEN ([0-9.]+)$", out, re.M)
        if om:
            res["open_seconds"] = float(om.group(1))
        if len(toks) >= 2:
            res["ms_per_token"] = statistics.median(np.diff(toks)) * 1e3
        if timed_out:
            # the step in progress when the child was killed took at least this long
            start = toks[-1] if toks else res.get("open_seconds")
            if start is not None:
                res["unfinished_step_ms"] = (wall - start) * 1e3
    for k in ("failcnt", "oom_kill", "pgmajfault"):
        res[k] = after[k] - before[k]
    res["max_usage"] = after["max_usage"]
    return res


# ------------------------------------------------------------------------------ the GGUF
def llama_shape(flashrt_dir) -> dict:
    """The Llama shape for a flashrt OPT model directory, or a bench/make_synthetic.py shape name."""
    from make_synthetic import SHAPES

    if str(flashrt_dir) in SHAPES:
        s = SHAPES[str(flashrt_dir)]
        L, d, n, H, V = s["n_layers"], s["dim"], s["n_neurons"], s["n_heads"], s["vocab"]
    else:
        from flashrt.format.reader import ModelFiles

        c = ModelFiles.open(flashrt_dir).config
        L, d, n, H, V = (c["num_hidden_layers"], c["hidden_size"], c["ffn_dim"], c["num_attention_heads"],
                         c["vocab_size"])
    n_ff = int(round(2 * n / 3 / 32)) * 32
    return dict(n_layers=L, dim=d, n_heads=H, vocab=V, n_ff=n_ff, opt_ffn=n)


def write_gguf(flashrt_dir, out, seed=0) -> Path:
    """A Llama GGUF (q4_0, random weights) of the flashrt OPT model's parameter count."""
    import gguf

    from make_synthetic_moe import add_placeholder_vocab, random_q4_0

    s = llama_shape(flashrt_dir)
    Q = gguf.GGMLQuantizationType.Q4_0
    L, d, H, V, n_ff = s["n_layers"], s["dim"], s["n_heads"], s["vocab"], s["n_ff"]
    hd = d // H
    tmp = Path(str(out) + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_block_count(L)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(H)
    w.add_head_count_kv(H)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    add_placeholder_vocab(w, V)
    rb = lambda k: k // 32 * Q4_0_BLOCK  # noqa: E731
    big, small = 1.0 / (8 * np.sqrt(d)), 2e-5
    ones = lambda: np.ones(d, np.float32)  # noqa: E731
    plan = [("token_embd.weight", (V, rb(d)), Q, lambda: random_q4_0(seed, ("embd",), V, d, 1.0)),
            ("output_norm.weight", (d,), None, ones),
            ("output.weight", (V, rb(d)), Q, lambda: random_q4_0(seed, ("out",), V, d, big))]
    for l in range(L):
        plan += [(f"blk.{l}.attn_norm.weight", (d,), None, ones), (f"blk.{l}.ffn_norm.weight", (d,), None, ones)]
        for part, scale in (("attn_q", big), ("attn_k", big), ("attn_v", big), ("attn_output", small)):
            plan.append((f"blk.{l}.{part}.weight", (d, rb(d)), Q,
                         lambda l=l, part=part, scale=scale: random_q4_0(seed, (part, l), d, d, scale)))
        for part in ("ffn_gate", "ffn_up"):
            plan.append((f"blk.{l}.{part}.weight", (n_ff, rb(d)), Q,
                         lambda l=l, part=part: random_q4_0(seed, (part, l), n_ff, d, big)))
        plan.append((f"blk.{l}.ffn_down.weight", (d, rb(n_ff)), Q,
                     lambda l=l: random_q4_0(seed, ("ffn_down", l), d, n_ff, small)))
    for name, shape, qt, _ in plan:
        dt = np.dtype(np.uint8 if qt is not None else np.float32)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qt, make in plan:
        w.write_tensor_data(np.ascontiguousarray(make()).reshape(shape))
    w.close()
    os.replace(tmp, out)
    return Path(out)


# ------------------------------------------------------------------------------ the sweep
def shape_name(flashrt_dir) -> str:
    s = llama_shape(flashrt_dir)
    return {2048: "opt-1.3b", 4096: "opt-6.7b", 5120: "opt-13b"}.get(s["dim"], f"d{s['dim']}")


def sweep(pairs, shares, n_tokens, out, timeout, llama_timeout, modes, n_ctx, headroom=0.95, skip_done=True,
          llama_modes=("default", "no-repack")):
    done = set()
    if skip_done and Path(out).exists():
        for line in Path(out).read_text().splitlines():
            r = json.loads(line)
            done.add((r["shape"], r["share"], r["engine"], r["mode"]))
    for fdir, gpath in pairs:
        shape = shape_name(fdir)
        mb = common.model_bytes(fdir)["total"]
        gb = Path(gpath).stat().st_size
        for share in shares:
            limit = int(share * mb)
            if share > 1.0:  # above the model's size: the everything-in-DRAM references only
                jobs = [("flashrt", "dense")] * ("dense" in modes) + [("llama.cpp", "default"), ("llama.cpp", "no-repack")]
            else:
                jobs = [("flashrt", m) for m in modes if m != "dense" or share >= 1.0]
                jobs += [("llama.cpp", "default")] if share >= 1.0 else []
                jobs += [("llama.cpp", "no-repack")]
            for engine, mode in jobs:
                if (shape, share, engine, mode) in done or (engine == "llama.cpp" and mode not in llama_modes):
                    continue
                path = fdir if engine == "flashrt" else gpath
                to = timeout if engine == "flashrt" else llama_timeout
                r = run_one(engine, path, limit, n_tokens, mode=mode if engine == "flashrt" else "flash",
                            n_ctx=n_ctx, no_repack=(mode == "no-repack"), timeout=to, headroom=headroom)
                r.update(shape=shape, share=share, model_bytes=mb, gguf_bytes=gb, mode=mode)
                print(json.dumps({k: v for k, v in r.items() if k not in ("ffn", "token_times", "stderr")}),
                      flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------------------ the report
def speed(r):
    """(ms/token or None, text for the table)."""
    if r.get("error"):
        return None, "cannot open: " + r["error"][:90]
    ms = r.get("ms_per_token")
    if r.get("oom_kill"):
        return None, "OOM-killed" + (f" after {len(r.get('token_times', []))} tokens" if r.get("token_times") else "")
    if r.get("timed_out"):
        unf = r.get("unfinished_step_ms", 0.0)
        if ms is None:
            return None, f"> {max(unf, 0) / 1e3:.0f} s/token (no decode step in {r['timeout']:.0f} s)"
        ms = max(ms, unf)
        return ms, f"≤ {1e3 / ms:.3f} (killed at {r['timeout']:.0f} s)"
    if ms is None:
        return None, f"failed rc={r.get('returncode')}: {(r.get('stderr') or '').strip().splitlines()[-1:]}"
    return ms, f"{1e3 / ms:.3f}"


def notes_text(jsonl) -> str:
    """The hand-written reading of the numbers, kept next to the JSONL (NAME.notes.md), if any."""
    p = Path(jsonl).with_suffix(".notes.md")
    return p.read_text().rstrip() + "\n" if p.exists() else ""


def report(jsonl, md_out, png_out):
    rows = [json.loads(l) for l in Path(jsonl).read_text().splitlines() if l.strip()]
    order = {"opt-1.3b": 0, "opt-6.7b": 1, "opt-13b": 2}
    rows.sort(key=lambda r: (order.get(r["shape"], 9), r["share"], r["engine"] != "flashrt", r["mode"]))
    GB = 1e9
    table = []
    for r in rows:
        ms, txt = speed(r)
        table.append([r["shape"], f"{r['model_bytes'] / GB:.2f} / {r['gguf_bytes'] / GB:.2f}", f"{r['share']:.2f}",
                      f"{r['limit'] / GB:.2f}", f"{r['model_bytes'] / r['limit']:.2f}",
                      f"{r['engine']} {r['mode']}", txt, "–" if ms is None else f"{ms:.0f}",
                      f"{r['disk_read_per_step'] / 1e6:.0f}" if "disk_read_per_step" in r else "–",
                      "–" if r.get("max_usage") is None else f"{r['max_usage'] / GB:.2f}",
                      r["failcnt"], r["pgmajfault"], r["oom_kill"], f"{r['loadavg'][0]:.1f}"])
    head = ["shape", "model GB (flashrt / GGUF)", "share", "limit GB", "model / limit", "engine", "decode tok/s",
            "ms / token (median)", "disk MB read / token", "cgroup peak GB", "failcnt", "pgmajfault",
            "oom_kill", "load (1 min)"]
    # ratios where the model is >= 2x the limit
    ratio_rows = []
    groups = {}
    for r in rows:
        if r["engine"] == "flashrt" and r["mode"] != "flash":
            continue
        groups.setdefault((r["shape"], r["share"]), {}).setdefault((r["engine"], r["mode"]), []).append(r)

    def med(runs):  # (median ms over the runs that decoded, their count, one run for the text)
        ms = [m for m in (speed(r)[0] for r in runs) if m is not None]
        return (statistics.median(ms) if ms else None), len(ms), runs[-1]

    for (shape, share), g in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        if ("flashrt", "flash") not in g:
            continue
        fms, fn, fr = med(g[("flashrt", "flash")])
        llamas = [med(runs) + (mode,) for (eng, mode), runs in g.items() if eng == "llama.cpp"]
        if not llamas:
            continue
        # llama.cpp's better mode at this limit (defaults or no repacking) by its median
        lms, ln, lr, lmode = min(llamas, key=lambda t: (t[0] is None, t[0] or 0))
        ratio_model = fr["model_bytes"] / fr["limit"]
        if fms is None:
            ratio = "– (flashrt did not run)"
        elif lms is None and lr.get("timed_out"):
            lower = max(lr.get("unfinished_step_ms", 0), 0)
            ratio = f"> {lower / fms:.1f}x (llama.cpp finished no step)"
        elif lms is None:
            ratio = "∞ (llama.cpp did not run)"
        else:
            ratio = f"**{lms / fms:.2f}x**" if ratio_model >= 2 else f"{lms / fms:.2f}x"
        target = "" if ratio_model < 2 else (" (target ≥ 5x: " + ("met" if fms and lms and lms / fms >= 5 else "not met") + ")")
        ltxt = f"{lmode}: " + (f"{1e3 / lms:.3f} ({ln} run{'s' * (ln > 1)})" if lms else speed(lr)[1])
        ftxt = "– " + speed(fr)[1][:60] if fms is None else f"{1e3 / fms:.3f} ({fn} run{'s' * (fn > 1)})"
        ratio_rows.append([shape, f"{share:.2f}", f"{ratio_model:.2f}", ftxt, ltxt, ratio + target])
    text = [common.header("Scaling at a memory limit: flashrt against llama.cpp, OPT-1.3B / 6.7B / 13B shapes",
                          {"results": Path(jsonl).name, "runs": len(rows)}),
            "How to read it: bench/figure_scaling.py's docstring (limit = share x the flashrt model's bytes, "
            "whole process; llama.cpp runs a Llama-architecture GGUF of the same parameter count, q4_0, random "
            "weights). Load averages are per row (2 cores shared with two other helpers' work).", "",
            notes_text(jsonl),
            "## flashrt flash ÷ llama.cpp (medians over runs; llama.cpp's better mode at that limit)", "",
            common.md_table(["shape", "share", "model / limit", "flashrt flash tok/s", "llama.cpp", "flashrt ÷ llama.cpp"],
                            ratio_rows), "",
            "## Every run", "", common.md_table(head, table), ""]
    Path(md_out).write_text("\n".join(text).rstrip() + "\n")
    print(f"wrote {md_out}")
    plot(rows, png_out)


def plot(rows, png_out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {("flashrt", "flash"): ("C0", "o", "flashrt flash"), ("flashrt", "naive"): ("C1", "s", "flashrt naive"),
              ("flashrt", "dense"): ("C2", "^", "flashrt dense"),
              ("llama.cpp", "default"): ("C3", "v", "llama.cpp (mmap, defaults)"),
              ("llama.cpp", "no-repack"): ("C4", "D", "llama.cpp (mmap, no repack)")}
    shapes = [s for s in ("opt-1.3b", "opt-6.7b", "opt-13b") if any(r["shape"] == s for r in rows)]
    n = len(shapes) + 1
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(11, 4.3 * ((n + 1) // 2)), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")

    def medians(pts):  # one point per x: the median of the repeats
        by = {}
        for x, y in pts:
            by.setdefault(x, []).append(y)
        return sorted((x, statistics.median(ys)) for x, ys in by.items())

    for ax, shape in zip(axes, shapes):
        for key, (c, mk, label) in styles.items():
            pts, lower = [], []
            for r in rows:
                if r["shape"] != shape or (r["engine"], r["mode"]) != key:
                    continue
                ms, _ = speed(r)
                if ms is not None:
                    pts.append((r["share"], ms))
                elif r.get("timed_out") and r.get("unfinished_step_ms"):
                    lower.append((r["share"], r["unfinished_step_ms"]))
            if pts:
                ax.plot(*zip(*medians(pts)), color=c, marker=mk, label=label)
            if lower:
                ax.scatter(*zip(*lower), color=c, marker="^", facecolors="none", s=80,
                           label=label + " (killed: more than)")
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("memory limit / model size")
        ax.set_ylabel("ms / token (median)")
        ax.set_title(f"{shape} (q4_0), limit = share x model")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[n - 1]
    for key, (c, mk, label) in styles.items():
        for share, ls in ((0.5, "-"), (1.0, "--")):
            pts = []
            for r in rows:
                if (r["engine"], r["mode"]) == key and abs(r["share"] - share) < 1e-9:
                    ms, _ = speed(r)
                    if ms is not None:
                        pts.append((r["model_bytes"] / 1e9, ms))
            if pts:
                ax.plot(*zip(*medians(pts)), color=c, marker=mk, ls=ls, label=f"{label}, limit {share:g}x model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({r["model_bytes"] / 1e9 for r in rows})
    ax.set_xticks(sizes, [f"{x:.1f}" for x in sizes])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("model GB (flashrt q4_0)")
    ax.set_ylabel("ms / token (median)")
    ax.set_title("against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png_out, dpi=110)
    print(f"wrote {png_out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="write the llama.cpp GGUF of a flashrt OPT model's shape")
    g.add_argument("flashrt_dir", help="a flashrt OPT model directory, or a make_synthetic.py shape name")
    g.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("--pair", nargs=2, action="append", required=True, metavar=("FLASHRT_DIR", "GGUF"))
    r.add_argument("--shares", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.75, 1.0])
    r.add_argument("--modes", nargs="+", default=["flash", "naive", "dense"])
    r.add_argument("--tokens", type=int, default=8)
    r.add_argument("--ctx", type=int, default=32)
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--llama-timeout", type=float, default=300)
    r.add_argument("--headroom", type=float, default=0.95,
                   help="flashrt's memory budget = this share of what is left under the limit after its imports")
    r.add_argument("--again", action="store_true", help="run rows the JSONL already has once more (repeats)")
    r.add_argument("--llama-modes", nargs="+", default=["default", "no-repack"])
    r.add_argument("--out", default=str(common.RESULTS_DIR / "figure_scaling.jsonl"))
    p = sub.add_parser("report")
    p.add_argument("jsonl", nargs="?", default=str(common.RESULTS_DIR / "figure_scaling.jsonl"))
    a = ap.parse_args()
    if a.cmd == "gguf":
        t0 = time.time()
        out = write_gguf(a.flashrt_dir, a.out)
        print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, {llama_shape(a.flashrt_dir)}) in {time.time() - t0:.0f} s")
    elif a.cmd == "run":
        print(f"# {time.strftime('%H:%M:%S')} load {os.getloadavg()}", flush=True)
        sweep(a.pair, a.shares, a.tokens, a.out, a.timeout, a.llama_timeout, a.modes, a.ctx, a.headroom,
              skip_done=not a.again, llama_modes=a.llama_modes)
    else:
        stem = Path(a.jsonl).with_suffix("")
        report(a.jsonl, str(stem) + ".md", str(stem) + ".png")


if __name__ == "__main__":
    main()
