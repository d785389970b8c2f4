"""Shared pieces of the benchmark scripts: machine facts, timing statistics, Markdown
tables, page-cache handling, model paths, and the emulation hooks the paper's
ablations need (no-reuse "predictor only" runs, unbundled reads).

Nothing here is imported by flashrt itself.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = Path(os.environ.get("FLASHRT_BENCH_WORK", BENCH_DIR / "work"))

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3

# The paper's numbers (Alizadeh et al. 2024, OPT-6.7B fp16, half the model in DRAM, M1 Max)
PAPER_IO = [  # (row, GB read per token, ms I/O per token)
    ("naive", 13.4, 2196.0),
    ("+ predictor", None, 738.0),
    ("+ windowing", None, 164.0),
    ("+ bundling", 0.2, 87.0),
]
PAPER_E2E_MS = {"naive": 3182.0, "flashrt": 669.0}


# ----------------------------------------------------------------------------- statistics
def summarize(values) -> dict:
    """median, min, max, relative spread ((max - min) / median) of repeated measurements."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return dict(median=float("nan"), min=float("nan"), max=float("nan"), spread=float("nan"), n=0)
    med = float(np.median(v))
    return dict(median=med, min=float(v.min()), max=float(v.max()),
                spread=float((v.max() - v.min()) / med) if med else 0.0, n=int(v.size))


def fmt_ms(s: dict, digits=1) -> str:
    """'123.4 (118–130)' from a summarize() dict."""
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join("-" if c is None else str(c) for c in r) + " |")
    return "\n".join(out)


def perplexity_plot(curves, base, title, path, targets=()) -> bool:
    """Perplexity (log scale) vs % of FFN neurons selected, to a PNG; False without matplotlib.

    curves: [(label, style, alpha, [(selected fraction, perplexity), ...])];
    base: the dense perplexity (a dotted line); targets: [(selected fraction, max ratio to base)].
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, style, alpha, pts in curves:
        pts = sorted(pts)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, label=label, alpha=alpha)
    ax.axhline(base, color="k", lw=0.8, ls=":", label=f"dense {base:.2f}")
    if targets:
        ax.plot([100 * f for f, _ in targets], [base * r for _, r in targets], "r_", ms=14, mew=2,
                label="targets (" + ", ".join(f"+{100 * (r - 1):.0f}% at {100 * f:.0f}%" for f, r in targets) + ")")
    ax.set_xlabel("FFN neurons selected per token (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- machine facts
def _read(path, default=""):
    try:
        return Path(path).read_text()
    except OSError:
        return default


def _meminfo():
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0]) * 1024
    return out


def mem_available() -> int:
    return _meminfo().get("MemAvailable", 0)


def machine_facts(path=None) -> dict:
    """CPU, cores, RAM, kernel, the disk under `path`, the loader backends, tool versions."""
    cpu = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = _meminfo()
    facts = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_total_GB": round(mem.get("MemTotal", 0) / 1e9, 1),
        "ram_available_GB": round(mem.get("MemAvailable", 0) / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg": _read("/proc/loadavg").split()[:3],
    }
    if path is not None:
        try:
            df = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()[-1].split()
            facts["disk"] = f"{df[0]} ({df[1]}), {int(df[4]) * 1024 / 1e9:.0f} GB free"
            dev = os.path.basename(df[0])
            rot = _read(f"/sys/block/{dev.rstrip('0123456789')}/queue/rotational").strip()
            if rot:
                facts["disk"] += ", rotational" if rot == "1" else ", non-rotational"
        except (IndexError, ValueError, OSError):
            pass
    try:
        from flashrt._core.loader import uring_available

        ok, why = uring_available()
        facts["io_uring"] = "available" if ok else why
    except ImportError:
        pass
    fio = shutil.which("fio")
    facts["fio"] = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip() if fio else None
    try:
        facts["flashrt_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return facts


def header(title: str, config: dict, path=None) -> str:
    """The Markdown header every result starts with: title, config, machine facts. Printed too."""
    facts = machine_facts(path)
    lines = [f"# {title}", "", f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, command: `python {' '.join(sys.argv)}`", "",
             "Config: " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()), ""]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_result(name: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    p = RESULTS_DIR / name
    p.write_text(text.rstrip() + "\n")
    print(f"\nwrote {p}", flush=True)
    return p


# ----------------------------------------------------------------------------- page cache
def drop_page_cache(paths=()) -> str:
    """Drop the page cache (needs root); else advise the kernel to drop `paths`. Says which."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "page cache dropped (echo 1 > /proc/sys/vm/drop_caches)"
    except OSError as e:
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            except OSError:
                pass
        return f"drop_caches refused ({e.strerror}); used posix_fadvise(DONTNEED) on the model files instead"


