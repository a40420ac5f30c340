"""Noise throughput and memory: the paper's per-pattern loop vs stemflow vs the bare Poisson draw.

The same simulated patterns (default 4,096 of 200 x 200 px; ``--n 65536`` is the paper's
256 x 256 scan) go through, in one run:

(a) a per-pattern Python loop written the way the paper's code does it (auto4dstem's
    ``PoissonNoise.generate``: the Lorentzian background rebuilt for every pattern,
    ``np.random.poisson``, divide by N, multiply by 1e5/4), on one core;
(b) stemflow's ``noise_store``, Zarr to Zarr through dask on all cores: reading, the model,
    the draws, integer counts, compression, hashing and the atomic write all included;
(c) the bare cost of the same Poisson draws with NumPy, vectorised per block, on one core
    (``Generator.poisson`` on precomputed rates): the floor of an exact sampler.

For (a) and (c) the patterns are read block by block before the clock starts; (b) is timed end
to end. Each step runs in its own process; peak RSS is that process's ``VmHWM`` (Linux) minus
that of a process that only imports the same modules (the empty reference). The simulator's
throughput (render only, and render + write to Zarr, all cores) is printed too.

Usage::

    python benchmarks/noise.py                  # 4,096 patterns of 200 x 200
    python benchmarks/noise.py --n 65536        # the paper's 256 x 256 scan

Goal (issue 4): (b) >= 0.8 x cores x (c), with memory bounded (independent of --n).
No GPU path: none is written (untested code would not be acceptable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save_results

from stemlib.resources import peak_rss

MB = 1e6


# --- the steps, each run in its own process ----------------------------------------------------


def _blocks(source: str):
    """The source's patterns as float64 numpy blocks (crx, cry, QX, QY), one chunk at a time."""
    import numpy as np

    from stemlib.io.scan_store import open_scan

    data = open_scan(source).data
    for index in np.ndindex(data.numblocks):
        yield data.blocks[index].compute(scheduler="sync").astype(np.float64)


def _paper_generate(
    data, background_weight: float, counts_per_probe: float, intensity_coefficient: float
):
    """One pattern through the paper's noise step, written as its code does it."""
    import numpy as np

    test_img = np.copy(data)
    qx = np.fft.fftfreq(data.shape[0], d=1)
    qy = np.fft.fftfreq(data.shape[1], d=1)
    qya, qxa = np.meshgrid(qy, qx)
    qxa = np.fft.fftshift(qxa)
    qya = np.fft.fftshift(qya)
    qra2 = qxa**2 + qya**2
    im_bg = 1.0 / (1 + qra2 / 1e-2**2)
    im_bg = im_bg / np.sum(im_bg)
    int_comb = test_img * (1 - background_weight) + im_bg * background_weight
    int_noisy = np.random.poisson(int_comb * counts_per_probe) / counts_per_probe
    return int_noisy * intensity_coefficient


def step_paper_loop(source: str, dest: str, w: float, counts: float) -> dict[str, float]:
    import numpy as np

    np.random.seed(0)
    seconds, cpu, n = 0.0, 0.0, 0
    for block in _blocks(source):
        patterns = block.reshape(-1, *block.shape[2:])
        t0, c0 = time.perf_counter(), time.process_time()
        for pattern in patterns:
            _paper_generate(pattern, w, counts, 1e5 / 4)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        n += len(patterns)
    return {"seconds": seconds, "cpu_seconds": cpu, "patterns": n}


def step_bare_draw(source: str, dest: str, w: float, counts: float) -> dict[str, float]:
    import numpy as np

    from stemlib.noise import background_pattern

    rng = np.random.default_rng(0)
    seconds, cpu, n = 0.0, 0.0, 0
    for block in _blocks(source):
        lam = counts * ((1 - w) * block + w * background_pattern(block.shape[2:]))
        t0, c0 = time.perf_counter(), time.process_time()
        rng.poisson(lam)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        n += block.shape[0] * block.shape[1]
    return {"seconds": seconds, "cpu_seconds": cpu, "patterns": n}


def step_stemflow(source: str, dest: str, w: float, counts: float) -> dict[str, float]:
    import dask

    from stemlib.noise import noise_store

    t0, c0 = time.perf_counter(), time.process_time()  # process_time: all threads
    with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        result = noise_store(source, dest, background=w, counts=counts, seed=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "patterns": result.shape[0] * result.shape[1],
        "stored_bytes": result.stored_bytes,
    }


def step_empty(source: str, dest: str, w: float, counts: float) -> dict[str, float]:
    import numpy as np  # noqa: F401 - the same imports as the measured steps

    import stemlib.noise  # noqa: F401
    from stemlib.io.scan_store import open_scan

    open_scan(source)
    return {"seconds": 0.0, "patterns": 0}


STEPS = {
    "paper": step_paper_loop,
    "bare": step_bare_draw,
    "stemflow": step_stemflow,
    "empty": step_empty,
}


def _child(step: str, source: str, dest: str, w: float, counts: float) -> None:
    out = STEPS[step](source, dest, w, counts)
    out["peak_rss"] = peak_rss()
    print(json.dumps(out))


