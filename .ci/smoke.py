"""Smoke test of an installed flashrt (a wheel): import, convert a tiny model, generate.

    python .ci/smoke.py            # run from anywhere but the source tree's root

Checks that flashrt is imported from site-packages with its compiled core (not a source tree),
converts the tiny Llama fixture (a transformers-made checkpoint in tests/fixtures/hf) with a
byte tokenizer, and generates with it through the API (dense, and flash mode through the
loader: their logits must agree) and through the `flashrt` command. Needs only the wheel and
its dependencies: no compiler, no pytest. cibuildwheel runs it on every wheel it builds.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama"


def byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return tk.to_str()


def main() -> int:
    t0 = time.perf_counter()
    import numpy as np

    import flashrt
    from flashrt._core import cache, kernels, loader

    where = Path(flashrt.__file__).resolve().parent
    assert ROOT not in where.parents, f"flashrt was imported from the source tree ({where}), not the wheel"
    for mod in (cache, kernels, loader):
        assert Path(mod.__file__).suffix in (".so", ".pyd"), f"{mod.__name__} is not compiled: {mod.__file__}"
    print(f"smoke: flashrt {flashrt.__version__} from {where}, kernels path {kernels.cpu_features()['path']}")

    with tempfile.TemporaryDirectory(prefix="flashrt-smoke-") as tmp:
        tmp = Path(tmp)
        src = tmp / "llama-src"
        shutil.copytree(FIXTURE, src)
        (src / "tokenizer.json").write_text(byte_tokenizer_json())
        model = flashrt.convert(src, tmp / "llama", dtype="float32", progress=False)

        with flashrt.Generator(model) as g:
            text = g.generate("Hello", max_new_tokens=8)
            ids = g.tokenizer.encode("Hello world")
            dense = g.logits(ids)
        assert isinstance(text, str) and g.stats.n_generated_tokens == 8, (text, g.stats)
        with flashrt.Generator(model, mode="flash", select="all") as g:
            flash = g.logits(ids)
            g.generate("Hello", max_new_tokens=4)
            read = g.stats.ffn
        np.testing.assert_allclose(flash, dense, rtol=1e-4, atol=1e-4)
        assert np.isfinite(dense).all() and dense.shape[0] == len(ids)
        print(f"smoke: dense and flash logits agree on {len(ids)} tokens; generated {text!r}; flash stats {sorted(read)[:3]}")

        env = dict(os.environ, FLASHRT_HOME=str(tmp / "home"))
        out = subprocess.run([sys.executable, "-m", "flashrt", "generate", "Hi", "--model", str(model),
                              "--max-tokens", "4"], capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
        assert out.returncode == 0, out.stderr
        cli = Path(sys.executable).parent / "flashrt"  # the console script the wheel installed
        out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"flashrt {flashrt.__version__}", (cli, out)
    print(f"smoke: PASS in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