# ----------------------------------------------------------------------------- models
def dtype_suffix(dtype: str) -> str:
    """How file names tell a storage type apart: nothing for float16 (the original tables)."""
    return "" if dtype == "float16" else f"-{dtype}"


def synthetic_path(shape: str, dtype: str = "float16") -> Path:
    return WORK_DIR / (f"synthetic-{shape}" + ("" if dtype == "float16" else f"-{dtype}"))


def ensure_synthetic(shape: str, path=None, dtype: str = "float16") -> Path:
    """The synthetic model of `shape` stored as `dtype`, generated (bench/make_synthetic.py) if missing."""
    p = Path(path) if path else synthetic_path(shape, dtype)
    if not (p / "manifest.json").is_file():
        print(f"generating the synthetic {shape} model ({dtype}) into {p} ...", flush=True)
        subprocess.run([sys.executable, str(BENCH_DIR / "make_synthetic.py"), str(p), "--shape", shape,
                        "--dtype", dtype], check=True)
    return p


def model_bytes(path) -> dict:
    """Resident bytes, FFN bytes and their sum for a model directory."""
    from flashrt.format.reader import ModelFiles

    files = ModelFiles.open(path)
    try:
        res = files.resident_path.stat().st_size
        ffn = files.n_layers * files.n_neurons * files.ffn_row_bytes
        out = dict(resident=res, ffn=ffn, total=res + ffn, row_bytes=files.ffn_row_bytes,
                   n_neurons=files.n_neurons, n_layers=files.n_layers, dim=files.dim,
                   ffn_path=str(files.ffn_path), dtype=str(files.dtype))
    finally:
        if hasattr(files, "close"):
            files.close()
    return out


def smollm2_path(calibrated=True) -> Path:
    """SmolLM2-135M-Instruct as flashrt converts it. calibrated: a copy under bench/work with
    predictors fitted by `flashrt.predictor.calibrate` (the shared cached model is left alone)."""
    from flashrt.home import default_model_path

    src = default_model_path()
    if not calibrated:
        return src
    dst = WORK_DIR / f"smollm2-calibrated-{src.name}"  # keyed by the conversion (its storage and source)
    if (dst / "predictors.npz").is_file():
        return dst
    if not (dst / "manifest.json").is_file():
        tmp = WORK_DIR / f"{dst.name}.tmp-{os.getpid()}"
        shutil.copytree(src, tmp)
        os.rename(tmp, dst)
    from flashrt.calibration import calibrate

    print("calibrating SmolLM2 predictors (sparsity 0.5, 2048 self-generated tokens) ...", flush=True)
    calibrate(str(dst), n_tokens=2048, sparsity=0.5, progress=True)
    return dst


