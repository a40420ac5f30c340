"""# Ingest a raw scan

Turn a raw 4D-STEM scan from any supported detector format into one calibrated, chunked,
compressed Zarr v3 store: the store every later step reads from.

The work runs as one Prefect task on a Dask task runner (a local cluster by default); inside
it, the scan streams block by block, so memory stays bounded whatever the scan size. A rerun
with the same source and options finds the finished store and skips it.

Run it from the command line with `stemflow ingest SOURCE DEST`, or as a flow:

    python -m flows.ingest /data/scan.mib s3://bucket/scans/scan.zarr
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from stemlib.ingest import IngestOptions
from tasks.ingest import ingest_scan

from .artifacts import artifact_key, file_name
from .runners import dask_runner

__all__ = ["ingest_flow"]


def _run_name() -> str:
    source = str(flow_run.parameters.get("source", "scan"))
    return f"ingest-{file_name(source)}"


@flow(name="ingest", flow_run_name=_run_name, task_runner=dask_runner(), log_prints=True)
def ingest_flow(source: str, dest: str, options: IngestOptions | None = None) -> dict[str, Any]:
    """Convert a raw scan into a chunked, compressed Zarr v3 scan store.

    Args:
        source: Raw scan, a path or URL (s3://bucket/key).
        dest: Scan store to write, a path or URL.
        options: Format, HDF5 dataset, scan shape, raw layout and calibration overrides.
    """
    record = ingest_scan.submit(source, dest, options or IngestOptions()).result()
    create_markdown_artifact(
        key=artifact_key("ingest", file_name(source)),
        markdown=(
            f"**{record['status']}** `{record['url']}`\n\n"
            f"| shape | content sha256 |\n|---|---|\n"
            f"| {tuple(record['shape'])} | `{record['content_sha256']}` |\n\n"
            f"Open with `xr.open_zarr({record['url']!r})`"
        ),
        description="Scan store written by the ingest flow",
    )
    return record


# python -m flows.ingest ARGS... is stemflow ingest ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["ingest", *sys.argv[1:]]))
