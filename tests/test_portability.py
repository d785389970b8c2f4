"""flash_io.h where Linux's extras are missing (as on macOS): no <linux/io_uring.h>, no O_DIRECT.

A small C program includes the header the way such a platform sees it (O_DIRECT undefined,
io_uring off) and checks at run time: the ring fails with ENOSYS (so the loader's "auto"
backend takes the pread pool), the pread pool reads the right bytes (compared with the file),
and opening for direct I/O goes through the stand-in (F_NOCACHE on macOS; where that does not
exist either, EINVAL, which the loader answers by reading buffered with a warning).
Needs a C compiler: skipped without one.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "flashrt" / "_core"

PROGRAM = r"""
#include <fcntl.h>        /* without _GNU_SOURCE glibc defines no O_DIRECT, as macOS has none */
#define FLASHRT_NO_URING 1
#include "flash_io.h"
#include <stdio.h>

int main(int argc, char **argv) {
#ifndef F_NOCACHE
    if (FRT_HAVE_O_DIRECT || FRT_HAVE_URING) { puts("headers: O_DIRECT or io_uring still on"); return 1; }
#endif
    int err = 0;
    if (frt_ring_new(8, &err) != NULL || err != ENOSYS) { printf("ring: err %d\n", err); return 1; }
    errno = 0;
    int dfd = frt_open(argv[1], O_RDONLY | O_DIRECT | O_CLOEXEC);
#ifdef F_NOCACHE
    if (dfd < 0) { printf("direct open: errno %d\n", errno); return 1; }
    close(dfd);
#else
    if (dfd != -1 || errno != EINVAL) { printf("direct open: fd %d errno %d\n", dfd, errno); return 1; }
#endif
    int fd = frt_open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) { printf("open: errno %d\n", errno); return 1; }
    static char buf[3][5000];
    frt_req reqs[3];
    memset(reqs, 0, sizeof reqs);
    int64_t offs[3] = {0, 12345, 60000};
    for (int i = 0; i < 3; i++) { reqs[i].off = offs[i]; reqs[i].len = reqs[i].need = 5000; reqs[i].buf = buf[i]; }
    frt_fault fault = {0, 0, 0};
    frt_pool *pool = frt_pool_new(4);
    frt_pool_run(pool, fd, reqs, 3, &fault);
    frt_pool_free(pool);
    for (int i = 0; i < 3; i++) {
        if (reqs[i].err || reqs[i].done != 5000) { printf("req %d: err %d done %lld\n", i, reqs[i].err, (long long)reqs[i].done); return 1; }
        fwrite(buf[i], 1, 5000, stdout);
    }
    return 0;
}
"""


def test_flash_io_without_linux_extras(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not os.access(cc, os.X_OK):
        pytest.skip("no C compiler")
    src = tmp_path / "portable.c"
    src.write_text(PROGRAM)
    r = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function", "-I", str(CORE),
                        str(src), "-o", str(tmp_path / "portable"), "-lpthread"], capture_output=True, text=True)
    if r.returncode and "not found" in r.stderr and "portable.c" not in r.stderr:
        pytest.skip(f"the C compiler does not run: {r.stderr[:200]}")
    assert r.returncode == 0, r.stderr
    data = os.urandom(70000)
    (tmp_path / "data.bin").write_bytes(data)
    r = subprocess.run([str(tmp_path / "portable"), str(tmp_path / "data.bin")], capture_output=True)
    assert r.returncode == 0, r.stdout[-200:]
    assert r.stdout == data[0:5000] + data[12345:17345] + data[60000:65000]
