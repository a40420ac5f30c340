"""The py4DSTEM baseline: py4DSTEM as a user runs it against stemflow on a Dask cluster.

One simulated scan (default 64 x 64 positions of 128 x 128 px, 8 grains within +-3 deg, so
that py4DSTEM's standard workflow can index it; ``--scan 256`` for the paper's size,
``--max-rot 45`` to see that workflow fail) goes through, in one run:

(a) py4DSTEM's standard strain workflow, one process, serial, the way its tutorials call it:
    the scan read into a ``DataCube``, a synthetic probe and sigmoid kernel of the true disk
    radius, ``find_Bragg_disks`` (``multicorr``), ``measure_origin`` + ``fit_origin``,
    ``StrainMap.choose_basis_vectors`` / ``fit_basis_vectors`` / ``get_strain`` against the true
    reference grain: hand-tuned with the simulation's own disk radius and spacing. Its
    strain is converted with :func:`stemlib.py4dstem.convention.strain_from_py4dstem`. BLAS is
    held to one thread (OpenBLAS threads make its sub-pixel step slower, not faster);
(b) stemflow's ``py4dstem_strain`` on the ``distributed.LocalCluster`` that ``stemflow strain``
    starts (:func:`flows.runners.local_cluster`), of one worker;
(c) the same with one single-threaded worker process per core.

Every parameter of (b) and (c) is measured on the data. Each step runs in its own process;
the clock covers reading the scan to the strain maps (cluster start-up reported apart). Peak
RSS is the step process's ``VmHWM`` plus, for (b) and (c), the sum of the workers' peaks.
Accuracy is the MAE against the simulation's truth, over the positions each method answered.

Usage::

    python benchmarks/baseline.py                 # 64 x 64 scan
    python benchmarks/baseline.py --scan 256      # the paper's 256 x 256 scan (hours on 2 cores)

Goal (issue 5): (c) >= 0.8 x cores x (a) in patterns/s, at equal accuracy.
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
import time
from pathlib import Path

from _results import save_results

from stemlib.resources import peak_rss

MB = 1e6


def _errors(strain: dict, valid, truth) -> dict[str, float]:
    from stemlib.metrics import strain_errors
    from stemlib.results import strain_dataset

    ds = strain_dataset("x", **strain, valid=valid)
    return strain_errors(ds.isel(method=0), truth, symmetry=int(truth.attrs["symmetry"]))


def step_py4dstem(source: str) -> dict:
    """(a) py4DSTEM's standard workflow, as its tutorials run it, serial in this process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import py4DSTEM
    from py4DSTEM.braggvectors import Probe

    from stemlib.io import open_scan
    from stemlib.py4dstem.convention import strain_from_py4dstem
    from stemlib.truth import open_truth

    scan, truth = open_scan(source), open_truth(source)
    radius = float(scan.attrs["disk_radius_px"])  # hand-tuned: the simulation's own values
    spacing = float(np.linalg.norm(np.array(scan.attrs["reciprocal_basis_px"]), axis=0).min())
    reference = np.asarray(truth["reference_mask"].values, bool)
    t0, c0 = time.perf_counter(), time.process_time()
    datacube = py4DSTEM.DataCube(data=np.asarray(scan.data.compute(scheduler="sync")))
    shape = datacube.Qshape
    kernel = Probe.generate_synthetic_probe(radius, 1.0, shape).get_kernel(
        mode="sigmoid", origin=(shape[0] / 2, shape[1] / 2), radii=(radius, 2 * radius)
    )
    braggvectors = datacube.find_Bragg_disks(
        template=kernel,
        sigma_cc=1,
        subpixel="multicorr",
        upsample_factor=16,
        minRelativeIntensity=0.005,
        minPeakSpacing=0.5 * spacing,
        edgeBoundary=int(2 * radius),
        maxNumPeaks=70,
    )
    detected = time.perf_counter() - t0
    out: dict = {"patterns": int(np.prod(datacube.Rshape)), "detect_seconds": detected}
    try:
        braggvectors.measure_origin(
            center_guess=(shape[0] // 2, shape[1] // 2), score_method="intensity"
        )
        braggvectors.fit_origin(plot=False)
        strainmap = py4DSTEM.StrainMap(braggvectors=braggvectors)
        strainmap.choose_basis_vectors(minSpacing=0.5 * spacing, edgeBoundary=1, maxNumPeaks=20)
        strainmap.set_max_peak_spacing(0.2 * spacing)
        strainmap.fit_basis_vectors()
        strainmap.get_strain(gvects=reference)
        slices = [strainmap.get_slice(n).data for n in ("e_xx", "e_yy", "e_xy", "theta")]
        strain = strain_from_py4dstem(*slices, symmetry=int(truth.attrs["symmetry"]))
        valid = strainmap.get_slice("mask").data.astype(bool)
        out.update(_errors(strain, valid, truth))
    except Exception as exc:  # noqa: BLE001 - the failure is the result (e.g. SVD did not converge)
        out["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        plt.close("all")
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["peak_rss"] = peak_rss()
    return out


def _stemflow(source: str, workers: int) -> dict:
    import numpy as np
    from distributed import Client

    from flows.runners import local_cluster  # the cluster a user's `stemflow strain` starts
    from stemlib.baseline_py4dstem import py4dstem_strain
    from stemlib.io import open_scan
    from stemlib.truth import open_truth

    scan, truth = open_scan(source), open_truth(source)
    t0 = time.perf_counter()
    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("py4DSTEM"))  # workers ready: imports are start-up
        start = time.perf_counter() - t0
        before, c1, t1 = client.run(time.process_time), time.process_time(), time.perf_counter()
        ds = py4dstem_strain(scan)  # reference auto, symmetry auto: nothing tuned
        seconds = time.perf_counter() - t1
        after = client.run(time.process_time)
        cpu = time.process_time() - c1 + sum(after[w] - before[w] for w in after)
        worker_rss = sum(client.run(peak_rss).values())
    result = ds.isel(method=0)
    strain = {k: result[k].values for k in ("exx", "eyy", "exy", "theta")}
    out = {
        "patterns": int(np.prod(scan.shape[:2])),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cluster_start_seconds": start,
        "peak_rss": peak_rss() + worker_rss,
        "reference": ds.attrs["reference"],
        "parameters": ds.attrs["methods"]["py4dstem"]["parameters"],
    }
    out.update(_errors(strain, result["valid"].values, truth))
    return out


def step_stemflow_one(source: str) -> dict:
    return _stemflow(source, 1)


def step_stemflow_all(source: str) -> dict:
    return _stemflow(source, os.cpu_count() or 1)


def step_empty(source: str) -> dict:
    import numpy as np  # noqa: F401 - the same imports as the measured steps
    import py4DSTEM  # noqa: F401

    from stemlib.io import open_scan

    open_scan(source)
    return {"peak_rss": peak_rss()}


STEPS = {
    "py4dstem": step_py4dstem,
    "one": step_stemflow_one,
    "all": step_stemflow_all,
    "empty": step_empty,
}


def run_step(step: str, source: Path) -> dict:
    env = dict(os.environ)
    if step == "py4dstem":
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--step", step, str(source)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(step: str, source: str) -> None:
    print(json.dumps(STEPS[step](source), default=str))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scan", type=int, default=64, help="scan of N x N positions (default 64)")
    parser.add_argument("--pattern", type=int, default=128, help="pattern size in px (default 128)")
    parser.add_argument("--grains", type=int, default=8, help="Voronoi grains (default 8)")
    parser.add_argument(
        "--max-rot", type=float, default=3.0, help="grain rotations within +-DEG (default 3)"
    )
    parser.add_argument("--background", type=float, default=0.0, help="noise w (default 0: clean)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    parser.add_argument("--step", nargs=2, metavar=("STEP", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        _child(*args.step)
        return

    import dask

    from stemlib.noise import noise_store
    from stemlib.simulate import SimulationConfig, write_simulation

    cores = os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="stemflow-baseline-bench-", dir=args.workdir))
    load = os.getloadavg()[0]
    config = SimulationConfig(
        scan=(args.scan, args.scan),
        pattern=args.pattern,
        grains=args.grains,
        max_rot_deg=args.max_rot,
        seed=args.seed,
    )
    try:
        source = workdir / "scan.zarr"
        with dask.config.set(scheduler="threads"):
            write_simulation(config, str(source))
            if args.background:
                noisy = workdir / "noisy.zarr"
                noise_store(str(source), str(noisy), background=args.background, seed=1)
                source = noisy
        empty = run_step("empty", source)
        runs = {}
        for step in ("py4dstem", "one", "all"):
            runs[step] = run_step(step, source)
            print(
                f"  {step}: {runs[step]['patterns'] / runs[step]['seconds']:.1f} patterns/s",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rate = {k: r["patterns"] / r["seconds"] for k, r in runs.items()}
    cpu_ms = {k: 1e3 * r["cpu_seconds"] / r["patterns"] for k, r in runs.items()}
    rss = {k: (r["peak_rss"] - empty["peak_rss"]) / MB for k, r in runs.items()}
    rows = [
        ("(a) py4DSTEM standard workflow, serial, hand-tuned", "1", "py4dstem"),
        ("(b) stemflow py4dstem_strain, LocalCluster", "1", "one"),
        ("(c) stemflow py4dstem_strain, LocalCluster", str(cores), "all"),
    ]

    def mae(r: dict, key: str, scale: float = 1e3) -> str:
        return f"{r[key] * scale:.2f}" if key in r else "-"

    lines = [
        "| step | workers | patterns/s | x (a) | CPU ms per pattern | peak RSS over empty MB "
        "| MAE exx | MAE eyy | MAE exy (1e-3) "
        "| MAE theta (deg) | coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, used, key in rows:
        r = runs[key]
        theta = f"{r['theta'] * 57.29578:.3f}" if "theta" in r else "-"
        coverage = f"{100 * r['coverage']:.1f} %" if "coverage" in r else r.get("failure", "-")
        lines.append(
            f"| {name} | {used} | {rate[key]:.1f} | {rate[key] / rate['py4dstem']:.2f} "
            f"| {cpu_ms[key]:.1f} | {rss[key]:.0f} "
            f"| {mae(r, 'exx')} | {mae(r, 'eyy')} | {mae(r, 'exy')} | {theta} | {coverage} |"
        )
    table = "\n".join(lines)
    goal = 0.8 * cores * rate["py4dstem"]
    verdict = "met" if rate["all"] >= goal else "not met"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine = (
        f"{platform.node()}: {cores} cores, {memory / 1e9:.0f} GB RAM, load {load:.2f} at start"
    )
    setup = (
        f"{args.scan} x {args.scan} scan of {args.pattern} x {args.pattern} px, "
        f"{args.grains} square grains "
        f"within +-{args.max_rot:g} deg, w = {args.background:g}, seed {args.seed}"
    )
    summary = (
        f"Goal (c) >= 0.8 x {cores} cores x (a) = {goal:.1f} patterns/s: {verdict} "
        f"(speed-up {rate['all'] / rate['py4dstem']:.2f} over (a), "
        f"{rate['all'] / rate['one']:.2f} over (b)). "
        f"Cluster start-up, not timed: (b) {runs['one']['cluster_start_seconds']:.1f} s, "
        f"(c) {runs['all']['cluster_start_seconds']:.1f} s. "
        f"(a) spent {runs['py4dstem']['detect_seconds']:.1f} s "
        "of its time in find_Bragg_disks. CPU cost per pattern, (c) / (a): "
        f"{cpu_ms['all'] / cpu_ms['py4dstem']:.2f} (on {cores} idle cores the speed-up would be "
        f"about {cores * cpu_ms['py4dstem'] / cpu_ms['all']:.2f}); load at start {load:.2f}."
    )
    print(f"\npy4DSTEM baseline benchmark, {setup}; {machine}\n{table}\n{summary}")
    name = f"baseline-{args.scan}x{args.pattern}-rot{args.max_rot:g}-w{args.background:g}"
    path = save_results(
        name,
        f"# py4DSTEM baseline benchmark\n\n{setup}; {machine}; {time.strftime('%Y-%m-%d')}\n\n"
        f"{table}\n\n{summary}\n",
        {
            "setup": vars(args) | {"workdir": None, "step": None},
            "machine": machine,
            "patterns_per_s": rate,
            "cpu_ms_per_pattern": cpu_ms,
            "peak_rss_MB": rss,
            "runs": runs,
            "goal_met": rate["all"] >= goal,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
