"""Ingest throughput and memory: stemflow vs ``cp`` vs a naive load-and-write, in one run.

For each source format (a generated ``.npy`` and the same scan as HDF5, chunked per pattern as
detectors write it) the table gives GB/s of ``stemflow ingest``, of ``cp`` of the same file,
their ratio, the naive ``np.load`` + Zarr write where the scan fits in memory, the compression
ratio and the peak RSS of each. Every measured step runs in its own process (peak RSS is that
process's ``VmHWM``, see :func:`stemlib.resources.peak_rss`) and ends with ``sync``, so written
data has reached the disk. The page
cache is dropped before each step where the machine allows it (root); otherwise the table says
"warm".

Usage::

    python benchmarks/ingest.py               # 1 GB
    python benchmarks/ingest.py --size 8.6    # 256 x 256 x 256 x 256 uint16
    python benchmarks/ingest.py --size 8.6 --bin 2   # binned 2 x 2 positions and pixels

Goal (issue 3): stemflow >= 0.5 x cp with peak RSS < 1.5 GB at any size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np

RESULTS = Path(__file__).parent / "results"
PATTERN = 256  # detector pixels per side
GB = 1e9

STEP = textwrap.dedent(
    """
    import json, os, sys, time
    from stemlib.resources import peak_rss
    kind, src, dst, n = sys.argv[1:5]
    t0 = time.perf_counter()
    if kind == "stemflow":
        from stemlib.ingest import IngestOptions, ingest
        ingest(src, dst, IngestOptions(bin_scan=int(n), bin_q=int(n)))
    elif kind == "naive":
        import numpy as np, xarray as xr
        from stemlib.io.readers import open_source
        data = open_source(src).data.compute()  # the whole scan in memory, as np.load
        xr.Dataset({"data": (("rx", "ry", "qx", "qy"), data)}).to_zarr(dst, zarr_format=3)
    os.sync()
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss": peak_rss()}))
    """
)


def drop_caches() -> bool:
    """Drop the page cache (needs root); returns whether it was dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def scan_shape(size_gb: float) -> tuple[int, int, int, int]:
    """A scan of about ``size_gb`` GB of 256 x 256 uint16 patterns, 256 positions per row."""
    pattern_bytes = PATTERN * PATTERN * 2
    positions = max(1, round(size_gb * GB / pattern_bytes))
    ry = min(256, positions)
    return (max(1, positions // ry), ry, PATTERN, PATTERN)


def _pattern_bank(n: int = 64, seed: int = 0) -> np.ndarray:
    """Poisson-noisy Bragg-disk patterns: compressible the way detector data is."""
    rng = np.random.default_rng(seed)
    q = np.arange(PATTERN) - PATTERN // 2
    qx, qy = np.meshgrid(q, q, indexing="ij")
    bank = np.empty((n, PATTERN, PATTERN), np.uint16)
    for i in range(n):
        angle = rng.uniform(0, np.pi)
        image = np.zeros((PATTERN, PATTERN))
        for h in range(-3, 4):
            for k in range(-3, 4):
                cx = 30 * (h * np.cos(angle) - k * np.sin(angle))
                cy = 30 * (h * np.sin(angle) + k * np.cos(angle))
                image += np.exp(-(h * h + k * k) / 6) * (((qx - cx) ** 2 + (qy - cy) ** 2) < 64)
        bank[i] = rng.poisson(50 * image + 0.5)
    return bank


def generate(workdir: Path, shape: tuple[int, int, int, int]) -> dict[str, Path]:
    """Write the same scan as .npy and as HDF5 (chunked per pattern), row by row."""
    bank = _pattern_bank()
    npy, h5 = workdir / "scan.npy", workdir / "scan.h5"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint16, shape=shape)
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset("data", shape=shape, dtype=np.uint16, chunks=(1, 1, PATTERN, PATTERN))
        for i in range(shape[0]):
            row = bank[(np.arange(shape[1]) + i) % len(bank)]
            out[i] = row
            ds[i] = row
    out.flush()
    del out
    return {"npy": npy, "hdf5": h5}


def run_step(kind: str, src: Path, dst: Path, binning: int = 1) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", STEP, kind, str(src), str(dst), str(binning)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cp(src: Path, dst: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    os.sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": float("nan")}


