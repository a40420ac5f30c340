"""``stemflow demo [DEST]``: the whole pipeline on an embedded simulated scan.

A 32 x 32 scan of 128 px patterns (six square-lattice grains within +-2 % strain and +-45 deg,
one unstrained reference grain, soft disks with intensity falling off with |g|) is simulated
with 25 % background noise at 1e5 electrons per pattern (the paper's model) and written as a
raw HDF5 file with its truth, as a detector would; then ``stemflow run`` processes it with both
methods (CC-ST-AE with the CPU preset) and prints their errors against the truth.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from stemlib.io.export import write_hdf5_scan
from stemlib.noise import add_noise
from stemlib.simulate import SimulationConfig, simulate

from .run import add_pipeline_arguments, pipeline_options, run_pipeline

__all__ = ["register", "DEMO_SIMULATION", "DEMO_BACKGROUND", "write_demo_scan"]

#: The embedded scan.
DEMO_SIMULATION = SimulationConfig(
    scan=(32, 32),
    pattern=128,
    grains=6,
    lattice="square",
    max_strain=0.02,
    max_rot_deg=45.0,
    seed=7,
)
#: Background weight w of the paper's noise model (25 %).
DEMO_BACKGROUND = 0.25


def write_demo_scan(folder: Path) -> Path:
    """The demo's raw file ``folder/raw/demo-scan.h5`` (written once; reused afterwards)."""
    path = folder / "raw" / "demo-scan.h5"
    if path.exists():
        return path
    sim = simulate(DEMO_SIMULATION)
    counts = add_noise(sim["data"].data, background=DEMO_BACKGROUND, counts=1e5, seed=0)
    truth = sim[
        [v for v in sim.data_vars if v.startswith("truth_") or v in ("grain_id", "reference_mask")]
    ]
    truth.attrs["truth_symmetry"] = sim.attrs["truth_symmetry"]
    return write_hdf5_scan(
        counts,
        path,
        truth=truth,
        attrs={"description": "stemflow demo: simulated grains, 25 % background noise"},
    )


def _shown(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it, else as it is."""
    if "://" in path:
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _run(args: argparse.Namespace) -> int:
    folder = Path(args.dest)
    raw = write_demo_scan(folder)
    print(
        f"simulated scan: {raw} ({DEMO_SIMULATION.scan[0]} x {DEMO_SIMULATION.scan[1]} positions, "
        f"{DEMO_SIMULATION.pattern} px patterns, {DEMO_BACKGROUND:.0%} background noise)"
    )
    options = pipeline_options(args)
    options["scan_store"] = options["scan_store"] or str(folder / "demo-scan.zarr")
    published = run_pipeline(
        str(raw), str(folder / "strain.zarr"), dask_address=args.dask_address, **options
    )
    print(f"\n{published['table']}\n")
    print(
        f"strain dataset: {published['url']}\n  open it with:  xr.open_zarr({published['url']!r})"
    )
    for name, png in published["pngs"].items():
        print(f"  {name}: {_shown(png)}")
    print(f"\n{prefect_ui_hint()}")
    return 0


def prefect_ui_hint() -> str:
    """Where to see the run in the Prefect UI: the server ``PREFECT_API_URL`` names recorded it;
    without one, the run went to a temporary server, now stopped.

    >>> from prefect.settings import PREFECT_API_URL, temporary_settings
    >>> with temporary_settings({PREFECT_API_URL: "http://10.0.0.7:4200/api"}):
    ...     prefect_ui_hint()
    'See it in the Prefect UI: http://10.0.0.7:4200/runs'
    >>> with temporary_settings(restore_defaults={PREFECT_API_URL}):
    ...     prefect_ui_hint()[:48]
    'See it in the Prefect UI:  prefect server start '
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if PREFECT_API_URL.value() and PREFECT_UI_URL.value():
        return f"See it in the Prefect UI: {PREFECT_UI_URL.value()}/runs"
    return (
        "See it in the Prefect UI:  prefect server start   (then http://127.0.0.1:4200; run the "
        "demo again with PREFECT_API_URL=http://127.0.0.1:4200/api to record it there)"
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "demo",
        help="the whole pipeline on an embedded simulated scan",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument(
        "dest",
        nargs="?",
        default="stemflow-demo",
        metavar="DEST",
        help="output folder (default: ./stemflow-demo)",
    )
    add_pipeline_arguments(parser, preset="cpu")  # minutes on any machine
    parser.set_defaults(run=_run)
