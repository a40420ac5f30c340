"""Prefect task: the py4DSTEM correlation baseline on a scan store, published as a strain store."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemlib.baseline_py4dstem import METHOD, Py4DSTEMConfig, py4dstem_strain
from stemlib.io import open_scan
from stemlib.io.storage import redact
from stemlib.plots import png_url, save_png, strain_figure
from stemlib.results import write_strain
from stemlib.types import Symmetry

from ._retry import STORAGE_RETRY

__all__ = ["py4dstem_strain_scan"]


def _dask_client() -> contextlib.AbstractContextManager[Any]:
    """Inside a Dask worker (DaskTaskRunner), a client that secedes this task's thread while
    the scan's blocks run on the cluster; elsewhere, Dask's current scheduler."""
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return contextlib.nullcontext()
    return worker_client()


@task(
    name="py4dstem-strain",
    # Only an unreachable store is retried; a scan without disks or a bad region fails at once.
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def py4dstem_strain_scan(
    scan: str,
    dest: str,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    config: Py4DSTEMConfig | None = None,
    run_key: str | None = None,
) -> dict[str, Any]:
    """Strain maps of the scan store at ``scan`` by the py4DSTEM baseline, written to ``dest``.

    ``run_key`` (a fingerprint of the scan and these parameters) is recorded in the store's
    ``run_keys``, so that a rerun of the same step finds it finished."""
    logger = get_run_logger()
    with _dask_client():
        ds = py4dstem_strain(
            open_scan(scan),
            reference=reference,
            symmetry=symmetry,
            config=config,
            progress=logger.info,  # each quarter of the scan's patterns
        )
    if run_key:
        ds.attrs["run_keys"] = {METHOD: run_key}
    url = write_strain(ds, dest)
    png = save_png(strain_figure(ds, METHOD), png_url(dest, METHOD))
    record = ds.attrs["methods"][METHOD]
    logger.info(
        "wrote %s: coverage %.1f %%, %d invalid positions, reference %s, symmetry %s",
        redact(url),
        100 * record["coverage"],
        record["invalid_positions"],
        ds.attrs["reference"],
        ds.attrs["symmetry"],
    )
    return {
        "url": redact(url),
        "png": redact(png),
        "method": METHOD,
        "coverage": record["coverage"],
        "invalid_positions": record["invalid_positions"],
        "reference": ds.attrs["reference"],
        "symmetry": ds.attrs["symmetry"],
        "input_content_sha256": ds.attrs.get("input_content_sha256"),
    }
