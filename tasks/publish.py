"""Prefect tasks and helpers that tie a run together: the fingerprint of a whole request, and
publishing one strain dataset that holds every method, compared with each other and with the
truth (the fingerprints of single steps are in :mod:`stemlib.rerun`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from stemlib.compare import compare_methods, lattice_symmetry, statistics_table
from stemlib.io import open_scan
from stemlib.io.scan_store import read_store_attrs
from stemlib.io.storage import locate, redact
from stemlib.plots import comparison_figure, png_url, save_png, strain_figure, virtual_figure
from stemlib.provenance import fingerprint, software_versions, utc_now
from stemlib.rerun import scan_identity
from stemlib.results import combine_methods, open_strain, write_strain
from stemlib.truth import open_truth
from stemlib.virtual import with_virtual_images

from ._retry import STORAGE_RETRY

__all__ = ["request_key", "published_request", "publish_strain"]


def request_key(source: str, **parameters: Any) -> str:
    """Fingerprint of a whole request, computable before any work: the source's identity (a
    scan store's content hash and calibration, else the raw file's name, size and modification
    stamp with the reading and calibration options) and the run's parameters. A published
    dataset records it, so a facility rerun can skip it."""
    from stemlib.ingest import IngestOptions, source_key

    identity = scan_identity(source)
    ingest = parameters.get("ingest") or IngestOptions()
    stamp = (
        {k: identity[k] for k in ("content_sha256", "calibration")}
        if identity
        else source_key(locate(source), ingest)
    )
    plain = {
        k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v)
        for k, v in parameters.items()
    }
    return fingerprint({"source": stamp, "parameters": plain})


def published_request(dest: str) -> str | None:
    """The request key a published strain dataset at ``dest`` records, or None."""
    location = locate(dest)
    attrs = read_store_attrs(location) if location.exists() else None
    return (attrs or {}).get("request_key")


@task(
    name="publish-strain",
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def publish_strain(
    scan: str,
    results: dict[str, str],
    dest: str,
    run_keys: dict[str, str],
    request: str | None = None,
) -> dict[str, Any]:
    """Combine each method's strain store, compare them (and with the scan's truth), add the
    scan's virtual images, write the one strain dataset to ``dest`` atomically with PNG maps
    beside it.

    Returns the URL, the statistics and their table, the PNGs, and the warnings by method
    (``"ccstae and py4dstem"`` for those of the comparison: different reference regions or
    symmetries, :func:`stemlib.compare.compare_methods`)."""
    logger = get_run_logger()
    per_method = [open_strain(results[m]) for m in results]
    combined = combine_methods(per_method)
    truth = open_truth(scan)
    symmetry = lattice_symmetry(combined, truth)
    compared, stats = compare_methods(combined, truth=truth, symmetry=symmetry)
    compared = with_virtual_images(compared, open_scan(scan))
    scan_attrs = read_store_attrs(locate(scan)) or {}
    compared.attrs = {
        **combined.attrs,
        "symmetry": symmetry,
        "input": {
            "scan": redact(scan),
            "source": scan_attrs.get("source"),
            "content_sha256": scan_attrs.get("content_sha256"),
        },
        "run_keys": dict(run_keys),
        "request_key": request,
        "statistics": _jsonable(stats),
        "software": software_versions(),
        "created": utc_now(),
    }
    url = write_strain(compared, dest)
    pngs = {m: save_png(strain_figure(compared, m), png_url(dest, m)) for m in results}
    if len(results) > 1 or truth is not None:
        pngs["comparison"] = save_png(comparison_figure(compared), png_url(dest, "comparison"))
    pngs["virtual"] = save_png(virtual_figure(compared), png_url(dest, "virtual"))
    table = statistics_table(stats)
    logger.info("published %s\n%s", redact(url), table)
    warnings = {m: r.get("warnings", []) for m, r in compared.attrs["methods"].items()}
    if stats.get("warnings"):  # the methods' references or symmetries differ: no comparison
        warnings[" and ".join(results)] = stats["warnings"]
        for sentence in stats["warnings"]:
            logger.warning(sentence)
    return {
        "url": redact(url),
        "table": table,
        "warnings": warnings,
        "statistics": _jsonable(stats),
        "pngs": {k: redact(v) for k, v in pngs.items()},
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
