"""# Reprocess a facility: every new scan under a folder or bucket prefix

1. **Find** the raw scans under `root` (supported formats, or only those of `ingest.format`;
   companion files counted once).
2. **Skip** the scans whose result under `dest_root` was already published with the same
   parameters (the result records a fingerprint of its source and parameters).
3. **Process** the rest with the `process-scan` flow, at most `max_concurrent` at a time, on one
   shared Dask cluster (a local one by default, or `dask_address`).
4. **Summarise**: processed, skipped and failed scans (with the reason) as an artifact. One
   failing scan never stops the others.

Scheduled nightly by the `facility-reprocess` deployment (deployments/prefect.yaml).
"""

from __future__ import annotations

import posixpath
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from stemlib.baseline_py4dstem import Py4DSTEMConfig
from stemlib.ccstae import CCSTAEConfig
from stemlib.discover import find_scans, scan_name
from stemlib.ingest import IngestOptions
from stemlib.io.storage import redact
from stemlib.types import Device, Method, Symmetry
from tasks.publish import published_request, request_key

from .process_scan import process_scan, resolved_parameters
from .runners import dask_runner, local_cluster

__all__ = ["reprocess_facility", "result_url"]


def result_url(dest_root: str, name: str) -> str:
    """Where the strain dataset of scan ``name`` goes: ``<dest_root>/<name>/strain.zarr``."""
    return posixpath.join(dest_root.rstrip("/"), name, "strain.zarr")


@contextmanager
def _cluster(address: str | None) -> Iterator[str]:
    """The address of a Dask cluster: ``address`` itself, or a local cluster for this run."""
    if address:
        yield address
        return
    with local_cluster() as cluster:
        yield cluster.scheduler_address


@task(name="process-one-scan", cache_policy=NO_CACHE)
def process_one(
    source: str, dest: str, address: str, parameters: dict[str, Any], device: Device
) -> dict[str, Any]:
    """Run process-scan on one scan; never raises, so that one failure does not stop the rest."""
    runner = process_scan.with_options(task_runner=dask_runner(address))
    state = runner(source=source, dest=dest, device=device, return_state=True, **parameters)
    if state.is_completed():
        return {"scan": redact(source), "status": "processed", "result": redact(dest), "reason": ""}
    return {"scan": redact(source), "status": "failed", "result": "", "reason": _reason(state)}


def _reason(state: Any) -> str:
    """The one-sentence error behind a failed run."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the message is the report
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return state.message or "failed"


def _process(
    todo: list[tuple[str, str]],
    parameters: dict[str, Any],
    device: Device,
    max_concurrent: int,
    dask_address: str | None,
) -> list[dict[str, Any]]:
    """The rows of the (source, dest) pairs ``todo``, processed at most ``max_concurrent`` at a
    time on one Dask cluster (none is started when there is nothing to do)."""
    if not todo:
        return []
    rows: list[dict[str, Any]] = []
    with _cluster(dask_address) as address:
        running: list[Any] = []
        for source, dest in todo:
            while len(running) >= max(1, max_concurrent):  # a free slot before the next scan
                finished, pending = wait(running, timeout=2)
                rows += [f.result() for f in finished]
                running = list(pending)
            running.append(process_one.submit(source, dest, address, parameters, device))
        rows += [f.result() for f in running]
    return rows


@flow(name="reprocess-facility", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def reprocess_facility(
    root: str,
    dest_root: str,
    max_concurrent: int = 2,
    methods: list[Method] | None = None,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    device: Device = "auto",
    ccstae_preset: Literal["auto", "cpu", "gpu"] = "auto",
    ccstae: CCSTAEConfig | None = None,
    py4dstem: Py4DSTEMConfig | None = None,
    ingest: IngestOptions | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Process every scan under a folder or bucket prefix that has not been processed yet.

    Args:
        root: Folder or prefix of raw scans, e.g. s3://facility-raw/.
        dest_root: Folder or prefix of results; scan NAME goes to DEST_ROOT/NAME/strain.zarr.
        max_concurrent: Scans processed at the same time.
        methods: Methods to run; both by default.
        reference: Reference region of every scan: "auto", "RX0:RX1,RY0:RY1" or a mask .npy.
        symmetry: Lattice symmetry: "auto", 2, 4 or 6.
        device: Where the CC-ST-AE trains: "auto", "cpu" or "cuda".
        ccstae_preset: CC-ST-AE recipe: "auto", "cpu" or "gpu".
        ccstae: A full CC-ST-AE configuration for every scan, replacing the preset.
        py4dstem: py4DSTEM baseline settings for every scan (derived from each scan by default).
        ingest: How to read every raw scan (an HDF5 dataset, a calibration the files lack, ...),
            for a facility whose files share them; each file says for itself by default.
        dask_address: Scheduler of an existing Dask cluster; a local one when empty.
    """
    logger = get_run_logger()
    parameters = resolved_parameters(
        methods=methods,
        reference=reference,
        symmetry=symmetry,
        device=device,
        ccstae_preset=ccstae_preset,
        ccstae=ccstae,
        py4dstem=py4dstem,
        ingest=ingest,
    )
    scans = find_scans(root, format=parameters["ingest"].format)
    logger.info("found %d scans under %s", len(scans), redact(root))
    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, str]] = []
    for source in scans:
        dest = result_url(dest_root, scan_name(source, root))
        try:
            done = published_request(dest) == request_key(source, **parameters)
        except Exception as exc:  # noqa: BLE001 - an unreadable scan is reported, not fatal
            rows.append(
                {"scan": redact(source), "status": "failed", "result": "", "reason": str(exc)}
            )
            continue
        if done:
            rows.append(
                {
                    "scan": redact(source),
                    "status": "skipped",
                    "result": redact(dest),
                    "reason": "already processed",
                }
            )
        else:
            todo.append((source, dest))
    rows += _process(todo, parameters, device, max_concurrent, dask_address)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("processed", "skipped", "failed")}
    create_table_artifact(
        key="reprocess-summary",
        table=sorted(rows, key=lambda r: r["scan"]),
        description=(
            f"{counts['processed']} processed, {counts['skipped']} skipped, "
            f"{counts['failed']} failed"
        ),
    )
    logger.info("%(processed)d processed, %(skipped)d skipped, %(failed)d failed", counts)
    return {"counts": counts, "scans": rows}


# python -m flows.reprocess_facility ARGS... is stemflow reprocess ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["reprocess", *sys.argv[1:]]))
