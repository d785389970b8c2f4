#!/usr/bin/env bash
# Time the README's first command as a new user meets it: a clean clone of the committed HEAD,
# a brand-new venv on PATH, an empty HOME (so no pip cache) and an empty flashrt cache; the
# same set-up as ../shared/tools/fresh-check uses for the tests.
# Usage, from the project root:  bash bench/first_run.sh
set -eu
src=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/first-run.XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone -q --no-hardlinks "$src" "$work/repo"
python3 -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" HOME="$work/home"
unset FLASHRT_HOME PYTHONPATH
mkdir -p "$HOME"
cd "$work/repo"
# the first ```bash block of the README: the first command
cmd=$(awk '/^```bash$/ {on=1; next} on && /^```$/ {exit} on {print}' README.md)
echo "first-run: clean clone of $(git rev-parse --short HEAD), new venv, empty HOME"
echo "first-run: \$ $cmd"
start=$(python3 -c "import time; print(time.time())")
bash -c "$cmd" >"$work/out.txt" 2>"$work/err.txt" || { cat "$work/err.txt" | tail -20; echo "first-run: FAIL"; exit 1; }
end=$(python3 -c "import time; print(time.time())")
tail -4 "$work/out.txt"; grep -E "tok/s" "$work/err.txt" || true
python3 -c "print(f\"first-run: PASS in {$end - $start:.0f} s\")"
