"""# Simulate a benchmark scan and its noisy copies

To prove that a strain map is right we need scans whose strain is known. This flow simulates
one scan of Voronoi grains with its ground truth (`stemlib.simulate`), then writes one noisy
copy per background level with the CC-ST-AE paper's noise model (`stemlib.noise`,
CONVENTIONS.md section 3): by default the paper's 0, 5, 10, ..., 50, 60 and 70 % at 1e5
electrons per pattern, so that results compare with its table.

The clean scan is written first; the noisy copies then run in parallel, one task each, on a
Dask task runner (a local cluster by default). Every store carries the truth, so each level
can be scored. The clean scan lives at `dest`, the copies beside it:

    out/sim.zarr  out/sim-noise00.zarr  out/sim-noise05.zarr  ...  out/sim-noise70.zarr

Run it from the command line with `stemflow simulate DEST --levels paper`, or as a flow
(the same command: without `--levels`, both write the clean scan alone and run no flow):

    python -m flows.simulate_benchmark out/sim.zarr --levels paper
"""

from __future__ import annotations

import math
import os
import sys
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from stemlib.io.storage import locate
from stemlib.noise import PAPER_COUNTS
from stemlib.paper import PAPER_LEVELS
from stemlib.simulate import SimulationConfig
from tasks.simulate import noise_scan, simulate_scan

from .runners import dask_runner

__all__ = ["PAPER_LEVELS", "NoiseLevels", "noisy_url", "simulate_benchmark"]


class NoiseLevels(BaseModel):
    """Which noisy copies to write: background levels, dose and seed."""

    model_config = ConfigDict(extra="forbid")

    levels: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: list(PAPER_LEVELS),
        description="Background weights w in [0, 1], one noisy copy each (0 is the clean pattern).",
    )
    counts: float = Field(
        PAPER_COUNTS, gt=0, description="Electrons per pattern N (the paper: 1e5)."
    )
    seed: int = Field(0, ge=0, description="Seed of the Poisson draws.")


def noisy_url(dest: str, background: float) -> str:
    """Where the copy at background ``w`` goes: beside ``dest``, e.g. ``sim-noise05.zarr``.

    Examples
    --------
    >>> noisy_url("out/sim.zarr", 0.05).endswith("out/sim-noise05.zarr")
    True
    >>> noisy_url("s3://bucket/sim.zarr", 0.125)
    's3://bucket/sim-noise12.5.zarr'
    """
    where = locate(dest)
    stem = where.name[: -len(".zarr")] if where.name.endswith(".zarr") else where.name
    percent = background * 100
    label = (
        f"{round(percent):02d}"
        if math.isclose(percent, round(percent), abs_tol=1e-9)
        else f"{percent:g}"
    )
    return where.sibling(f"{stem}-noise{label}.zarr").url


def _run_name() -> str:
    dest = str(flow_run.parameters.get("dest", "scan"))
    simulation = flow_run.parameters.get("simulation")
    seed = getattr(simulation, "seed", None)
    if seed is None and isinstance(simulation, dict):
        seed = simulation.get("seed")
    return f"simulate-{os.path.basename(dest.rstrip('/')) or 'scan'}-seed{seed or 0}"


@flow(
    name="simulate-benchmark", flow_run_name=_run_name, task_runner=dask_runner(), log_prints=True
)
def simulate_benchmark(
    dest: str, simulation: SimulationConfig | None = None, noise: NoiseLevels | None = None
) -> dict[str, Any]:
    """Simulate a scan with ground truth, then write one noisy copy per background level.

    Args:
        dest: Scan store for the clean scan, a path or URL; the noisy copies go beside it.
        simulation: Scan and pattern size, grains, lattice, strain and rotation ranges, seed,
            and what makes the patterns hard.
        noise: Background levels (default the paper's 0-70 %), dose and seed of the copies.
    """
    simulation = simulation or SimulationConfig()
    noise = noise or NoiseLevels()
    clean = simulate_scan.submit(simulation, dest)
    copies = {
        level: noise_scan.submit(
            dest, noisy_url(dest, level), level, noise.counts, noise.seed, wait_for=[clean]
        )
        for level in dict.fromkeys(noise.levels)
    }
    record = {
        "clean": clean.result(),
        "noisy": {f"{level:g}": future.result() for level, future in copies.items()},
    }
    rows = "\n".join(
        f"| {float(level) * 100:g} % | `{r['url']}` | {r['dtype']} | `{r['content_sha256'][:16]}` |"
        for level, r in record["noisy"].items()
    )
    create_markdown_artifact(
        key="simulate-benchmark",
        markdown=(
            f"**clean** `{record['clean']['url']}` {tuple(record['clean']['shape'])}, "
            f"seed {simulation.seed}, "
            f"{simulation.grains} {simulation.lattice} grains\n\n"
            f"| background | store | dtype | content sha256 |\n|---|---|---|---|\n{rows}\n\n"
            f"N = {noise.counts:g} electrons per pattern, noise seed {noise.seed}."
        ),
        description="Benchmark scans with ground truth written by the simulate-benchmark flow",
    )
    return record


# python -m flows.simulate_benchmark ARGS... is stemflow simulate ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["simulate", *sys.argv[1:]]))
