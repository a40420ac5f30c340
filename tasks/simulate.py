"""Prefect tasks: simulate a scan with ground truth, and add the paper's noise to a scan."""

from __future__ import annotations

from typing import Any

import dask
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemlib.io.scan_store import WriteResult
from stemlib.io.storage import redact
from stemlib.noise import PAPER_COUNTS, noise_store
from stemlib.simulate import SimulationConfig, write_simulation
from stemlib.types import NoiseModel

from ._retry import STORAGE_RETRY

__all__ = ["simulate_scan", "noise_scan"]


def _done(result: WriteResult) -> str:
    """How the log names the outcome: a store that already held this result is kept."""
    return "kept (finished in an earlier run)" if result.status == "skipped" else "wrote"


def _record(result: WriteResult) -> dict[str, Any]:
    return {
        "url": redact(result.url),
        "shape": list(result.shape),
        "dtype": result.dtype,
        "content_sha256": result.content_sha256,
        "stored_bytes": result.stored_bytes,
        "status": result.status,
    }


@task(
    name="simulate-scan",
    **STORAGE_RETRY,
    # The store is the cache: a task's inputs say nothing about whether it still exists.
    cache_policy=NO_CACHE,
)
def simulate_scan(config: SimulationConfig, dest: str) -> dict[str, Any]:
    """Simulate a scan of Voronoi grains with its truth and publish it at ``dest``."""
    logger = get_run_logger()
    # Patterns render on this worker's threads: the scan streams block by block.
    with dask.config.set(scheduler="threads"):
        result = write_simulation(config, dest)
    logger.info(
        "%s %s: %s %s, content sha256 %s",
        _done(result),
        redact(result.url),
        result.shape,
        result.dtype,
        result.content_sha256[:16],
    )
    return _record(result)


@task(
    name="noise-scan",
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def noise_scan(
    source: str,
    dest: str,
    background: float,
    counts: float = PAPER_COUNTS,
    seed: int = 0,
    model: NoiseModel = "background",
) -> dict[str, Any]:
    """Write a noisy copy of the scan at ``source`` to ``dest`` (CONVENTIONS.md section 3)."""
    logger = get_run_logger()
    with dask.config.set(scheduler="threads"):
        result = noise_store(
            source, dest, background=background, counts=counts, seed=seed, model=model
        )
    logger.info(
        "%s %s: w = %g, N = %g, seed %d, %s",
        _done(result),
        redact(result.url),
        background,
        counts,
        seed,
        result.dtype,
    )
    return {
        **_record(result),
        "background": background,
        "counts": counts,
        "seed": seed,
        "model": model,
    }