# ----------------------------------------------------------------------------- runtime hooks
class UnbundledLoader:
    """Emulates a model whose up rows and down columns live in separate matrices: every
    neuron costs one read per FFN part (row_bytes / n_parts each, never coalesced), landing
    in the same cache rows as a bundled read would. Stands in for FlashFFN.loader."""

    def __init__(self, path, n_parts: int, inner):
        from flashrt._core.loader import Loader

        self.n_parts = n_parts
        self.bundled = inner  # prefill's read_range keeps the real loader
        self.split = Loader(path, backend=inner.backend, n_threads=inner.n_threads,
                            queue_depth=inner.queue_depth, coalesce=False)
        self.backend = self.split.backend

        self._pending = None  # the loader a submit_* went to, until wait()

    def _split(self, row_bytes, ids, dest, slots=None):
        k = self.n_parts
        ids = np.asarray(ids, np.int64)
        split_ids = (ids[:, None] * k + np.arange(k)[None, :]).ravel()  # (m * k,) sorted
        if slots is None:
            return row_bytes // k, split_ids, dest.reshape(ids.size * k, -1), None
        split_slots = (np.asarray(slots, np.int64)[:, None] * k + np.arange(k)[None, :]).ravel()
        return row_bytes // k, split_ids, dest.reshape(dest.shape[0] * k, -1), split_slots

    def read_rows(self, layer_offset, row_bytes, ids, dest, slots=None):
        self.wait()
        part, split_ids, d, sl = self._split(row_bytes, ids, dest, slots)
        self.split.read_rows(layer_offset, part, split_ids, d, slots=sl)

    def read_range(self, offset, dest):
        self.wait()
        self.bundled.read_range(offset, dest)

    def submit_rows(self, layer_offset, row_bytes, ids, dest, slots=None):
        self.wait()
        part, split_ids, d, sl = self._split(row_bytes, ids, dest, slots)
        self.split.submit_rows(layer_offset, part, split_ids, d, slots=sl)
        self._pending = self.split

    def submit_range(self, offset, dest):
        self.wait()
        self.bundled.submit_range(offset, dest)
        self._pending = self.bundled

    def wait(self):
        ld, self._pending = self._pending, None
        return (0, 0) if ld is None else ld.wait()

    def waiter(self):
        return None if self._pending is None else self._pending.waiter()

    @property
    def in_flight(self):
        return self._pending is not None and self._pending.in_flight

    def stats(self):
        a, b = self.split.stats(), self.bundled.stats()
        return {k: a[k] + b[k] for k in a}

    def reset_stats(self):
        self.split.reset_stats()
        self.bundled.reset_stats()

    def close(self):
        self.wait()
        self.split.close()


