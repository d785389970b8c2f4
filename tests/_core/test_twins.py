"""flashrt._core chooses the compiled core or its NumPy twins (FLASHRT_PURE=1): the runtime
gives the same logits through both, in dense and in flash mode (each run in a fresh
interpreter, since the choice is made at import)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = """
import json, sys
import numpy as np
import flashrt, flashrt._core as core
ids = [1, 5, 9, 2, 7, 3]
out = {}
for mode in ("dense", "flash"):
    kw = dict(select="all") if mode == "flash" else {}
    with flashrt.Generator(sys.argv[1], mode=mode, threads=1, progress=False, **kw) as g:
        out[mode] = g.logits(ids)
        out[mode + "_decode"] = g.decode_logits(ids)
np.savez(sys.argv[2], **out)
print(json.dumps({"pure": core.PURE, "kernels": core.kernels.__name__, "loader": core.loader.__name__}))
"""


def run(path, pure, out):
    env = dict(os.environ)
    env.pop("FLASHRT_PURE", None)
    if pure:
        env["FLASHRT_PURE"] = "1"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        info.update({k: z[k] for k in z.files})
    return info


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_compiled_and_pure_cores_give_the_same_logits(tiny_models, name, tmp_path):
    compiled = run(tiny_models[name], False, tmp_path / "compiled.npz")
    pure = run(tiny_models[name], True, tmp_path / "pure.npz")
    assert (compiled["pure"], pure["pure"]) == (False, True)
    assert compiled["kernels"] == "flashrt._core.kernels" and pure["kernels"] == "flashrt._core._reference_kernels"
    assert pure["loader"] == "flashrt._core._reference_loader"
    for key in ("dense", "flash", "dense_decode", "flash_decode"):
        np.testing.assert_allclose(pure[key], compiled[key], atol=1e-4, rtol=0, err_msg=key)
    np.testing.assert_allclose(compiled["flash_decode"], compiled["dense"], atol=1e-4, rtol=0)
