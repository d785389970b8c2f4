"""The memory budget checked from outside the process: a flash-mode generation inside a
memory cgroup whose limit is the budget plus the interpreter's own baseline (its charge
after importing everything), with the model's files dropped from the page cache first, so
that page cache and every allocation count.

Measured (bench/memcg.py): the run finishes (exit 0, no OOM kill), and during the
generation the cgroup's limit is never hit (v1 memory.failcnt / v2 memory.events "max"
unchanged: the kernel never had to reclaim to make room) and no major page faults
happen (memory.stat pgmajfault: nothing evicted had to be read back) -- no reclaim storm.
Opening may reclaim the page cache of files read once (counted and reported, not failed).
Skipped, with the reason printed, where no memory cgroup can be created.
"""
import importlib
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def memcg():
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("memcg")
    finally:
        sys.path.remove(str(BENCH))
    try:
        mod.MemCgroup().remove()
    except (OSError, RuntimeError) as e:
        print(f"\nskipped: no writable memory cgroup here ({e})")
        pytest.skip(f"no writable memory cgroup here: {e}")
    return mod


def minimum_flash_budget(model_dir) -> int:
    """The smallest budget flash mode accepts, from the BudgetError that names it."""
    import warnings

    import flashrt
    from flashrt.errors import BudgetError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BudgetError) as e:
            flashrt.Generator(model_dir, mode="flash", memory_budget="1MB", progress=False)
    m = re.search(r"needs at least ([\d.]+) ([KMG]B)", str(e.value))
    return int(float(m.group(1)) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]) + 200_000  # rounding


@pytest.mark.slow
def test_flash_generation_inside_a_memory_cgroup_of_budget_plus_baseline(memcg, smollm2_dir):
    budget = minimum_flash_budget(smollm2_dir)
    r = memcg.run_generation(smollm2_dir, budget, n_tokens=12, timeout=600)
    facts = {k: r.get(k) for k in ("budget", "baseline", "limit", "max_usage", "failcnt_open", "failcnt_generate",
                                   "pgmajfault_open", "pgmajfault_generate", "oom_kill", "tokens_per_second",
                                   "peak_rss", "rss_baseline", "cgroup_version")}
    print(f"\ncgroup run at the minimum flash budget: {facts}")
    assert r["returncode"] == 0 and r["oom_kill"] == 0, (facts, r["stderr"])
    assert r["tokens"] == 12 and r["text"].strip(), r
    assert r["failcnt_generate"] == 0, f"the generation hit the cgroup limit (reclaim): {facts}"
    assert r["pgmajfault_generate"] <= 10, f"major faults during the generation (thrashing): {facts}"
    if r["max_usage"] is not None:
        assert r["max_usage"] <= r["limit"]
