"""Build the Cython core. Packaging metadata lives in pyproject.toml.

Environment switches:
  FLASHRT_DEBUG=1          bounds checks on, -O0 -g (a debug build, symbols kept)
  FLASHRT_BUILD_ONLY=a,b   build only these _core modules (for working on one at a time)
"""
import os
import sys
from glob import glob

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FLASHRT_DEBUG") == "1"
ONLY = {m for m in os.environ.get("FLASHRT_BUILD_ONLY", "").split(",") if m}

# Baseline flags only: wide-vector code paths are compiled with per-function target
# attributes and chosen at run time (see _core/simd.h), so the build runs anywhere.
# No OpenMP: the kernels' thread pool is our own (simd.h), so the .so files need only libc.
# A release build has no debug info (-g0 overrides Python's own -g) and is stripped at link
# time, which also makes the first `pip install` compile faster.
compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-g0", "-fno-math-errno"]
compile_args += ["-Wno-unused-function", "-Wno-unreachable-code"]
link_args = []
if not DEBUG and sys.platform.startswith("linux"):
    link_args.append("-Wl,--strip-all")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
}

extensions = []
for pyx in sorted(glob("flashrt/_core/*.pyx")):
    name = os.path.splitext(os.path.basename(pyx))[0]
    if ONLY and name not in ONLY:
        continue
    extensions.append(
        Extension(
            f"flashrt._core.{name}",
            [pyx],
            include_dirs=[np.get_include(), "flashrt/_core"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    )

# Translate and compile the modules in parallel (one job per core): the first
# `pip install` of flashrt spends most of its time here.
n_jobs = os.cpu_count() or 1
setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, nthreads=n_jobs if n_jobs > 1 else 0),
    options={"build_ext": {"parallel": n_jobs}},
)
