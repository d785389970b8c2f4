"""Check the release files that `python -m build` + `auditwheel repair` made.

    python .ci/check_dist.py WHEEL SDIST

The wheel: a manylinux (or macOS) tag, no generated C, every extension module stripped
(no symbol table, no debug sections) and linked against nothing but libc/libpthread,
the LICENSE inside. The sdist: every file git tracks under flashrt/, tests/ and bench/, plus
LICENSE, README.md, pyproject.toml, setup.py and MANIFEST.in; no generated C, no .so.
Prints one line per check; exits 1 on the first failure.
"""
import subprocess
import sys
import tarfile
import zipfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_NEEDED = {"libc.so.6", "libpthread.so.0", "libm.so.6", "libdl.so.2", "ld-linux-x86-64.so.2",
                  "ld-linux-aarch64.so.1"}


def fail(msg: str) -> None:
    print(f"check_dist: FAIL: {msg}")
    sys.exit(1)


def check_wheel(path: Path) -> None:
    name = path.name
    if "linux" in name and "manylinux" not in name:
        fail(f"{name}: not a manylinux wheel (run auditwheel repair)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        c_files = [n for n in names if n.endswith(".c")]
        if c_files:
            fail(f"{name}: generated C inside: {c_files}")
        if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names):
            fail(f"{name}: no LICENSE in the dist-info")
        sos = [n for n in names if n.endswith(".so")]
        if len(sos) < 3:
            fail(f"{name}: expected the three _core extension modules, found {sos}")
        if sys.platform.startswith("linux"):
            from elftools.elf.dynamic import DynamicSection
            from elftools.elf.elffile import ELFFile

            for so in sos:
                elf = ELFFile(BytesIO(z.read(so)))
                sections = [s.name for s in elf.iter_sections()]
                if ".symtab" in sections or any(s.startswith(".debug") for s in sections):
                    fail(f"{so}: not stripped ({[s for s in sections if s == '.symtab' or s.startswith('.debug')]})")
                needed = {t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                          for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"}
                if needed - ALLOWED_NEEDED:
                    fail(f"{so}: links {sorted(needed - ALLOWED_NEEDED)} (libgomp? only libc is expected)")
        print(f"check_dist: {name}: {len(names)} files, no .c, {len(sos)} stripped .so needing only libc, "
              f"{path.stat().st_size / 1e6:.2f} MB")


def check_sdist(path: Path) -> None:
    with tarfile.open(path) as t:
        members = t.getnames()
    top = members[0].split("/")[0]
    have = {m[len(top) + 1:] for m in members if "/" in m}
    bad = sorted(m for m in have if m.endswith((".c", ".so")) and m.startswith("flashrt/"))
    if bad:
        fail(f"{path.name}: build products inside: {bad}")
    want = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "tests/conftest.py"}
    try:
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "flashrt", "tests", "bench"],
                                 capture_output=True, text=True, check=True).stdout.split()
        want |= set(tracked)
    except (OSError, subprocess.CalledProcessError):
        print("check_dist: not a git checkout: checking the sdist against a fixed list only")
    missing = sorted(want - have)
    if missing:
        fail(f"{path.name}: missing {len(missing)} files: {missing[:10]}")
    print(f"check_dist: {path.name}: {len(have)} files, every tracked file of flashrt/, tests/, bench/ "
          f"and LICENSE, README.md inside, no build products, {path.stat().st_size / 1e6:.2f} MB")


def main(argv) -> int:
    if len(argv) != 2:
        fail("usage: check_dist.py WHEEL SDIST")
    check_wheel(Path(argv[0]))
    check_sdist(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
