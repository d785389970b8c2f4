"""Flash random-read throughput vs chunk size (4-256 KiB) and concurrency, for both loader
backends (pread thread pool, io_uring) and fio on the same file, all O_DIRECT.

The measurements are bench/bench_loader.py's (bench_ours: random chunk-aligned reads of
one size through flashrt's Loader, 64 per read_rows call; run_fio: fio randread with the
same block size, psync x numjobs for threads or io_uring x iodepth). Ours and fio are
interleaved per point; each point is the median of `--repeats` alternations.

    python bench/figure_throughput.py                  # on the synthetic opt-6.7b ffn.bin
    python bench/figure_throughput.py --file /path/on/ssd --seconds 1
    python bench/figure_throughput.py --quick

Writes bench/results/figure_throughput.{md,png}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_loader  # noqa: E402
import common  # noqa: E402
from common import KiB, MiB, drop_page_cache, header, md_table, summarize, synthetic_path, write_result  # noqa: E402


def main(argv=None):
    from flashrt._core.loader import uring_available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=None, help="file to read (default: the synthetic opt-6.7b ffn.bin)")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    common.RESULTS_DIR = Path(args.results)
    path = args.file
    if path is None:
        cand = synthetic_path("opt-6.7b") / "ffn.bin"
        if cand.is_file() and not args.quick:
            path = str(cand)
        else:
            path = str(common.WORK_DIR / "throughput_256m.bin")
            bench_loader.make_file(path, 256 * MiB)
    sizes = [4, 8, 16, 32, 64, 128, 256]
    concs = {"pread": [1, 4, 16, 32], "uring": [1, 4, 16, 32, 64]}
    if args.quick:
        sizes, concs, args.seconds, args.repeats = [4, 64, 256], {"pread": [1, 8], "uring": [1, 32]}, 0.3, 1
    ok, why = uring_available()
    backends = ["pread"] + (["uring"] if ok else [])
    have_fio = shutil.which("fio") is not None
    cache_note = drop_page_cache([path])
    text = header("Flash random-read throughput vs chunk size and concurrency, O_DIRECT",
                  dict(file=f"{path} ({os.path.getsize(path) / 1e9:.2f} GB)", seconds=args.seconds,
                       repeats=args.repeats, page_cache=cache_note,
                       io_uring=("yes" if ok else why), fio=("yes" if have_fio else "not installed")), path)
    fio_secs = max(1, int(round(args.seconds)))
    data = {}
    rows = []
    for backend in backends:
        for conc in concs[backend]:
            for kib in sizes:
                bs = kib * KiB
                ours, fio = [], []
                for rep in range(args.repeats):
                    ours.append(bench_loader.bench_ours(path, backend, bs, conc, args.seconds, seed=rep * 7 + conc))
                    if have_fio:
                        if backend == "pread":
                            fio.append(bench_loader.run_fio(path, "randread", bs, "psync", conc, 1, fio_secs))
                        else:
                            fio.append(bench_loader.run_fio(path, "randread", bs, "io_uring", 1, conc, fio_secs))
                o, f = summarize(ours), summarize(fio)
                data[(backend, conc, kib)] = (o, f)
                ratio = f"{o['median'] / f['median']:.2f}" if f["n"] else "-"
                rows.append([backend, conc, kib, f"{o['median']:.0f} ({o['min']:.0f}–{o['max']:.0f})",
                             f"{f['median']:.0f}" if f["n"] else "-", ratio])
                print(f"{backend} conc {conc} {kib} KiB: flashrt {o['median']:.0f} MB/s, fio "
                      f"{f['median'] if f['n'] else float('nan'):.0f} MB/s", flush=True)
    table = md_table(["backend", "threads / queue depth", "chunk KiB", "flashrt MB/s (min–max)", "fio MB/s",
                      "flashrt / fio"], rows)
    lines = [text, table, "", "MB/s = 10^6 bytes/s of random chunk-aligned reads over the whole file. "
             "pread: a pool of N threads each issuing pread(); uring: io_uring with N requests in flight; "
             "fio: psync with numjobs=N, or io_uring with iodepth=N."]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.2), squeeze=False)
        for ax, backend in zip(axes[0], backends):
            for i, conc in enumerate(concs[backend]):
                color = f"C{i}"
                ax.plot(sizes, [data[(backend, conc, s)][0]["median"] for s in sizes], "-o", color=color,
                        label=f"flashrt, {conc}")
                if have_fio:
                    ax.plot(sizes, [data[(backend, conc, s)][1]["median"] for s in sizes], "--x", color=color,
                            label=f"fio, {conc}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.set(xlabel="chunk size (KiB)", ylabel="MB/s",
                   title=f"{backend}: {'threads' if backend == 'pread' else 'queue depth'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        png = common.RESULTS_DIR / "figure_throughput.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        lines += ["", f"![throughput figure]({png.name})"]
    except ImportError:
        lines += ["", "matplotlib not installed (pip install matplotlib): no PNG."]
    write_result(f"figure_throughput{'-quick' if args.quick else ''}.md", "\n".join(lines))
    return data


if __name__ == "__main__":
    main()
