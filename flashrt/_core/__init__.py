"""The compiled core, or its NumPy twins (the msgpack habit).

    from flashrt._core import kernels, cache, loader     # what the runtime imports

`cache`, `kernels` and `loader` are the Cython modules (cache.pyx, kernels.pyx, loader.pyx),
or with FLASHRT_PURE=1 in the environment their pure twins (_reference_cache.py,
_reference_kernels.py, _reference_loader.py): same names, same signatures, slow, obviously
right. `PURE` says which ones this process runs. The tests run the runtime through both.
Nothing here imports the rest of flashrt.
"""
import os

PURE = os.environ.get("FLASHRT_PURE", "") == "1"

if PURE:
    from . import _reference_cache as cache, _reference_kernels as kernels, _reference_loader as loader
else:
    from . import cache, kernels, loader

__all__ = ["PURE", "cache", "kernels", "loader"]
