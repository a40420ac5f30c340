"""Prefect tasks and helpers that tie a run together: the fingerprint of a whole request, and
publishing one strain dataset that holds every method, compared with each other and with the
truth (the fingerprints of single steps are in :mod:`stemlib.rerun`)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from stemlib.compare import compare_methods, lattice_symmetry, statistics_table
from stemlib.io import open_scan
from stemlib.io.scan_store import open_store_group, read_store_attrs
from stemlib.io.storage import locate, redact
from stemlib.jsonvalues import json_values
from stemlib.plots import comparison_figure, png_url, save_png, strain_figure, virtual_figure
from stemlib.provenance import fingerprint, software_versions, utc_now
from stemlib.rerun import scan_identity
from stemlib.results import combine_methods, damaged_strain, open_strain, write_strain
from stemlib.truth import open_truth
from stemlib.virtual import with_virtual_images

from ._retry import STORAGE_RETRY

__all__ = ["request_key", "published_request", "published_result", "publish_strain"]

#: Where a rerun says why it publishes again (on stderr and in the run's logs, as
#: :func:`stemlib.rerun.finished_step` says why it computes a step again).
log = logging.getLogger("stemlib.rerun")


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
    attrs = read_store_attrs(location)  # None where no store is
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
        "statistics": json_values(stats),
        "software": software_versions(),
        "created": utc_now(),
    }
    url = write_strain(compared, dest)
    names = _png_names(list(results), truth is not None)
    pngs = {name: save_png(_figure(compared, name), png_url(dest, name)) for name in names}
    summary = _summary(url, compared.attrs["methods"], compared.attrs["statistics"], pngs)
    logger.info("published %s\n%s", summary["url"], summary["table"])
    for sentence in stats.get("warnings", []):  # the methods' references or symmetries differ
        logger.warning(sentence)
    return summary


def published_result(dest: str, request: str) -> dict[str, Any] | None:
    """What an earlier run published at ``dest`` for the same ``request`` (:func:`request_key`),
    as :func:`publish_strain` returned it, read back from the dataset's record (no map is read).

    None where ``dest`` holds nothing or another request's result, or where a rerun must
    publish it again: the dataset lost blocks of its maps since it was written
    (:func:`stemlib.results.damaged_strain`), or one of its PNG maps is missing (a run stopped
    after the dataset and before its maps); both are logged as a warning.
    """
    location = locate(dest)
    group = open_store_group(location)  # None where no store is
    attrs = dict(group.attrs) if group is not None else {}
    if attrs.get("request_key") != request:
        return None
    damage = damaged_strain(location, attrs, group=group)
    stats = attrs["statistics"]
    maps = {n: locate(png_url(dest, n)) for n in _png_names(stats["methods"], "mae" in stats)}
    missing = [m.url for m in maps.values() if not m.exists()]
    if damage is not None or missing:
        lost = damage or f"{redact(missing[0])} is missing"
        log.warning("%s; publishing %s again.", lost, redact(dest))
        return None
    return _summary(location.url, attrs["methods"], stats, {n: m.url for n, m in maps.items()})


def _png_names(methods: list[str], has_truth: bool) -> list[str]:
    """The PNG maps of a publication, in their order: each method's, the comparison (of two
    methods, or of one with the truth) and the virtual images."""
    return [*methods, *(["comparison"] if len(methods) > 1 or has_truth else []), "virtual"]


def _figure(ds: Any, name: str) -> Any:
    """The figure of PNG map ``name`` (:func:`_png_names`) of the published dataset ``ds``."""
    if name == "comparison":
        return comparison_figure(ds)
    if name == "virtual":
        return virtual_figure(ds)
    return strain_figure(ds, name)


def _summary(
    url: str, records: dict[str, Any], stats: dict[str, Any], pngs: dict[str, str]
) -> dict[str, Any]:
    """:func:`publish_strain`'s return: the dataset's URL, its statistics (JSON: NaN as None)
    and their table, the PNGs, and the warnings by method (``records``: the dataset's
    ``methods`` attribute), those of the comparison under ``"ccstae and py4dstem"``."""
    warnings = {m: r.get("warnings", []) for m, r in records.items()}
    if stats.get("warnings"):
        warnings[" and ".join(stats["methods"])] = stats["warnings"]
    return {
        "url": redact(url),
        "table": statistics_table(stats),
        "warnings": warnings,
        "statistics": stats,
        "pngs": {k: redact(v) for k, v in pngs.items()},
    }