def du(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=float, default=1.0, help="scan size in GB (default 1; 8.6 = 256^4 uint16)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    parser.add_argument("--formats", default="npy,hdf5")
    parser.add_argument(
        "--bin",
        type=int,
        default=1,
        help="stemflow bins N x N positions and N x N pixels as it ingests (default 1: none)",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stemflow-bench-", dir=args.workdir))
    shape = scan_shape(args.size)
    nbytes = int(np.prod(shape)) * 2
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        t0 = time.perf_counter()
        sources = generate(workdir, shape)
        print(
            f"generated {shape} uint16 ({nbytes / GB:.2f} GB) as npy and HDF5 in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        rows = []
        for fmt in args.formats.split(","):
            src = sources[fmt]
            cold = drop_caches()
            cp = run_cp(src, workdir / f"copy.{fmt}")
            (workdir / f"copy.{fmt}").unlink()
            drop_caches()
            ours = run_step("stemflow", src, workdir / f"{fmt}.zarr", args.bin)
            stored = du(workdir / f"{fmt}.zarr")
            shutil.rmtree(workdir / f"{fmt}.zarr")
            naive = None
            if nbytes < 0.25 * memory:
                drop_caches()
                naive = run_step("naive", src, workdir / f"naive-{fmt}.zarr")
                shutil.rmtree(workdir / f"naive-{fmt}.zarr")
            rows.append(
                {
                    "format": fmt,
                    "size_GB": nbytes / GB,
                    "cache": "cold" if cold else "warm",
                    "stemflow_GBps": nbytes / GB / ours["seconds"],
                    "cp_GBps": du(src) / GB / cp["seconds"],
                    "ratio_vs_cp": (nbytes / ours["seconds"]) / (du(src) / cp["seconds"]),
                    "naive_GBps": nbytes / GB / naive["seconds"] if naive else None,
                    "compression": nbytes / stored,
                    "stemflow_peak_RSS_GB": ours["peak_rss"] / GB,
                    "naive_peak_RSS_GB": naive["peak_rss"] / GB if naive else None,
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = (
        "| format | size GB | cache | stemflow GB/s | cp GB/s | stemflow/cp | naive GB/s "
        "| compression | peak RSS stemflow GB | peak RSS naive GB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        naive = f"{r['naive_GBps']:.2f}" if r["naive_GBps"] else "(does not fit)"
        naive_rss = f"{r['naive_peak_RSS_GB']:.2f}" if r["naive_peak_RSS_GB"] else "-"
        lines.append(
            f"| {r['format']} | {r['size_GB']:.2f} | {r['cache']} | {r['stemflow_GBps']:.2f} "
            f"| {r['cp_GBps']:.2f} | {r['ratio_vs_cp']:.2f} | {naive} | {r['compression']:.1f}x "
            f"| {r['stemflow_peak_RSS_GB']:.2f} | {naive_rss} |"
        )
    machine = f"{platform.node()}: {os.cpu_count()} cores, {memory / GB:.0f} GB RAM"
    table = "\n".join(lines)
    binned = (
        f"; stemflow bins {args.bin} x {args.bin} positions and pixels (--bin-scan, --bin-q): "
        "compression is the source's bytes over the binned store's"
        if args.bin > 1
        else ""
    )
    print(f"\nIngest benchmark, scan {shape} uint16{binned}, {machine}\n{table}")
    RESULTS.mkdir(exist_ok=True)
    name = f"ingest-{args.size:g}GB" + (f"-bin{args.bin}" if args.bin > 1 else "")
    out = RESULTS / f"{name}.md"
    out.write_text(
        f"# Ingest benchmark\n\nScan {shape} uint16{binned}; {machine}; "
        f"{time.strftime('%Y-%m-%d')}\n\n{table}\n"
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
