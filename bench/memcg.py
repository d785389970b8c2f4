"""Run a flashrt generation inside a memory cgroup whose limit is the budget plus the
interpreter's own baseline, so that page cache and every allocation count (the kernel's
view of the process, not flashrt's own accounting).

    python bench/memcg.py MODEL_DIR --budget 250MB --tokens 32      # one run, prints JSON

Used by tests/test_budget_cgroup.py (one run) and bench/budget_sweep.py (a sweep).
Works with cgroup v1 (memory.limit_in_bytes under the memory controller's mount) or v2
(memory.max); the cgroup is created as a child of this process's own cgroup, so the
limits above still apply, and removed afterwards.

What is measured, from the cgroup's own counters:
  v1: memory.failcnt (times a charge hit the limit and the kernel had to reclaim first),
      memory.max_usage_in_bytes (peak charge, page cache included), memory.oom_control
      (oom_kill), memory.stat pgmajfault (faults that read from disk: evicted code/data
      re-read, the sign of thrashing)
  v2: memory.events max / oom / oom_kill, memory.peak where the kernel has it, memory.stat
      pgmajfault
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _own_cgroup_dir():
    """(version, directory of this process's memory cgroup) or (None, reason)."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    own = Path("/proc/self/cgroup").read_text().splitlines()
    for line in mounts:  # v1 memory controller
        fields = line.split()
        sep = fields.index("-")
        fstype, opts = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup" and "memory" in opts.split(","):
            mnt = Path(fields[4])
            for entry in own:
                _, ctrls, path = entry.split(":", 2)
                if "memory" in ctrls.split(","):
                    return 1, mnt / path.lstrip("/")
    for line in mounts:  # v2
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2":
            mnt = Path(fields[4])
            for entry in own:
                if entry.startswith("0::"):
                    d = mnt / entry[3:].lstrip("/")
                    ctrls = (d / "cgroup.controllers").read_text().split() if (d / "cgroup.controllers").exists() else []
                    if "memory" in ctrls:
                        return 2, d
                    return None, f"cgroup v2 at {d} has no memory controller (controllers: {ctrls})"
    return None, "no cgroup v1 memory controller and no cgroup v2 mount"


class MemCgroup:
    """A child memory cgroup of our own; `with MemCgroup() as cg:` or cg = MemCgroup() (raises
    OSError/RuntimeError with the reason when the machine does not allow it)."""

    def __init__(self, name: str | None = None):
        version, where = _own_cgroup_dir()
        if version is None:
            raise RuntimeError(where)
        self.version = version
        self.dir = Path(where) / (name or f"flashrt-memcg-{os.getpid()}-{time.monotonic_ns()}")
        self.dir.mkdir()  # PermissionError / OSError: not writable here
        try:
            self.limit_file = self.dir / ("memory.limit_in_bytes" if version == 1 else "memory.max")
            self.limit_file.write_text("max" if version == 2 else "-1")
            if version == 1:
                (self.dir / "memory.swappiness").write_text("0")  # no swap: a limit means reclaim or OOM
        except OSError:
            self.remove()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # tasks still exiting
                time.sleep(0.1)

    def procs_file(self) -> Path:
        return self.dir / "cgroup.procs"

    def counters(self) -> dict:
        stat = dict(line.split() for line in (self.dir / "memory.stat").read_text().splitlines())
        out = {"pgmajfault": int(stat.get("pgmajfault", stat.get("total_pgmajfault", 0)))}
        if self.version == 1:
            out["failcnt"] = int((self.dir / "memory.failcnt").read_text())
            out["max_usage"] = int((self.dir / "memory.max_usage_in_bytes").read_text())
            oom = dict(line.split() for line in (self.dir / "memory.oom_control").read_text().splitlines())
            out["oom_kill"] = int(oom.get("oom_kill", 0))
        else:
            ev = dict(line.split() for line in (self.dir / "memory.events").read_text().splitlines())
            out["failcnt"] = int(ev.get("max", 0))
            out["oom_kill"] = int(ev.get("oom_kill", 0))
            peak = self.dir / "memory.peak"
            out["max_usage"] = int(peak.read_text()) if peak.exists() else None
        return out

    def run(self, argv: list, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
        """argv started inside the cgroup (it joins before exec, so everything it maps counts)."""
        script = f'echo $$ > "{self.procs_file()}" && exec "$@"'
        return subprocess.run(["sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd)


# The child: imports, measures the cgroup's charge (the interpreter's baseline), sets the limit
# to baseline + budget, then opens the model in flash mode and generates.
CHILD = textwrap.dedent("""
    import json, os, re, sys, time, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import flashrt, flashrt.api, flashrt.tokenizer, flashrt.format.reader, flashrt.models
    import flashrt.ffn.flash, flashrt._core.kernels, flashrt._core.loader, flashrt._core.cache
    import jinja2, tokenizers, safetensors.numpy  # everything the run will import, charged now
    model, budget, n_tokens, cgdir, version, prompt, select = sys.argv[1:8]
    budget, n_tokens, version = int(budget), int(n_tokens), int(version)
    usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    baseline = int(open(os.path.join(cgdir, usage_file)).read())
    rss0 = status("VmRSS")
    limit = baseline + budget
    open(os.path.join(cgdir, limit_file), "w").write(str(limit))
    if version == 1:
        open(os.path.join(cgdir, "memory.max_usage_in_bytes"), "w").write("0")
    def counts():
        if version == 1:
            fail = int(open(os.path.join(cgdir, "memory.failcnt")).read())
        else:
            ev = dict(l.split() for l in open(os.path.join(cgdir, "memory.events")).read().splitlines())
            fail = int(ev.get("max", 0))
        st = dict(l.split() for l in open(os.path.join(cgdir, "memory.stat")).read().splitlines())
        return fail, int(st.get("pgmajfault", st.get("total_pgmajfault", 0))), int(st.get("cache", st.get("file", 0)))

    c0 = counts()
    t0 = time.perf_counter()
    kw = {} if select == "default" else {"select": select}
    with flashrt.Generator(model, mode="flash", memory_budget=budget, progress=False, **kw) as g:
        t_open = time.perf_counter() - t0
        c1 = counts()
        text = g.generate(prompt, max_new_tokens=n_tokens)
        c2 = counts()
        mstat = dict(l.split() for l in open(os.path.join(cgdir, "memory.stat")).read().splitlines())
        st = g.stats
        out = dict(budget=budget, baseline=baseline, limit=limit, rss_baseline=rss0, peak_rss=status("VmHWM"),
                   open_seconds=round(t_open, 2), tokens=st.n_generated_tokens,
                   tokens_per_second=round(getattr(st, "decode_tokens_per_second", 0.0) or 0.0, 2),
                   select=g.select, cache_rows=g.plan.cache_rows, planned=g.plan.total, text=text,
                   failcnt_open=c1[0] - c0[0], failcnt_generate=c2[0] - c1[0],
                   pgmajfault_open=c1[1] - c0[1], pgmajfault_generate=c2[1] - c1[1],
                   page_cache=[c0[2], c1[2], c2[2]],
                   stat_after={k: int(mstat[k]) for k in ("cache", "rss", "mapped_file", "anon", "file", "kernel")
                               if k in mstat})
    print("RESULT " + json.dumps(out))
""")


def evict_page_cache(model_dir) -> None:
    """Drop the model's files from the page cache, so the run's own reads are charged to its
    cgroup (a page is charged to the cgroup that first brought it in)."""
    for p in Path(model_dir).iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_generation(model_dir, budget: int, n_tokens: int = 16, prompt: str = "The history of the printing press",
                   select: str = "default", timeout: float = 600) -> dict:
    """One flash-mode generation inside a fresh memory cgroup; the child's JSON plus the
    cgroup's counters (failcnt, oom_kill, pgmajfault, max_usage) and its exit code."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    evict_page_cache(model_dir)
    with MemCgroup() as cg:
        before = cg.counters()
        t0 = time.perf_counter()
        r = cg.run([sys.executable, "-c", CHILD, str(model_dir), str(budget), str(n_tokens), str(cg.dir),
                    str(cg.version), prompt, select], timeout=timeout, env=env)
        wall = time.perf_counter() - t0
        after = cg.counters()
    res = {"returncode": r.returncode, "wall_seconds": round(wall, 2), "cgroup_version": cg.version,
           "stderr": r.stderr[-2000:]}
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if m:
        res.update(json.loads(m.group(1)))
    res["failcnt"] = after["failcnt"] - before["failcnt"]
    res["oom_kill"] = after["oom_kill"] - before["oom_kill"]
    res["pgmajfault"] = after["pgmajfault"] - before["pgmajfault"]
    res["max_usage"] = after["max_usage"]
    return res


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flashrt.budget import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--select", default="default")
    args = ap.parse_args(argv)
    print(json.dumps(run_generation(args.model, parse_size(args.budget), args.tokens, select=args.select), indent=1))


if __name__ == "__main__":
    main()
