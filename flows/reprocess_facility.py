"""# Reprocess a facility: every new scan under a folder or bucket prefix

1. **Find** the raw scans under `root` (supported formats, or only those of `ingest.format`;
   companion files counted once).
2. **Skip** the scans whose result under `dest_root` was already published with the same
   parameters (the result records a fingerprint of its source and parameters).
3. **Process** the rest with the `process-scan` flow, at most `max_concurrent` at a time, on one
   shared Dask cluster (a local one by default, or `dask_address`).
4. **Summarise**: processed, skipped and failed scans (with the reason) as an artifact. One
   failing scan never stops the others; the run then ends Failed (:class:`ScansFailed`), so
   that the run list and an automation watching for failed runs show it.

Scheduled nightly by the `facility-reprocess` deployment (deployments/prefect.yaml).
"""

from __future__ import annotations

import posixpath
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from stemlib.baseline_py4dstem import Py4DSTEMConfig
from stemlib.ccstae import CCSTAEConfig
from stemlib.discover import find_scans, scan_name
from stemlib.errors import InputError, StemflowError
from stemlib.ingest import IngestOptions
from stemlib.io.readers.numpy_raw import check_raw_layout
from stemlib.io.storage import locate, redact, storage_errors
from stemlib.reference import check_reference
from stemlib.types import Device, Method, Symmetry
from tasks.publish import published_request, request_key

from .process_scan import process_scan, resolved_parameters
from .runners import dask_runner, local_cluster

__all__ = [
    "reprocess_facility",
    "ScansFailed",
    "result_url",
    "check_settings",
    "survey",
    "pending",
    "summary",
    "counts_line",
]


def result_url(dest_root: str, name: str) -> str:
    """Where the strain dataset of scan ``name`` goes: ``<dest_root>/<name>/strain.zarr``."""
    return posixpath.join(dest_root.rstrip("/"), name, "strain.zarr")


def check_settings(root: str, dest_root: str, reference: str, ingest: IngestOptions | None) -> None:
    """Refuse settings that no scan could be processed with, as one sentence before the survey
    rather than the same failure per scan (or, for a ``root`` that is not a folder, a night
    that finds no scan and completes): a ``root`` that is not a folder or prefix, a
    ``dest_root`` that is a file, a ``reference`` no scan could take
    (:func:`~stemlib.reference.check_reference`), or ``--format raw`` without the files'
    layout."""
    source = locate(root)
    with storage_errors(source.url):
        if not source.fs.isdir(source.path):
            raise InputError(
                f"{redact(source.url)} is not a folder or prefix of raw scans; check the path."
            )
    location = locate(dest_root)
    with storage_errors(location.url):
        if location.fs.isfile(location.path):
            raise InputError(
                f"{redact(location.url)} is a file, not a folder or prefix of results; pass "
                "another DEST_ROOT."
            )
    check_reference(reference)
    if ingest is not None and ingest.format == "raw":
        check_raw_layout(ingest.read_options())


class ScansFailed(StemflowError):
    """Some scans of a facility run failed (the others were processed, or listed by a dry run):
    the run ends Failed with the counts as its message. ``summary`` is the run's
    :func:`summary`, and the reprocess-summary artifact gives each failed scan's reason."""

    def __init__(self, summary: dict[str, Any]) -> None:
        counts = summary["counts"]
        super().__init__(
            f"{counts['failed']} of {sum(counts.values())} scans failed ({counts_line(counts)}); "
            "the reprocess-summary artifact gives each one's reason."
        )
        self.summary = summary

    def __reduce__(self) -> tuple[type[ScansFailed], tuple[dict[str, Any]]]:
        return type(self), (self.summary,)  # pickled with its summary (a Dask or Prefect copy)


@contextmanager
def _cluster(address: str | None) -> Iterator[str]:
    """The address of a Dask cluster: ``address`` itself, or a local cluster for this run."""
    if address:
        yield address
        return
    with local_cluster() as cluster:
        yield cluster.scheduler_address


@task(name="process-one-scan", task_run_name="process-{name}", cache_policy=NO_CACHE)
def process_one(
    source: str,
    dest: str,
    address: str,
    parameters: dict[str, Any],
    device: Device,
    name: str,
    recompute: bool = False,
) -> dict[str, Any]:
    """Run process-scan on scan ``name`` (:func:`~stemlib.discover.scan_name`); never raises,
    so that one failure does not stop the rest.

    The task run and the process-scan run are both called ``process-NAME``, the scan's path
    below the root: a facility's files often share a base name (``day1/data.mib``,
    ``day2/data.mib``), which is all process-scan's own run name holds."""
    runner = process_scan.with_options(
        task_runner=dask_runner(address), flow_run_name=lambda: f"process-{name}"
    )
    state = runner(
        source=source,
        dest=dest,
        device=device,
        recompute=recompute,
        return_state=True,
        **parameters,
    )
    if state.is_completed():
        return _row(source, "processed", dest)
    return _row(source, "failed", reason=_reason(state))


