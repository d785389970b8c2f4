"""Flash read throughput: flashrt's Loader next to fio on the same file.

Random reads of one block size at random block-aligned offsets, O_DIRECT (so
the page cache does not lend us RAM speed), for the pread pool (threads) and
io_uring (queue depth), then `fio --rw=randread --direct=1` with the same bs
and concurrency (psync + numjobs for threads, io_uring + iodepth for the
queue). Then the flashrt-shaped cases: a windowed decode read (2.4% of a
layer's neurons, 16 KiB OPT-6.7B bundles, coalescing on/off) and a prefill
read_range of a whole layer next to fio's sequential read.

    python bench/bench_loader.py            # 2 GiB file under bench/work/, ~4 min
    python bench/bench_loader.py --quick    # 512 MiB, a few configs, ~40 s
    python bench/bench_loader.py --file /path/on/the/ssd --seconds 3
    python bench/bench_loader.py --matrix --file FILE   # flashrt vs fio, bs 4/16/64 KiB x qd 1/8/32,
                                                       # alternating, medians -> bench/results/loader_vs_fio.md
    python bench/bench_loader.py --batches --file FILE  # decode-sized batches at 16 KiB qd 32: one Loader,
                                                       # two overlapped, fio -> bench/results/loader_batches_vs_fio.md

Prints Markdown tables with MB/s (10^6 bytes/s) and the ratio ours/fio.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flashrt._core.loader import Loader, aligned_empty, uring_available  # noqa: E402

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work")


def make_file(path, size):
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(0)
    block = 64 * MiB
    t0 = time.perf_counter()
    with open(path + ".tmp", "wb") as f:
        for _ in range(0, size, block):
            f.write(rng.bytes(block))             # incompressible, so no virtual-disk shortcuts
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.rename(path + ".tmp", path)
    print(f"wrote {size / GiB:.2f} GiB to {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def bench_ours(path, backend, bs, conc, seconds, n_per_call=64, seed=0):
    """Random bs-sized reads at bs-aligned offsets, n_per_call per read_rows call."""
    kw = dict(n_threads=conc) if backend == "pread" else dict(queue_depth=conc)
    with Loader(path, backend=backend, direct=True, coalesce=False, chunk_bytes=bs, **kw) as ld:
        n_blocks = ld.file_size // bs
        rng = np.random.default_rng(seed)
        dest = aligned_empty((n_per_call, bs), np.uint8)
        dest[:] = 0
        ld.read_rows(0, bs, np.sort(rng.choice(n_blocks, n_per_call, replace=False)), dest)  # warm
        ld.reset_stats()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ids = np.sort(rng.choice(n_blocks, n_per_call, replace=False))
            ld.read_rows(0, bs, ids, dest)
        dt = time.perf_counter() - t0
        return ld.stats()["bytes_read"] / dt / 1e6


def bench_ours_batches(path, backend, bs, conc, seconds, per_call, seed=0):
    """Random bs-sized reads at bs-aligned offsets, per_call per read_rows call, the offsets
    drawn before the clock starts (fio draws its own in C): MB/s."""
    kw = dict(n_threads=conc) if backend == "pread" else dict(queue_depth=conc)
    with Loader(path, backend=backend, direct=True, coalesce=False, chunk_bytes=bs, **kw) as ld:
        n_blocks = ld.file_size // bs
        rng = np.random.default_rng(seed)
        batches = [np.sort(rng.choice(n_blocks, per_call, replace=False)) for _ in range(32)]
        dest = aligned_empty((per_call, bs), np.uint8)
        dest[:] = 0
        ld.read_rows(0, bs, batches[-1], dest)  # warm: the ring and the read thread exist
        ld.reset_stats()
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            ld.read_rows(0, bs, batches[i % len(batches)], dest)
            i += 1
        return ld.stats()["bytes_read"] / (time.perf_counter() - t0) / 1e6


def bench_ours_pair(path, backend, bs, conc, seconds, per_call, seed=0):
    """bench_ours_batches with two Loaders of conc // 2 each, their batches overlapped (batch
    i + 1 is submitted on one while batch i lands on the other, as FlashFFN's on-demand reads
    and guesses do): never more than conc reads in flight, but no gap while a batch drains."""
    half = max(1, conc // 2)
    kw = dict(n_threads=half) if backend == "pread" else dict(queue_depth=half)
    with Loader(path, backend=backend, direct=True, coalesce=False, chunk_bytes=bs, **kw) as a, \
            Loader(path, backend=backend, direct=True, coalesce=False, chunk_bytes=bs, **kw) as b:
        n_blocks = a.file_size // bs
        rng = np.random.default_rng(seed)
        batches = [np.sort(rng.choice(n_blocks, per_call, replace=False)) for _ in range(32)]
        dests = [aligned_empty((per_call, bs), np.uint8) for _ in range(2)]
        lds = [a, b]
        for ld, d in zip(lds, dests):
            d[:] = 0
            ld.read_rows(0, bs, batches[-1], d)
            ld.reset_stats()
        t0 = time.perf_counter()
        i = 0
        a.submit_rows(0, bs, batches[0], dests[0])
        while time.perf_counter() - t0 < seconds:
            lds[(i + 1) % 2].submit_rows(0, bs, batches[(i + 1) % len(batches)], dests[(i + 1) % 2])
            lds[i % 2].wait()
            i += 1
        lds[i % 2].wait()
        dt = time.perf_counter() - t0
        return (a.stats()["bytes_read"] + b.stats()["bytes_read"]) / dt / 1e6


def batches_table(path, backend, bs, conc, per_calls, seconds, rounds):
    """Decode-sized batches against fio at one bs and concurrency: one Loader (each batch
    drains before the next starts) and two overlapped (bench_ours_pair), alternating with fio."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common
    fio_secs = max(1, int(round(seconds)))
    rows = []
    for pc in per_calls:
        one, two, f = [], [], []
        for r in range(rounds):
            one.append(bench_ours_batches(path, backend, bs, conc, seconds, pc, seed=100 * r + pc))
            f.append(run_fio(path, "randread", bs, "psync" if backend == "pread" else "io_uring",
                             conc if backend == "pread" else 1, 1 if backend == "pread" else conc, fio_secs))
            two.append(bench_ours_pair(path, backend, bs, conc, seconds, pc, seed=100 * r + pc + 1))
        r1 = float(np.median(np.array(one) / np.array(f)))
        r2 = float(np.median(np.array(two) / np.array(f)))
        rows.append([backend, f"{bs // KiB} KiB", conc, pc, f"{np.median(one):.0f} ({min(one):.0f}-{max(one):.0f})",
                     f"{np.median(two):.0f} ({min(two):.0f}-{max(two):.0f})",
                     f"{np.median(f):.0f} ({min(f):.0f}-{max(f):.0f})", f"{r1:.2f}", f"{r2:.2f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    config = dict(file=path, size_GiB=f"{os.path.getsize(path) / GiB:.2f}", seconds=seconds, rounds=rounds,
                  order="one loader, fio, two loaders, alternating per round",
                  two_loaders=f"two Loaders of {max(1, conc // 2)} each, batch i+1 submitted while batch i lands")
    text = common.header(f"Decode-sized batches against fio: {bs // KiB} KiB random O_DIRECT reads at "
                         f"concurrency {conc}", config, path)
    table = common.md_table(["backend", "bs", "threads / qd", "reads per batch", "one loader MB/s (min-max)",
                             "two overlapped MB/s (min-max)", "fio MB/s (min-max)", "one / fio", "two / fio"], rows)
    out = "\n".join([text, "", table, "", f"loadavg at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"])
    common.write_result("loader_batches_vs_fio.md", out)
    return rows


def matrix(path, backends, sizes, concs, seconds, rounds, per_call):
    """flashrt's loader and fio side by side on the same file, bs and concurrency, O_DIRECT:
    ours, fio, ours, fio, ... (rounds each), medians and the median of the per-round ratios."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common
    fio_secs = max(1, int(round(seconds)))
    rows = []
    for backend in backends:
        for bs in sizes:
            for conc in concs:
                o, f = [], []
                for r in range(rounds):
                    o.append(bench_ours_batches(path, backend, bs, conc, seconds, per_call(conc), seed=100 * r + conc))
                    if backend == "pread":
                        f.append(run_fio(path, "randread", bs, "psync", conc, 1, fio_secs))
                    else:
                        f.append(run_fio(path, "randread", bs, "io_uring", 1, conc, fio_secs))
                ratio = float(np.median(np.array(o) / np.array(f)))
                rows.append([backend, f"{bs // KiB} KiB", conc, per_call(conc),
                             f"{np.median(o):.0f} ({min(o):.0f}-{max(o):.0f})",
                             f"{np.median(f):.0f} ({min(f):.0f}-{max(f):.0f})", f"{ratio:.2f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    config = dict(file=path, size_GiB=f"{os.path.getsize(path) / GiB:.2f}", seconds=seconds, rounds=rounds,
                  order="ours then fio, alternating per round", fio="--rw=randread --direct=1 --norandommap "
                  "(io_uring: numjobs=1 iodepth=qd; psync: numjobs=threads)")
    text = common.header("flashrt's loader next to fio: random O_DIRECT reads, same file, bs and concurrency",
                         config, path)
    table = common.md_table(["backend", "bs", "threads / qd", "reads per read_rows call", "flashrt MB/s (min-max)",
                             "fio MB/s (min-max)", "flashrt / fio (median of rounds)"], rows)
    out = "\n".join([text, "", table, "", f"loadavg at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"])
    common.write_result("loader_vs_fio.md", out)
    return rows


def run_fio(path, rw, bs, engine, numjobs, iodepth, seconds):
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           "--direct=1", f"--ioengine={engine}", f"--numjobs={numjobs}", f"--iodepth={iodepth}",
           "--thread", "--group_reporting", "--time_based", f"--runtime={seconds}",
           "--ramp_time=0", "--norandommap", "--randrepeat=0", "--output-format=json", "--readonly"]
    if rw == "read" and numjobs > 1:          # each job streams its own slice of the file
        part = (os.path.getsize(path) // numjobs) // (1 * MiB) * MiB
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    out = out[out.index("{"):]                      # fio may print notes before the JSON
    job = json.loads(out)["jobs"][0]
    return job["read"]["bw_bytes"] / 1e6


def bench_decode(path, backend, conc, seconds, coalesce, row_bytes=16 * KiB,
                 n_neurons=16384, frac=0.024, seed=1):
    """OPT-6.7B-shaped: per token per layer, read 2.4% of 16384 neurons of 16 KiB."""
    kw = dict(n_threads=conc) if backend == "pread" else dict(queue_depth=conc)
    layer_bytes = n_neurons * row_bytes
    with Loader(path, backend=backend, direct=True, coalesce=coalesce, **kw) as ld:
        n_layers = ld.file_size // layer_bytes
        rng = np.random.default_rng(seed)
        m = int(frac * n_neurons)
        dest = aligned_empty((m, row_bytes), np.uint8)     # as NeuronCache.rows is
        dest[:] = 0
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            ids = np.sort(rng.choice(n_neurons, m, replace=False))
            ld.read_rows(int(rng.integers(n_layers)) * layer_bytes, row_bytes, ids, dest)
            n += 1
        dt = time.perf_counter() - t0
        st = ld.stats()
        return dict(mb_s=st["bytes_useful"] / dt / 1e6, ms_per_layer=1e3 * dt / n,
                    reads_per_layer=st["n_reads"] / n, amplification=st["bytes_read"] / st["bytes_useful"])


def bench_prefill(path, backend, conc, seconds, chunk, layer_bytes=256 * MiB):
    kw = dict(n_threads=conc) if backend == "pread" else dict(queue_depth=conc)
    with Loader(path, backend=backend, direct=True, chunk_bytes=chunk, **kw) as ld:
        n_layers = ld.file_size // layer_bytes
        dest = aligned_empty((layer_bytes,), np.uint8)
        dest[:] = 0                 # fault the pages in once, as a reused layer buffer would be
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds or i == 0:
            ld.read_range((i % n_layers) * layer_bytes, dest)
            i += 1
        return ld.stats()["bytes_read"] / (time.perf_counter() - t0) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=None, help="file to read (created if missing)")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--quick", action="store_true", help="small file, few configs, short runs")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--matrix", action="store_true", help="only the side-by-side table against fio (needs fio)")
    ap.add_argument("--rounds", type=int, default=3, help="--matrix: alternating rounds per cell")
    ap.add_argument("--batches", action="store_true",
                    help="only decode-sized batches (--per-call list) against fio at 16 KiB, qd 32: one Loader "
                         "and two overlapped -> bench/results/loader_batches_vs_fio.md")
    ap.add_argument("--batch-sizes", default="16,64,256,1024", help="--batches: reads per batch")
    ap.add_argument("--per-call", type=int, default=0,
                    help="--matrix: reads per read_rows call (0: 16 x qd, at least 64, as a decode layer's batch)")
    args = ap.parse_args()
    if args.quick:
        args.size_gib, args.seconds = min(args.size_gib, 0.5), min(args.seconds, 0.7)
    path = args.file or os.path.join(WORK, f"bench_{args.size_gib:g}g.bin")
    make_file(path, int(args.size_gib * GiB))
    have_fio = shutil.which("fio") is not None and not args.no_fio
    if not have_fio and not args.no_fio:
        print("fio not found (apt-get install -y fio): its columns are left empty", file=sys.stderr)
    uring_ok, why = uring_available()
    backends = ["pread"] + (["uring"] if uring_ok else [])
    if not uring_ok:
        print(f"io_uring skipped: {why}", file=sys.stderr)
    if args.batches:
        if not have_fio:
            sys.exit("--batches needs fio (apt-get install -y fio)")
        batches_table(path, backends[-1], 16 * KiB, 32, [int(v) for v in args.batch_sizes.split(",")],
                      args.seconds, args.rounds)
        return
    if args.matrix:
        if not have_fio:
            sys.exit("--matrix needs fio (apt-get install -y fio)")
        pc = (lambda c: args.per_call) if args.per_call else (lambda c: max(64, 16 * c))
        matrix(path, backends[::-1], [4 * KiB, 16 * KiB, 64 * KiB], [1, 8, 32], args.seconds, args.rounds, pc)
        return

    if args.quick:
        sizes, concs = [4 * KiB, 64 * KiB, 256 * KiB], {"pread": [1, 8], "uring": [1, 32]}
    else:
        sizes = [4 * KiB, 16 * KiB, 64 * KiB, 128 * KiB, 256 * KiB]
        concs = {"pread": [1, 4, 8, 16, 32], "uring": [1, 4, 8, 32, 64]}
    secs = args.seconds
    fio_secs = max(1, int(round(secs)))

    print(f"\n## Random reads, O_DIRECT, {os.path.getsize(path) / GiB:.2f} GiB file `{path}`\n")
    print("| backend | bs | threads / qd | flashrt MB/s | fio MB/s | flashrt / fio |")
    print("|---|---|---|---|---|---|")
    rows = []
    for backend in backends:
        for bs in sizes:
            for conc in concs[backend]:
                # A/B alternately on a noisy machine: ours, fio, ours again; median-ish
                a = bench_ours(path, backend, bs, conc, secs / 2, seed=conc)
                f = None
                if have_fio:
                    if backend == "pread":
                        f = run_fio(path, "randread", bs, "psync", conc, 1, fio_secs)
                    else:
                        f = run_fio(path, "randread", bs, "io_uring", 1, conc, fio_secs)
                b = bench_ours(path, backend, bs, conc, secs / 2, seed=conc + 100)
                ours = max(a, b)
                rows.append((backend, bs, conc, ours, f))
                fs = f"{f:.0f}" if f else "-"
                ratio = f"{ours / f:.2f}" if f else "-"
                print(f"| {backend} | {bs // KiB} KiB | {conc} | {ours:.0f} | {fs} | {ratio} |", flush=True)

    print("\n## Decode-shaped reads: 2.4% of 16384 neurons x 16 KiB per layer (OPT-6.7B bundles)\n")
    print("| backend | threads / qd | coalesce | MB/s useful | ms / layer | reads / layer | read amplification |")
    print("|---|---|---|---|---|---|---|")
    for backend in backends:
        for conc in ([8] if args.quick else [8, 32]):
            for coalesce in (True, False):
                r = bench_decode(path, backend, conc, secs, coalesce)
                print(f"| {backend} | {conc} | {coalesce} | {r['mb_s']:.0f} | {r['ms_per_layer']:.2f} | "
                      f"{r['reads_per_layer']:.0f} | {r['amplification']:.3f} |", flush=True)

    print("\n## Prefill-shaped sequential read_range of a 256 MiB layer\n")
    print("| backend | threads / qd | chunk | flashrt MB/s | fio read MB/s | flashrt / fio |")
    print("|---|---|---|---|---|---|")
    for backend in backends:
        for chunk in ([256 * KiB] if args.quick else [256 * KiB, 1 * MiB]):
            conc = 8 if backend == "pread" else 32
            ours = bench_prefill(path, backend, conc, secs, chunk)
            f = None
            if have_fio:
                if backend == "pread":
                    f = run_fio(path, "read", chunk, "psync", conc, 1, fio_secs)
                else:
                    f = run_fio(path, "read", chunk, "io_uring", 1, conc, fio_secs)
            fs = f"{f:.0f}" if f else "-"
            ratio = f"{ours / f:.2f}" if f else "-"
            print(f"| {backend} | {conc} | {chunk // KiB} KiB | {ours:.0f} | {fs} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