class Variant:
    """Switches one flash Generator between the paper's ablation rows without reloading it:
    set("+ predictor") = no reuse + unbundled, "+ windowing" = unbundled, "+ bundling" = as
    shipped, through FlashFFN's public `loader` and `reuse`. "+ bundling" restores both."""

    def __init__(self, g):
        self.g = g
        ffn = g.ffn
        self.loader, self.pf_loader = ffn.loader, getattr(ffn, "pf_loader", None)
        self.unbundled = UnbundledLoader(ffn.loader.path, ffn.row_elems // ffn.dim, ffn.loader)
        self.pf_unbundled = (None if self.pf_loader is None else
                             UnbundledLoader(ffn.loader.path, ffn.row_elems // ffn.dim, self.pf_loader))

    def set(self, row: str) -> None:
        ffn = self.g.ffn
        split = row in ("+ predictor", "+ windowing")
        ffn.loader = self.unbundled if split else self.loader
        if self.pf_loader is not None:  # the guesses read ahead are unbundled too
            ffn.pf_loader = self.pf_unbundled if split else self.pf_loader
        ffn.reuse = row != "+ predictor"  # 'predictor only': every token re-reads all it predicts

    def close(self) -> None:
        self.set("+ bundling")
        self.unbundled.split.close()
        if self.pf_unbundled is not None:
            self.pf_unbundled.split.close()


class RecordingSelector:
    """Wraps a selector; keeps each decode token's selection per layer (for the window figure)."""

    def __init__(self, inner, n_layers):
        self.inner = inner
        self.name = getattr(inner, "name", "?")
        self.records = [[] for _ in range(n_layers)]
        self.on = False

    @property
    def uses_prior(self):
        return self.inner.uses_prior

    def select(self, layer, x, prior=None):
        ids = self.inner.select(layer, x, prior)
        if self.on:
            self.records[layer].append(np.asarray(ids, np.int64).copy())
        return ids

    def close(self):
        self.inner.close()


def window_curve(records, n_neurons, ks=range(1, 11), capacity=None):
    """From per-layer lists of per-token selections: for each window k, the mean share of the
    FFN held (union of the last k selections) and read (selected now, not in the last k-1).
    capacity=None: an unbounded cache (the window alone decides)."""
    out = {}
    for k in ks:
        held, new = [], []
        for recs in records:
            masks = np.zeros((len(recs), n_neurons), bool)
            for t, ids in enumerate(recs):
                masks[t, ids] = True
            for t in range(len(recs)):
                prev = masks[max(0, t - k + 1):t].any(axis=0) if k > 1 and t > 0 else np.zeros(n_neurons, bool)
                if t < k - 1:
                    continue  # warm-up: the window is not full yet
                held.append((prev | masks[t]).mean())
                new.append((masks[t] & ~prev).mean())
        out[k] = (float(np.mean(held)) if held else float("nan"), float(np.mean(new)) if new else float("nan"))
    return out


# ----------------------------------------------------------------------------- prompts
def synthetic_prompt(vocab: int, n: int, seed: int = 0) -> str:
    """A prompt of n random words of the synthetic model's word-level vocabulary."""
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(0, vocab, n))


PROSE = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
         "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
         "Books became cheaper, literacy spread, and ideas travelled faster than ever before.")


def decode_run(g, prompt: str, n_tokens: int, seed: int = 0, temperature: float = 1.0) -> dict:
    """Generate n_tokens; return ms per decoded token, tokens/s and the FFN's per-token figures.
    End-of-sequence tokens are ignored for the run (every run decodes n_tokens)."""
    tok = g.tokenizer
    eos = tok.eos_token_ids
    tok.eos_token_ids = set()
    try:
        g.generate(prompt, max_new_tokens=n_tokens, temperature=temperature, seed=seed)
    finally:
        tok.eos_token_ids = eos
    st = g.stats
    n = max(st.n_generated_tokens - 1, 1)
    out = dict(ms_per_token=1e3 * st.decode_seconds / n, tok_s=st.decode_tokens_per_second,
               n_decoded=n, prefill_s=st.prefill_seconds)
    out.update(st.ffn or {})
    if "bytes_read_per_token" in out and out.get("flash_MBps"):
        out["ms_io_loader_per_token"] = out["bytes_read_per_token"] / (out["flash_MBps"] * 1e3)
    return out


def run_fio(path, bs, backend, conc, seconds=3, rw="randread") -> float | None:
    """fio MB/s (1e6) on `path` with O_DIRECT, the same engine/concurrency as the loader backend."""
    if not shutil.which("fio"):
        return None
    engine, numjobs, iodepth = ("psync", conc, 1) if backend == "pread" else ("io_uring", 1, conc)
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
           f"--ioengine={engine}", f"--numjobs={numjobs}", f"--iodepth={iodepth}", "--thread",
           "--group_reporting", "--time_based", f"--runtime={seconds}", "--norandommap",
           "--randrepeat=0", "--output-format=json", "--readonly"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["bw_bytes"] / 1e6


def memory_bandwidth(n_bytes=512 * MiB, n_threads=2, repeats=5) -> float:
    """DRAM read bandwidth in GB/s: the best of `repeats` runs of two probes over n_bytes,
    (a) NumPy reductions over disjoint parts on n_threads threads (NumPy releases the GIL),
    (b) flashrt's float16 GEMV kernel on n_threads threads (what a decode step's matrices
    get at best). Each probe's result is a lower bound of the machine's bandwidth."""
    import threading

    from flashrt._core import kernels

    a = np.ones(n_bytes // 4, np.float32)
    parts = np.array_split(a, n_threads)
    W = np.ones((n_bytes // 2 // 8192, 8192), np.float16)
    x = np.ones(8192, np.float32)
    y = np.empty(W.shape[0], np.float32)
    best = 0.0
    for _ in range(repeats):
        ths = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        kernels.gemv(W, x, y, n_threads)
        best = max(best, W.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def runtime_bytes(path, max_context=256) -> int:
    """What flashrt itself needs beside the weights under a budget (KV cache, buffers,
    tokenizer, predictors), asked of the planner with an impossible budget in flash mode
    (its minimum = resident + runtime + a cache of MIN_CACHE_SHARE of the FFN)."""
    import re

    import flashrt
    from flashrt.errors import BudgetError
    from flashrt.budget import MIN_CACHE_SHARE, parse_size

    mb = model_bytes(path)
    select = "predictor" if (Path(path) / "predictors.npz").is_file() else "all"
    best = 0
    for mode in ("flash", "naive", "flash"):  # the planner's tokenizer estimate varies: keep the largest
        try:
            flashrt.Generator(path, mode=mode, select=select if mode == "flash" else None, memory_budget=1,
                              max_context=max_context, progress=False).close()
        except BudgetError as e:
            m = re.search(r"needs at least ([0-9.]+ [KMGT]?B)", str(e))
            if m:
                need = parse_size(m.group(1).replace(" ", ""))
                cache = MIN_CACHE_SHARE * mb["ffn"] if mode == "flash" else 0
                best = max(best, int(max(0, need - mb["resident"] - cache) * 1.02) + 1)
        except Exception:  # noqa: BLE001 - try the next mode
            continue
    # the planner's tokenizer estimate depends on what the process loaded before (first load
    # ~5-30 MB): leave that much slack
    return int(best * 1.1) + 32 * MiB


def budget_for(path, share=0.5, max_context=256) -> tuple[int, str]:
    """The memory budget that puts `share` of the model in DRAM: share x the model's bytes
    (resident + FFN), the paper's setting. When that cannot hold the resident tensors plus
    flashrt's own memory (tiny models), the budget is share x the model's bytes *plus* that
    runtime memory. Returns (bytes, note)."""
    from flashrt.budget import MIN_CACHE_SHARE

    mb = model_bytes(path)
    runtime = runtime_bytes(path, max_context)
    budget = int(share * mb["total"])
    min_cache = MIN_CACHE_SHARE * mb["ffn"] * 1.2
    if budget >= mb["resident"] + runtime + min_cache:
        return budget, f"{budget / 1e9:.2f} GB = {share:.0%} of the model's {mb['total'] / 1e9:.2f} GB"
    budget = int(max(share * mb["total"], mb["resident"] + min_cache) + runtime)
    return budget, (f"{budget / 1e6:.1f} MB = {share:.0%} of the model's {mb['total'] / 1e6:.1f} MB plus flashrt's "
                    f"own {runtime / 1e6:.1f} MB (KV cache, buffers, tokenizer, predictors): {share:.0%} of the "
                    f"model alone cannot hold the resident tensors and buffers")


def open_flash_at_share(path, share=0.5, **kw):
    """A flash-mode Generator holding `share` of the model's weights in DRAM: resident tensors
    + neuron caches = share x model bytes (the paper's setting). Where budget_for had to add
    flashrt's own memory on top (small models), the budget is trimmed until the neuron caches
    hold just share x model - resident. Returns (generator, budget note)."""
    import flashrt

    mb = model_bytes(path)
    budget, note = budget_for(path, share)
    g = flashrt.Generator(path, mode="flash", memory_budget=budget, progress=False, **kw)
    target = share * mb["total"] - mb["resident"]
    excess = g.plan.cache_bytes - target
    per_row = mb["row_bytes"] * mb["n_layers"]
    if excess > per_row:
        g.close()
        budget -= int(excess)
        g = flashrt.Generator(path, mode="flash", memory_budget=budget, progress=False, **kw)
        note = (f"{budget / 1e6:.1f} MB: neuron caches {g.plan.cache_bytes / 1e6:.1f} MB + resident "
                f"{mb['resident'] / 1e6:.1f} MB = {(g.plan.cache_bytes + mb['resident']) / mb['total']:.0%} of the "
                f"model's {mb['total'] / 1e6:.1f} MB; the rest is flashrt's own memory (KV cache, buffers, "
                f"tokenizer, predictors)")
    return g, note