def _reason(state: Any) -> str:
    """The one-sentence error behind a failed run."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the message is the report
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return state.message or "failed"


def survey(
    root: str, dest_root: str, parameters: dict[str, Any], *, recompute: bool = False
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The scans under ``root`` and what a run with ``parameters`` (from
    :func:`~flows.process_scan.resolved_parameters`) does with each: the rows of those it skips
    (their result under ``dest_root`` records the same request, unless ``recompute``) or cannot
    read (failed, with the reason), and the (source, destination) pairs of the others, to
    process."""
    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, str]] = []
    for source in find_scans(root, format=parameters["ingest"].format):
        dest = result_url(dest_root, scan_name(source, root))
        try:
            done = published_request(dest) == request_key(source, **parameters) and not recompute
        except Exception as exc:  # noqa: BLE001 - an unreadable scan is reported, not fatal
            rows.append(_row(source, "failed", reason=str(exc)))
            continue
        if done:
            rows.append(_row(source, "skipped", dest, "already processed"))
        else:
            todo.append((source, dest))
    return rows, todo


def _row(source: str, status: str, dest: str = "", reason: str = "") -> dict[str, Any]:
    """One scan's line of the summary (URLs without credentials). The reason comes before the
    result: the artifact's table (its columns in this order) shows why a scan failed without
    scrolling past the results' URLs."""
    return {"scan": redact(source), "status": status, "reason": reason, "result": redact(dest)}


def pending(todo: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows of a dry run's scans to process (:func:`survey`'s pairs)."""
    return [_row(source, "to process", dest) for source, dest in todo]


def summary(rows: list[dict[str, Any]], *, dry_run: bool = False) -> dict[str, Any]:
    """``counts`` of the scans by status (those of a run, or of a dry run) and the ``scans``'
    rows sorted by scan.

    >>> rows = [{"scan": "b", "status": "failed"}, {"scan": "a", "status": "skipped"}]
    >>> summary(rows, dry_run=True)["counts"]
    {'to process': 0, 'skipped': 1, 'failed': 1}
    >>> [row["scan"] for row in summary(rows)["scans"]]
    ['a', 'b']
    """
    statuses = ("to process" if dry_run else "processed", "skipped", "failed")
    return {
        "counts": {s: sum(r["status"] == s for r in rows) for s in statuses},
        "scans": sorted(rows, key=lambda r: r["scan"]),
    }


def counts_line(counts: dict[str, int]) -> str:
    """``counts`` of :func:`summary` as one line.

    >>> counts_line({"processed": 1, "skipped": 0, "failed": 2})
    '1 processed, 0 skipped, 2 failed'
    """
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _process(
    root: str,
    todo: list[tuple[str, str]],
    parameters: dict[str, Any],
    device: Device,
    max_concurrent: int,
    dask_address: str | None,
    recompute: bool = False,
) -> list[dict[str, Any]]:
    """The rows of the (source, dest) pairs ``todo`` found under ``root``, processed at most
    ``max_concurrent`` at a time on one Dask cluster (none is started when there is nothing to
    do)."""
    if not todo:
        return []
    rows: list[dict[str, Any]] = []
    with _cluster(dask_address) as address:
        running: list[Any] = []
        for source, dest in todo:
            while len(running) >= max_concurrent:  # a free slot before the next scan
                finished, unfinished = wait(running, timeout=2)
                rows += [f.result() for f in finished]
                running = list(unfinished)
            name = scan_name(source, root)
            running.append(
                process_one.submit(source, dest, address, parameters, device, name, recompute)
            )
        rows += [f.result() for f in running]
    return rows


def _run_name() -> str:
    """``reprocess-ROOT`` (the last part of the root), ``reprocess-ROOT-dry-run`` for a dry run:
    a dry run, which processes nothing, is not mistaken for a night's run in the UI."""
    root = str(flow_run.parameters.get("root", ""))
    name = f"reprocess-{posixpath.basename(root.rstrip('/')) or 'facility'}"
    return f"{name}-dry-run" if flow_run.parameters.get("dry_run") else name


@flow(
    name="reprocess-facility",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    log_prints=True,
)
def reprocess_facility(
    root: str,
    dest_root: str,
    max_concurrent: Annotated[int, Field(ge=1)] = 2,
    methods: list[Method] | None = None,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    device: Device = "auto",
    ccstae_preset: Literal["auto", "cpu", "gpu"] = "auto",
    ccstae: CCSTAEConfig | None = None,
    py4dstem: Py4DSTEMConfig | None = None,
    ingest: IngestOptions | None = None,
    dask_address: str | None = None,
    dry_run: bool = False,
    recompute: bool = False,
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
        dry_run: Only list the scans a run would process ("to process") or skip, reading no
            patterns (a file its reader refuses is listed to process, and fails in a run).
        recompute: Process every scan again, also those processed with the same settings
            (after an upgrade of stemflow, say): both methods computed anew.

    Returns:
        :func:`summary` of the scans: ``counts`` by status, and a row per scan.

    Raises:
        ScansFailed: When any scan failed, with that summary (the run ends Failed).
    """
    logger = get_run_logger()
    check_settings(root, dest_root, reference, ingest)
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
    rows, todo = survey(root, dest_root, parameters, recompute=recompute)
    logger.info("found %d scans under %s", len(rows) + len(todo), redact(root))
    if dry_run:
        rows += pending(todo)
    else:
        rows += _process(root, todo, parameters, device, max_concurrent, dask_address, recompute)
    result = summary(rows, dry_run=dry_run)
    create_table_artifact(
        key="reprocess-summary",
        table=result["scans"],
        description=counts_line(result["counts"]),
    )
    logger.info(counts_line(result["counts"]))
    if result["counts"]["failed"]:
        raise ScansFailed(result)
    return result


# python -m flows.reprocess_facility ARGS... is stemflow reprocess ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["reprocess", *sys.argv[1:]]))
