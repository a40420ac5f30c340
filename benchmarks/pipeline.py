"""The whole pipeline: the process-scan flow against the same steps run one after another.

One raw HDF5 scan (simulated grains with the paper's noise, ``--scan`` x ``--scan`` positions of
``--pattern`` px) is processed twice, each in its own process, in one run:

* **flow**: ``process_scan`` on Prefect (ephemeral API) with a Dask ``LocalCluster``: ingest,
  then CC-ST-AE (train + infer) and the py4DSTEM baseline in parallel, then compare + publish.
  Step times are the task runs' start and end times as Prefect recorded them.
* **sequential**: the same library calls in one process, one after another, no Prefect, no
  cluster (dask's threaded scheduler).

Printed: wall time per step and in all, their ratio, and the peak resident memory of each run's
whole process tree (the flow's Dask workers included), sampled every 0.2 s.

Usage::

    python benchmarks/pipeline.py                   # 64 x 64 x 128 px, CC-ST-AE cpu preset
    python benchmarks/pipeline.py --epochs 2        # quicker

Results go to ``benchmarks/results/pipeline-<scan>x<pattern>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _memory import run_sampled
from _results import save_results

STEPS = ("ingest", "ccstae", "py4dstem", "publish")


def write_scan(path: Path, scan: int, pattern: int) -> None:
    """The benchmark's raw scan: simulated grains, 25 % background at 1e5 counts, with truth."""
    import dask

    from stemlib.io.export import write_hdf5_scan
    from stemlib.noise import add_noise
    from stemlib.simulate import SimulationConfig, simulate

    sim = simulate(
        SimulationConfig(scan=(scan, scan), pattern=pattern, grains=8, lattice="square", seed=11)
    )
    counts = add_noise(sim["data"].data, background=0.25, counts=1e5, seed=0)
    truth = sim[
        [v for v in sim.data_vars if v.startswith("truth_") or v in ("grain_id", "reference_mask")]
    ]
    truth.attrs["truth_symmetry"] = sim.attrs["truth_symmetry"]
    with dask.config.set(scheduler="threads"):
        write_hdf5_scan(counts, path, truth=truth)


def run_flow(raw: str, out: str, config: Any, device: str) -> dict[str, float]:
    """process_scan on Prefect + a LocalCluster; step seconds from Prefect's task runs."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.process_scan import process_scan

    start = time.perf_counter()
    state = process_scan(
        source=raw, dest=f"{out}/strain.zarr", ccstae=config, device=device, return_state=True
    )
    total = time.perf_counter() - start
    state.result()

    async def task_runs() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                ),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )

    names = {
        "resolve-scan": "ingest",
        "train-ccstae": "ccstae",
        "infer-ccstae": "ccstae",
        "py4dstem-strain": "py4dstem",
        "publish-strain": "publish",
    }
    steps = dict.fromkeys(STEPS, 0.0)
    for run in asyncio.run(task_runs()):
        step = names.get(run.name.rsplit("-", 1)[0])
        if step and run.start_time and run.end_time:
            steps[step] += (run.end_time - run.start_time).total_seconds()
    return {**steps, "total": total}


def run_sequential(raw: str, out: str, config: Any, device: str) -> dict[str, float]:
    """The same steps as library calls, one after another, in this process."""
    import dask

    from stemlib.baseline_py4dstem import py4dstem_strain
    from stemlib.ccstae import ccstae_strain
    from stemlib.compare import compare_methods
    from stemlib.ingest import ingest
    from stemlib.io import open_scan
    from stemlib.plots import comparison_figure, png_url, save_png, strain_figure
    from stemlib.results import combine_methods, write_strain
    from stemlib.truth import open_truth

    steps: dict[str, float] = {}
    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        t = time.perf_counter()
        ingest(raw, f"{out}/scan.zarr")
        steps["ingest"] = time.perf_counter() - t
        scan = open_scan(f"{out}/scan.zarr")
        t = time.perf_counter()
        ours = ccstae_strain(
            scan, config=config, device=device, workdir=f"{out}/model", progress=False
        )
        steps["ccstae"] = time.perf_counter() - t
        t = time.perf_counter()
        baseline = py4dstem_strain(scan)
        steps["py4dstem"] = time.perf_counter() - t
        t = time.perf_counter()
        compared, _ = compare_methods(
            combine_methods([ours, baseline]), truth=open_truth(f"{out}/scan.zarr"), symmetry=4
        )
        write_strain(compared, f"{out}/strain.zarr")
        for method in ("ccstae", "py4dstem"):
            save_png(strain_figure(compared, method), png_url(f"{out}/strain.zarr", method))
        save_png(comparison_figure(compared), png_url(f"{out}/strain.zarr", "comparison"))
        steps["publish"] = time.perf_counter() - t
    return {**steps, "total": time.perf_counter() - start}


def measured(kind: str, raw: str, out: str, epochs: int | None, device: str) -> dict[str, Any]:
    """Run one kind in a child process; its whole process tree's peak RSS sampled meanwhile."""
    args = [sys.executable, __file__, "--child", kind, raw, out, "--device", device]
    if epochs:
        args += ["--epochs", str(epochs)]
    child, output, peak = run_sampled(args)
    if child.returncode:
        raise SystemExit(f"the {kind} run failed (exit {child.returncode})")
    return {**json.loads(output.strip().splitlines()[-1]), "peak_rss_gb": peak / 1e9}


def child(kind: str, raw: str, out: str, epochs: int | None, device: str) -> None:
    import logging

    from stemlib.ccstae import CCSTAEConfig

    logging.disable(logging.WARNING)
    config = CCSTAEConfig.preset(
        "gpu" if device == "cuda" else "cpu", **({"epochs": epochs} if epochs else {})
    )
    runner = run_flow if kind == "flow" else run_sequential
    print(json.dumps(runner(raw, out, config, device)))


def table(rows: dict[str, dict[str, Any]]) -> str:
    flow, seq = rows["flow"], rows["sequential"]
    lines = ["| step | flow s | sequential s | flow / sequential |", "|---|---|---|---|"]
    for step in (*STEPS, "total"):
        ratio = flow[step] / seq[step] if seq[step] else float("nan")
        lines.append(f"| {step} | {flow[step]:.1f} | {seq[step]:.1f} | {ratio:.2f} |")
    lines.append(
        f"| peak RSS (GB, process tree) | {flow['peak_rss_gb']:.2f} | {seq['peak_rss_gb']:.2f} | "
        f"{flow['peak_rss_gb'] / seq['peak_rss_gb']:.2f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=int, default=64, help="positions per side (default 64)")
    parser.add_argument(
        "--pattern", type=int, default=128, help="pattern px per side (default 128)"
    )
    parser.add_argument("--epochs", type=int, help="CC-ST-AE epochs (default: the preset's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=3, metavar=("KIND", "RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.child:
        child(*args.child, args.epochs, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="stemflow-bench-") as tmp:
        raw = Path(tmp) / "grains.h5"
        write_scan(raw, args.scan, args.pattern)
        rows = {
            kind: measured(kind, str(raw), f"{tmp}/{kind}", args.epochs, args.device)
            for kind in ("flow", "sequential")
        }
    name = f"pipeline-{args.scan}x{args.pattern}-{args.device}"
    text = (
        f"# Pipeline, {args.scan} x {args.scan} scan of {args.pattern} px, {args.device}"
        f"{f', {args.epochs} epochs' if args.epochs else ''}\n\n"
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}\n\n"
        f"{table(rows)}\n"
    )
    print(text)
    save_results(name, text, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
