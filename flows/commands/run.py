"""``stemflow run SOURCE DEST``: the whole pipeline as the process-scan Prefect flow."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from stemlib.ingest import keyed_source, refuse_transforms
from stemlib.io import open_scan
from stemlib.io.readers import needs_local_copy
from stemlib.io.scan_store import check_destination
from stemlib.io.storage import locate
from stemlib.reference import parse_reference

from ._args import SYMMETRIES, add_recompute_argument, symmetry
from .ingest import add_source_arguments, options_from_args
from .strain import read_config

__all__ = [
    "register",
    "run_pipeline",
    "add_method_arguments",
    "method_options",
    "add_pipeline_arguments",
    "add_strain_arguments",
    "add_dask_argument",
    "pipeline_options",
    "flow_run",
]


def add_method_arguments(group: argparse._ArgumentGroup, *, preset: str = "auto") -> None:
    """Which methods run and with which settings (shared by ``run``, ``demo``, ``sweep`` and
    ``reprocess``): ``--method``, ``--preset`` (default ``preset``), ``--ccstae-config`` and
    ``--py4dstem-config``."""
    group.add_argument(
        "--method",
        action="append",
        choices=["ccstae", "py4dstem"],
        dest="methods",
        help="a method to run (repeat for both; default: both)",
    )
    group.add_argument(
        "--preset",
        default=preset,
        choices=["auto", "cpu", "gpu"],
        help="CC-ST-AE recipe; auto: gpu on CUDA, else cpu (default: %(default)s)",
    )
    group.add_argument(
        "--ccstae-config",
        metavar="FILE",
        help="YAML or JSON file of CC-ST-AE settings that change --preset's recipe (a "
        "'preset:' line in the file picks the recipe)",
    )
    group.add_argument(
        "--py4dstem-config", metavar="FILE", help="YAML or JSON py4DSTEM baseline settings"
    )


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flows' ``methods``, ``ccstae_preset``, ``ccstae`` and ``py4dstem`` parameters from
    :func:`add_method_arguments`' options (configuration files read and checked)."""
    return {
        "methods": args.methods,
        "ccstae_preset": args.preset,
        "ccstae": read_config(args.ccstae_config, "ccstae", preset=args.preset, device=args.device),
        "py4dstem": read_config(args.py4dstem_config, "py4dstem"),
    }


def add_strain_arguments(group: argparse._ArgumentGroup) -> None:
    """``--reference``, ``--symmetry`` and ``--device`` of every scan of a run."""
    group.add_argument(
        "--reference",
        default="auto",
        metavar="auto|RX0:RX1,RY0:RY1|mask.npy",
        help="reference region (default: auto)",
    )
    group.add_argument(
        "--symmetry",
        default="auto",
        type=symmetry,
        choices=SYMMETRIES,
        help="lattice symmetry (default: auto)",
    )
    group.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where CC-ST-AE trains (default: auto)",
    )


def add_dask_argument(group: argparse._ArgumentGroup) -> None:
    """``--dask-address``: an existing Dask cluster instead of a local one."""
    group.add_argument(
        "--dask-address",
        metavar="tcp://HOST:8786",
        help="an existing Dask cluster (default: a local one)",
    )


def add_pipeline_arguments(parser: argparse.ArgumentParser, *, preset: str = "auto") -> None:
    """The options of a strain run (shared by ``run`` and ``demo``; ``preset``: the default
    CC-ST-AE recipe)."""
    strain = parser.add_argument_group("strain")
    add_method_arguments(strain, preset=preset)
    add_strain_arguments(strain)
    add_recompute_argument(strain)
    where = parser.add_argument_group("where")
    where.add_argument(
        "--scan-store", help="where to keep the ingested scan (default: beside DEST)"
    )
    where.add_argument(
        "--workdir", help="intermediate results and checkpoints (default: beside DEST)"
    )
    add_dask_argument(where)


def pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """process_scan's parameters from the parsed arguments."""
    return {
        **method_options(args),
        "reference": args.reference,
        "symmetry": args.symmetry,
        "device": args.device,
        "scan_store": args.scan_store,
        "workdir": args.workdir,
        "recompute": args.recompute,
    }


@contextlib.contextmanager
def flow_run(dask_address: str | None) -> Iterator[None]:
    """Where a command runs its flow (``run``, ``demo``, ``sweep``, ``reprocess``): against one
    temporary Prefect API server (:func:`flows.api_server.temporary_api`), shared by the Dask
    workers when they are on this machine (a local cluster, or ``dask_address`` on loopback),
    with distributed's logging at warnings, and a task that killed its workers told as one
    sentence."""
    from flows.api_server import temporary_api
    from flows.runners import workers_here, workers_that_died_explained

    logging.getLogger("distributed").setLevel(logging.WARNING)
    with temporary_api(tasks_here=workers_here(dask_address)), workers_that_died_explained():
        yield


def run_pipeline(
    source: str, dest: str, *, dask_address: str | None = None, **options: Any
) -> dict[str, Any]:
    """Run process_scan on a Dask task runner (local cluster, or ``dask_address``) in
    :func:`flow_run`."""
    from flows.process_scan import process_scan
    from flows.runners import dask_runner

    with flow_run(dask_address):
        return process_scan.with_options(task_runner=dask_runner(dask_address))(
            source=source, dest=dest, **options
        )


def _check(source: str, dest: str, options: dict[str, Any]) -> None:
    """Refuse a mistake before any work starts (one sentence, nothing written).

    A vendor file on object storage is left to the ingest step, the one that copies it to a
    local folder: checking it here would copy a scan of tens of GB twice.
    """
    ingest = options["ingest"]
    if _is_store(source):
        refuse_transforms(source, ingest)
        shape = open_scan(source).shape
    elif needs_local_copy(source, format=ingest.format):
        shape = None
    else:  # as it will be stored: cropped and binned
        with keyed_source(locate(source), ingest).open(bad_pixels=False) as scan:
            shape = scan.data.shape
    if shape is not None:
        parse_reference(options["reference"], (int(shape[0]), int(shape[1])))
    check_destination(dest, "strain")


def _is_store(url: str) -> bool:
    from stemlib.io.scan_store import read_store_attrs

    location = locate(url)
    return location.exists() and read_store_attrs(location) is not None


def _run(args: argparse.Namespace) -> int:
    options = {**pipeline_options(args), "ingest": options_from_args(args)}
    _check(args.source, args.dest, options)
    if args.dask_address:
        from flows.runners import check_scheduler

        check_scheduler(args.dask_address, option="--dask-address")
    published = run_pipeline(args.source, args.dest, dask_address=args.dask_address, **options)
    print(f"\n{published['table']}\n")
    print(
        f"strain dataset: {published['url']}\n  open it with:  xr.open_zarr({published['url']!r})"
    )
    for name, png in published["pngs"].items():
        print(f"  {name}: {png}")
    for method, warnings in published["warnings"].items():
        for warning in warnings:
            print(f"stemflow run: warning: {method}: {warning}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "run",
        help="the whole pipeline: ingest, CC-ST-AE and py4DSTEM in parallel, compare, publish",
        description="Run the process-scan Prefect flow on one scan: ingest it (skipped when done), "
        "map strain with CC-ST-AE and the py4DSTEM baseline in parallel on a Dask cluster, "
        "compare them (and with the truth a simulated scan carries), and publish one strain "
        "dataset with PNG maps beside it. A rerun skips finished steps.",
    )
    parser.add_argument("source", metavar="SOURCE", help="raw scan or scan store: path or URL")
    parser.add_argument("dest", metavar="DEST", help="strain dataset to publish: path or URL")
    add_source_arguments(parser)
    add_pipeline_arguments(parser)
    parser.set_defaults(run=_run)
