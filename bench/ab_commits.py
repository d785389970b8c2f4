"""Decode speed of two commits side by side: each commit is checked out into a temporary
worktree and built there, then the two run in alternating processes (A B B A A B ...) so the
machine's load falls on both alike; medians, the ratio and the spread are reported.

    python bench/ab_commits.py OLD NEW                      # SmolLM2 dense, 2 threads, 6 rounds
    python bench/ab_commits.py HEAD~1 HEAD --rounds 10 --tokens 64
    python bench/ab_commits.py main WORKTREE_DIR            # a directory is used as it is (built in place)
    python bench/ab_commits.py OLD NEW --model PATH --mode flash --memory-budget 150MB

Each process opens the model once, warms up (8 tokens), then decodes --tokens greedy tokens
--repeats times after the same prompt and reports the Generator's decode tokens/s. Every
commit converts the default model into its own FLASHRT_HOME (a storage format may differ
between commits). The child runs from a scratch directory: a `python -c` started inside a
checkout imports that checkout whatever PYTHONPATH says.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PROSE, REPO, header, md_table, write_result  # noqa: E402

CHILD = r'''
import json, sys, flashrt
model, mode, budget, threads, n_tokens, repeats, prompt = json.loads(sys.argv[1])
kw = {"mode": mode} if mode != "dense" else {}
if budget:
    kw["memory_budget"] = budget
g = flashrt.Generator(model, threads=threads, progress=False, **kw)
ids = g.tokenizer.encode(prompt)
list(g.stream_tokens(ids, max_new_tokens=8, stop_at_eos=False))
out = []
for _ in range(repeats):
    list(g.stream_tokens(ids, max_new_tokens=n_tokens, stop_at_eos=False))
    out.append(g.stats.decode_tokens_per_second)
print(json.dumps({"file": flashrt.__file__, "tok_s": out}))
'''


def checkout(rev: str, scratch: Path) -> tuple[Path, str]:
    """(source directory, label): a directory as it is, or `rev` checked out into scratch."""
    if Path(rev).is_dir():
        d = Path(rev).resolve()
        sha = subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        return d, f"{d.name} ({sha or 'no git'}, as it is)"
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"ab_commits: {rev!r} is neither a directory nor a commit of {REPO}; name a commit or a checkout")
    sha = found.stdout.strip()
    d = scratch / sha
    if not d.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(d), sha], check=True,
                       capture_output=True)
    return d, f"{rev} ({sha})"


def build(d: Path) -> None:
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"], cwd=d, check=True,
                   capture_output=True)


def run_child(d: Path, home: Path, run_dir: Path, args) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(d), FLASHRT_HOME=str(home))
    spec = json.dumps([args.model, args.mode, args.memory_budget, args.threads, args.tokens, args.repeats,
                       args.prompt])
    p = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, cwd=run_dir, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ab_commits: the run in {d} failed:\n{p.stderr.strip()[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(str(d)):
        sys.exit(f"ab_commits: the child imported {out['file']}, not the checkout {d}")
    return out["tok_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="commit (or directory) A, the baseline")
    ap.add_argument("b", help="commit (or directory) B")
    ap.add_argument("--model", default=None, help="model path (default: flashrt's default model)")
    ap.add_argument("--mode", default="dense", choices=("dense", "flash", "naive"))
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per process")
    ap.add_argument("--rounds", type=int, default=6, help="processes per commit, alternating")
    ap.add_argument("--prompt", default=PROSE[:120])
    ap.add_argument("--keep", action="store_true", help="keep the temporary worktrees")
    ap.add_argument("--save", metavar="NAME", help="also write the table to bench/results/NAME.md")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flashrt-ab-"))
    run_dir = scratch / "run"
    run_dir.mkdir()
    try:
        sides = []
        for rev in (args.a, args.b):
            d, label = checkout(rev, scratch)
            build(d)
            home = scratch / f"home-{len(sides)}"
            run_child(d, home, run_dir, argparse.Namespace(**{**vars(args), "repeats": 1}))  # converts the model
            sides.append({"dir": d, "label": label, "home": home, "tok_s": []})
        for r in range(args.rounds):
            for s in (sides if r % 2 == 0 else sides[::-1]):
                s["tok_s"] += run_child(s["dir"], s["home"], run_dir, args)
                print(f"round {r + 1}/{args.rounds} {s['label']}: {s['tok_s'][-args.repeats:]}", flush=True)
    finally:
        if not args.keep:
            for d in scratch.iterdir():
                if d.name not in ("run",) and not d.name.startswith("home-"):
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(d)],
                                   capture_output=True)
            shutil.rmtree(scratch, ignore_errors=True)
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)

    a, b = sides
    med = [statistics.median(s["tok_s"]) for s in sides]
    rows = [[s["label"], f"{m:.1f}", f"{min(s['tok_s']):.1f}–{max(s['tok_s']):.1f}", len(s["tok_s"])]
            for s, m in zip(sides, med)]
    config = {k: v for k, v in vars(args).items() if k not in ("a", "b", "keep", "save")}
    text = header(f"Decode tokens/s, {a['label']} against {b['label']}", config)
    text += md_table(["commit", "decode tok/s (median)", "min–max", "runs"], rows)
    text += f"\n\nB / A: **{med[1] / med[0]:.2f}x** the decode tokens/s (medians of alternating processes).\n"
    print(text[text.index("| commit"):])
    if args.save:
        write_result(f"{args.save}.md", text)


if __name__ == "__main__":
    main()
