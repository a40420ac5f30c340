"""Prefect tasks: score one method's strain store against the truth its scan carries, and the
least error that a scan's counts allow any method."""

from __future__ import annotations

import math
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemlib.bounds import least_errors
from stemlib.errors import InputError
from stemlib.io import open_scan
from stemlib.io.storage import redact
from stemlib.metrics import strain_errors
from stemlib.py4dstem.calibrate import sample_patterns
from stemlib.results import open_strain
from stemlib.truth import open_truth

from ._retry import STORAGE_RETRY

__all__ = ["score_strain", "least_errors_scan"]


@task(
    name="score-strain",
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def score_strain(result: str, scan: str, method: str) -> dict[str, Any]:
    """MAE of ``method``'s maps in the strain store ``result`` against the truth of ``scan``
    (:func:`stemlib.metrics.strain_errors`: ``exx, eyy, exy`` "1", ``theta`` rad, ``coverage``),
    over every position with a finite truth."""
    truth = open_truth(scan)
    if truth is None:
        raise InputError(f"scan {redact(scan)} carries no truth; score a simulated scan.")
    symmetry = int(truth.attrs["symmetry"])
    maps = open_strain(result).sel({"method": method}).load()
    errors = strain_errors(maps, truth, symmetry=symmetry)
    get_run_logger().info(
        "%s on %s: MAE exx %.2e, eyy %.2e, exy %.2e, theta %.3f deg, coverage %.3f",
        method,
        redact(scan),
        errors["exx"],
        errors["eyy"],
        errors["exy"],
        math.degrees(errors["theta"]),
        errors["coverage"],
    )
    return {**errors, "symmetry": symmetry}


@task(
    name="least-errors",
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def least_errors_scan(
    clean: str, *, backgrounds: list[float], counts: float, patterns: int = 256
) -> list[dict[str, float] | None]:
    """The least MAE (``exx, eyy, exy`` "1", ``theta`` rad) that an unbiased per-pattern method
    reaches on the clean scan ``clean`` recorded at ``counts`` electrons per pattern with each
    background weight of ``backgrounds`` (:func:`stemlib.bounds.least_errors`); None for a
    weight of 0 (the clean scan itself: no Poisson step, no bound). The about ``patterns``
    patterns, read once in whole chunks spread over the scan, serve every weight."""
    if not any(backgrounds):
        return [None] * len(backgrounds)
    sample, _, _ = sample_patterns(open_scan(clean).data, patterns)
    return [least_errors(sample, counts=counts, background=w) if w else None for w in backgrounds]