def run_step(step: str, source: Path, dest: Path, w: float, counts: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--step", step, str(source), str(dest), str(w), str(counts)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the source and the simulator's throughput ----------------------------------------------------


def scan_of(n: int) -> tuple[int, int]:
    """A near-square scan of ``n`` positions (256 x 256 for 65,536)."""
    rx = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rx, n // rx


def simulate_source(path: Path, n: int, pattern: int) -> dict[str, float]:
    import dask

    from stemlib.simulate import SimulationConfig, simulate, write_simulation

    config = SimulationConfig.hard(scan=scan_of(n), pattern=pattern, grains=8, seed=0)
    with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        data = simulate(config)["data"].data
        data = data[: max(1, 2048 // data.shape[1])]  # render only (no store), about 2048 patterns
        t0 = time.perf_counter()
        data.map_blocks(
            lambda b: b[:, :, :1, :1].copy(), chunks=data.chunks[:2] + ((1,), (1,))
        ).compute()
        render = data.shape[0] * data.shape[1] / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_simulation(config, str(path))
        written = n / (time.perf_counter() - t0)
    return {"render_per_s": render, "write_per_s": written}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=4096, help="patterns (default 4096; 65536 = the paper's scan)"
    )
    parser.add_argument(
        "--pattern", type=int, default=200, help="pattern size in px (default 200, the paper's)"
    )
    parser.add_argument("--background", type=float, default=0.5, help="w (default 0.5)")
    parser.add_argument("--counts", type=float, default=1e5, help="N (default 1e5, the paper's)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    parser.add_argument(
        "--step", nargs=5, metavar=("STEP", "SOURCE", "DEST", "W", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.step:
        step, source, dest, w, counts = args.step
        _child(step, source, dest, float(w), float(counts))
        return

    cores = os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="stemflow-noise-bench-", dir=args.workdir))
    source, w, counts = workdir / "source.zarr", args.background, args.counts
    load = os.getloadavg()[0]
    try:
        sim = simulate_source(source, args.n, args.pattern)
        print(
            f"simulator ({args.pattern} px, hard settings, {cores} cores): "
            f"{sim['render_per_s']:.0f} patterns/s "
            f"rendered, {sim['write_per_s']:.0f} patterns/s rendered and written to Zarr"
        )
        empty = run_step("empty", source, workdir / "none", w, counts)
        runs = {}
        for step in ("paper", "bare", "stemflow"):
            runs[step] = run_step(step, source, workdir / f"{step}.zarr", w, counts)
            print(
                f"  {step}: {runs[step]['patterns'] / runs[step]['seconds']:.0f} patterns/s",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rate = {k: r["patterns"] / r["seconds"] for k, r in runs.items()}
    per_cpu = {k: r["patterns"] / r["cpu_seconds"] for k, r in runs.items()}
    rss = {k: (r["peak_rss"] - empty["peak_rss"]) / MB for k, r in runs.items()}
    goal = 0.8 * cores * rate["bare"]
    rows = [
        ("(a) paper-style per-pattern loop", "1", "paper"),
        ("(b) stemflow noise_store, Zarr -> Zarr", str(cores), "stemflow"),
        ("(c) bare NumPy Poisson draw", "1", "bare"),
    ]
    lines = [
        "| step | cores | patterns/s | x (a) | x (c) | patterns per CPU-second | "
        "peak RSS over empty MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, used, key in rows:
        r = rate[key]
        lines.append(
            f"| {name} | {used} | {r:.0f} | {r / rate['paper']:.2f} | {r / rate['bare']:.2f} "
            f"| {per_cpu[key]:.0f} | {rss[key]:.0f} |"
        )
    table = "\n".join(lines)
    verdict = "met" if rate["stemflow"] >= goal else "not met"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine = (
        f"{platform.node()}: {cores} cores, {memory / 1e9:.0f} GB RAM, load {load:.2f} at start"
    )
    setup = f"{args.n} patterns of {args.pattern} x {args.pattern} px, w = {w:g}, N = {counts:g}"
    summary = (
        f"Goal (b) >= 0.8 x {cores} cores x (c) = {goal:.0f} patterns/s: {verdict} "
        f"({rate['stemflow'] / (cores * rate['bare']):.2f} x cores x bare). "
        f"CPU cost per pattern: (b) {1e3 / per_cpu['stemflow']:.2f} ms "
        f"(everything: read, model, draw, compress, hash, write) vs (c) "
        f"{1e3 / per_cpu['bare']:.2f} ms (the draw alone).\n"
        f"Simulator, hard settings, {cores} cores: {sim['render_per_s']:.0f} patterns/s rendered, "
        f"{sim['write_per_s']:.0f} patterns/s rendered and written."
    )
    print(f"\nNoise benchmark, {setup}; {machine}\n{table}\n{summary}")
    name = f"noise-{args.n}x{args.pattern}"
    path = save_results(
        name,
        f"# Noise benchmark\n\n{setup}; {machine}; {time.strftime('%Y-%m-%d')}\n\n"
        f"{table}\n\n{summary}\n",
        {
            "setup": vars(args) | {"workdir": None, "step": None},
            "machine": machine,
            "patterns_per_s": rate,
            "patterns_per_cpu_second": per_cpu,
            "peak_rss_MB": rss,
            "simulator": sim,
            "goal_met": rate["stemflow"] >= goal,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
