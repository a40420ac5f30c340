"""Prefect task: ingest a raw scan into a scan store."""

from __future__ import annotations

from typing import Any

import dask
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemlib.ingest import IngestOptions, ingest
from stemlib.io.storage import redact

from ._retry import STORAGE_RETRY

__all__ = ["ingest_scan"]


@task(
    name="ingest-scan",
    **STORAGE_RETRY,
    # The store itself records its source key: a rerun finds it and skips, even across servers.
    cache_policy=NO_CACHE,
)
def ingest_scan(source: str, dest: str, options: IngestOptions) -> dict[str, Any]:
    """Convert the raw scan at ``source`` into a scan store at ``dest`` (skipped if
    already done)."""
    logger = get_run_logger()
    # Readers may memory-map (rosettasciio): stream with threads inside this worker rather than
    # shipping file handles to other processes.
    with dask.config.set(scheduler="threads"):
        result = ingest(source, dest, options)
    attrs = result.attrs
    if result.status == "skipped":
        logger.info("%s already holds %s: skipped", redact(result.url), attrs.get("source"))
    else:
        logger.info(
            "wrote %s: %s %s, %.1f MB stored, sha256 %s",
            redact(result.url),
            tuple(attrs["shape"]),
            attrs["dtype"],
            attrs["stored_bytes"] / 1e6,
            attrs["content_sha256"][:16],
        )
    return {
        "status": result.status,
        "url": redact(result.url),
        "source_key": result.source_key,
        "shape": list(attrs.get("shape") or attrs.get("stored_shape") or []),
        "content_sha256": attrs.get("content_sha256"),
    }
