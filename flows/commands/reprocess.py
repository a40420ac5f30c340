"""``stemflow reprocess ROOT DEST_ROOT``: the facility-reprocess flow once, from the command line
(what the nightly deployment runs), to try it on a folder before scheduling it, or to catch up
by hand."""

from __future__ import annotations

import argparse
from typing import Any

from ._args import add_recompute_argument, positive_int
from .ingest import add_source_arguments, options_from_args
from .run import (
    add_dask_argument,
    add_method_arguments,
    add_strain_arguments,
    flow_run,
    method_options,
)

__all__ = ["register", "summary_lines"]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The report of a reprocessing (or of its dry run): one line per scan (its status, the
    scan, and its result or the reason it failed or was skipped), then the counts.

    >>> rows = [
    ...     {"scan": "r/b.mib", "status": "failed", "result": "", "reason": "truncated"},
    ...     {"scan": "r/a.mib", "status": "processed", "result": "o/a/strain.zarr", "reason": ""},
    ... ]
    >>> counts = {"processed": 1, "skipped": 0, "failed": 1}
    >>> print("\\n".join(summary_lines({"counts": counts, "scans": rows})))
    processed  r/a.mib -> o/a/strain.zarr
    failed     r/b.mib: truncated
    1 processed, 0 skipped, 1 failed
    """
    from flows.reprocess_facility import counts_line

    lines = []
    for row in sorted(summary["scans"], key=lambda r: r["scan"]):
        done = row["status"] in ("processed", "to process")
        outcome = f" -> {row['result']}" if done else f": {row['reason']}"
        lines.append(f"{row['status']:<10} {row['scan']}{outcome}")
    lines.append(counts_line(summary["counts"]))
    return lines


def _dry_run(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """What the flow's dry run reports, without Prefect or Dask: which scans a run would
    process, skip, or fail to read."""
    from flows.process_scan import resolved_parameters
    from flows.reprocess_facility import pending, summary, survey

    parameters = resolved_parameters(
        reference=args.reference, symmetry=args.symmetry, device=args.device, **options
    )
    rows, todo = survey(args.root, args.dest_root, parameters, recompute=args.recompute)
    return summary(rows + pending(todo), dry_run=True)


def _run(args: argparse.Namespace) -> int:
    from flows.reprocess_facility import ScansFailed, check_settings, reprocess_facility
    from flows.runners import check_scheduler

    options = {**method_options(args), "ingest": options_from_args(args)}
    check_settings(args.root, args.dest_root, args.reference, options["ingest"])
    if args.dry_run:
        summary = _dry_run(args, options)
        print("\n".join(summary_lines(summary)))
        return 1 if summary["counts"]["failed"] else 0
    if args.dask_address:
        check_scheduler(args.dask_address, option="--dask-address")
    with flow_run(args.dask_address):
        try:
            summary = reprocess_facility(
                root=args.root,
                dest_root=args.dest_root,
                max_concurrent=args.max_concurrent,
                reference=args.reference,
                symmetry=args.symmetry,
                device=args.device,
                dask_address=args.dask_address,
                recompute=args.recompute,
                **options,
            )
        except ScansFailed as failed:  # the run ended Failed; the lines say which and why
            summary = failed.summary
    print("\n".join(summary_lines(summary)))
    return 1 if summary["counts"]["failed"] else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "reprocess",
        help="every scan under a folder or prefix not processed yet (the nightly facility run)",
        description="Run the reprocess-facility Prefect flow once, as the nightly "
        "facility-reprocess deployment does: find the raw scans under ROOT, skip those whose "
        "result under DEST_ROOT was published with the same source and settings, run the "
        "whole pipeline on the others (at most --max-concurrent at a time), and print a line "
        "per scan. Scan NAME goes to DEST_ROOT/NAME/strain.zarr. Exit status 1 when any scan "
        "failed (the others are still processed), 0 otherwise. The reading, calibration and "
        "method settings apply to every scan.",
    )
    parser.add_argument("root", metavar="ROOT", help="folder or prefix of raw scans: path or URL")
    parser.add_argument(
        "dest_root", metavar="DEST_ROOT", help="folder or prefix of results: path or URL"
    )
    add_source_arguments(parser)
    strain = parser.add_argument_group("strain")
    add_method_arguments(strain)
    add_strain_arguments(strain)
    add_recompute_argument(strain)
    where = parser.add_argument_group("where")
    where.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=2,
        metavar="N",
        help="scans processed at the same time (default: %(default)s)",
    )
    add_dask_argument(where)
    where.add_argument(
        "--dry-run",
        action="store_true",
        help="only list the scans a run would process or skip; run nothing (no patterns are "
        "read: a file its reader refuses is listed to process, and fails in the run)",
    )
    parser.set_defaults(run=_run)
