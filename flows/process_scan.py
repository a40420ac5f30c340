"""# Process one scan: raw scan -> strain maps of both methods, side by side

1. **Ingest** the raw scan into a Zarr scan store (skipped when the store already holds this
   scan, or when the source is a scan store).
2. **CC-ST-AE** (train, then infer; on a GPU worker when there is one) and the **py4DSTEM**
   baseline (disk detection per scan block on the Dask workers) run in parallel.
3. **Compare and publish**: difference maps, agreement statistics and, when the scan carries
   ground truth, each method's error against it; ONE strain dataset holding both methods is
   written atomically to the destination, with PNG maps beside it.

Every step's output records a fingerprint of its inputs (the scan's content hash and the
step's parameters); a rerun finds finished steps and skips them, and a rerun of a request whose
dataset and maps are published reads their summary back and computes nothing. Intermediate
results and the CC-ST-AE checkpoints live in a work folder beside the destination, so an
interrupted run resumes (training from its last epoch).

    stemflow run /data/scan_042.mib results/scan_042/strain.zarr
"""

from __future__ import annotations

import os
import posixpath
import sys
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from stemlib.baseline_py4dstem import Py4DSTEMConfig
from stemlib.ccstae import CCSTAEConfig
from stemlib.ccstae.train import model_folder
from stemlib.compare import statistics_caption
from stemlib.ingest import IngestOptions, refuse_transforms
from stemlib.io.scan_store import check_destination
from stemlib.io.storage import locate, redact, refuse_unwritable
from stemlib.rerun import finished_step, run_key, scan_identity
from stemlib.types import Device, Method, Symmetry
from tasks._retry import STORAGE_RETRY
from tasks.ccstae import gpu_resources, infer_ccstae, train_ccstae
from tasks.ingest import ingest_scan
from tasks.publish import publish_strain, published_request, published_result, request_key
from tasks.py4dstem import py4dstem_strain_scan

from .artifacts import artifact_key, file_name
from .runners import dask_runner

__all__ = ["process_scan", "default_locations", "resolved_parameters"]

ALL_METHODS: list[Method] = ["ccstae", "py4dstem"]


def default_locations(source: str, dest: str) -> dict[str, str]:
    """Where a run keeps the scan store and its work folder when not told: beside ``dest``.

    Examples
    --------
    >>> default_locations("/raw/scan_042.mib", "/results/s42/strain.zarr")
    {'scan_store': '/results/s42/scan_042.zarr', 'workdir': '/results/s42/.strain.zarr.work'}
    """
    folder = posixpath.dirname(dest.rstrip("/"))
    name = posixpath.basename(dest.rstrip("/"))
    stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0]
    join = (lambda *p: posixpath.join(*p)) if folder else (lambda *p: posixpath.join(*p[1:]))
    return {"scan_store": join(folder, f"{stem}.zarr"), "workdir": join(folder, f".{name}.work")}


def resolved_parameters(
    *,
    methods: list[Method] | None = None,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    device: Device = "auto",
    ccstae_preset: Literal["auto", "cpu", "gpu"] = "auto",
    ccstae: CCSTAEConfig | None = None,
    py4dstem: Py4DSTEMConfig | None = None,
    ingest: IngestOptions | None = None,
) -> dict[str, Any]:
    """The parameters a run really uses (defaults filled in, the CC-ST-AE preset resolved for
    the device): what its request key is computed from."""
    if ccstae is None:
        ccstae = (
            CCSTAEConfig.for_device(device)
            if ccstae_preset == "auto"
            else CCSTAEConfig.preset(ccstae_preset)
        )
    return {
        "methods": list(dict.fromkeys(methods or ALL_METHODS)),
        "reference": reference,
        "symmetry": symmetry,
        "ccstae": ccstae,
        "py4dstem": py4dstem or Py4DSTEMConfig(),
        "ingest": ingest or IngestOptions(),
    }


def _run_name() -> str:
    source = str(flow_run.parameters.get("source", "scan"))
    return f"process-{file_name(source)}"


@task(
    name="resolve-scan",
    # It runs the ingest step's function (not its task), so it carries that task's retries.
    **STORAGE_RETRY,
    cache_policy=NO_CACHE,
)
def resolve_scan(source: str, scan_store: str, options: IngestOptions) -> dict[str, Any]:
    """The scan store to process: ``source`` itself if it is one, else ``scan_store`` after
    ingesting (skipped when it already holds this source)."""
    identity = scan_identity(source)
    if identity is not None:
        refuse_transforms(source, options)
        return {"url": source, **identity, "status": "given"}
    record = ingest_scan.fn(source, scan_store, options)
    return {"url": scan_store, **scan_identity(scan_store), "status": record["status"]}


@flow(name="process-scan", flow_run_name=_run_name, task_runner=dask_runner(), log_prints=True)
def process_scan(
    source: str,
    dest: str,
    methods: list[Method] | None = None,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    device: Device = "auto",
    ccstae_preset: Literal["auto", "cpu", "gpu"] = "auto",
    ccstae: CCSTAEConfig | None = None,
    py4dstem: Py4DSTEMConfig | None = None,
    ingest: IngestOptions | None = None,
    scan_store: str | None = None,
    workdir: str | None = None,
    recompute: bool = False,
) -> dict[str, Any]:
    """Strain, shear and rotation maps of one scan by CC-ST-AE and py4DSTEM, published together.

    Args:
        source: Raw scan (any supported format) or scan store: a path or URL (s3://bucket/key).
        dest: Strain dataset to publish: a path or URL ending in .zarr.
        methods: Methods to run; both by default.
        reference: Reference region: "auto", "RX0:RX1,RY0:RY1", or the path of a mask .npy.
        symmetry: Lattice symmetry for the rotation branch: "auto", 2, 4 or 6.
        device: Where the CC-ST-AE trains: "auto" (CUDA when present), "cpu" or "cuda".
        ccstae_preset: CC-ST-AE recipe: "auto" (gpu on CUDA, else cpu), "cpu" or "gpu".
        ccstae: A full CC-ST-AE configuration, replacing the preset.
        py4dstem: py4DSTEM baseline settings (all derived from the data by default).
        ingest: How to read the raw scan (format, HDF5 dataset, scan shape, calibration).
        scan_store: Where to keep the ingested scan; beside dest by default.
        workdir: Folder for intermediate results and checkpoints; beside dest by default.
        recompute: Compute both methods again, even where an earlier run finished them with
            the same settings (after an upgrade of stemflow, say); CC-ST-AE trains anew. The
            ingested scan is kept.
    """
    logger = get_run_logger()
    params = resolved_parameters(
        methods=methods,
        reference=reference,
        symmetry=symmetry,
        device=device,
        ccstae_preset=ccstae_preset,
        ccstae=ccstae,
        py4dstem=py4dstem,
        ingest=ingest,
    )
    methods = params["methods"]
    request = request_key(source, **params)
    # Reading the destination first fails fast (one sentence) when its store cannot be reached,
    # before any hour of training.
    earlier = None if recompute else published_result(dest, request)
    if earlier is not None:
        logger.info(
            "%s already holds this request's result, published by an earlier run; nothing to "
            "compute (recompute computes it again)",
            redact(dest),
        )
        published, steps = earlier, dict.fromkeys(["ingest", *methods], "skipped")
    else:
        if recompute and published_request(dest) == request:
            logger.info("%s already holds this request's result; computing it again", redact(dest))
        # one that the publication would refuse, or could not write: before the work
        check_destination(dest, "strain")
        refuse_unwritable(locate(dest))
        published, steps = _computed(
            source,
            dest,
            params,
            request=request,
            device=device,
            scan_store=scan_store,
            workdir=workdir,
            recompute=recompute,
        )
    if "ccstae" in methods:  # drawn by the CC-ST-AE inference, in this run or an earlier one
        published["pngs"]["ccstae-bases"] = _bases_png(published["url"])
    warnings = [f"- **warning** ({m}): {w}" for m, ws in published["warnings"].items() for w in ws]
    name = _scan_name(source)
    create_markdown_artifact(
        key=artifact_key("strain", name),
        markdown="\n\n".join(
            [
                f"## {name}",
                published["table"],
                *(["\n".join(warnings)] if warnings else []),
                f"Open with `xr.open_zarr({published['url']!r})`",
            ]
        ),
        description=statistics_caption(published["statistics"]),
    )
    # The maps and the dataset are this run's (its Artifacts tab), not keyed histories.
    for map_name, png in published["pngs"].items():
        create_link_artifact(link=png, link_text=os.path.basename(png), description=map_name)
    create_link_artifact(link=published["url"], link_text="strain dataset")
    return {**published, "steps": steps}


def _computed(
    source: str,
    dest: str,
    params: dict[str, Any],
    *,
    request: str,
    device: Device,
    scan_store: str | None,
    workdir: str | None,
    recompute: bool,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Ingest, both methods in parallel and the publication of :func:`process_scan` (``params``
    from :func:`resolved_parameters`), each step skipped where an earlier run finished it
    (unless ``recompute``): :func:`~tasks.publish.publish_strain`'s summary, and each step's
    status ("written", "done", "skipped", ...)."""
    logger = get_run_logger()
    methods, ccstae, py4dstem = params["methods"], params["ccstae"], params["py4dstem"]
    reference, symmetry, ingest = params["reference"], params["symmetry"], params["ingest"]
    where = default_locations(source, dest)
    scan_store = scan_store or where["scan_store"]
    work = locate(workdir or where["workdir"])

    scan = resolve_scan.submit(source, scan_store, ingest).result()
    logger.info(
        "scan %s (%s), content sha256 %s",
        redact(scan["url"]),
        scan["status"],
        scan["content_sha256"][:16],
    )

    keys = {
        "py4dstem": run_key(
            scan, "py4dstem", reference=reference, symmetry=symmetry, config=py4dstem
        ),
        "ccstae": run_key(scan, "ccstae", reference=reference, symmetry=symmetry, config=ccstae),
    }
    outputs = {m: work.child(f"{m}.zarr").url for m in methods}
    futures: dict[str, Any] = {}
    upstream: dict[str, Any] = {}  # a method's earlier step, whose failure is the one to tell

    def finished(method: str) -> bool:
        return not recompute and finished_step(outputs[method], keys[method])

    if "py4dstem" in methods and not finished("py4dstem"):
        futures["py4dstem"] = py4dstem_strain_scan.submit(
            scan["url"],
            outputs["py4dstem"],
            reference=reference,
            symmetry=symmetry,
            config=py4dstem,
            run_key=keys["py4dstem"],
        )
    if "ccstae" in methods and not finished("ccstae"):
        model_dir = model_folder(
            work, scan["content_sha256"], reference=reference, config=ccstae, anew=recompute
        )
        with gpu_resources():
            trained = upstream["ccstae"] = train_ccstae.submit(
                scan["url"], model_dir, reference=reference, config=ccstae, device=device
            )
            futures["ccstae"] = infer_ccstae.submit(
                scan["url"],
                outputs["ccstae"],
                model_dir,
                reference=reference,
                symmetry=symmetry,
                config=ccstae,
                device=device,
                bases_png=_bases_png(dest),
                run_key=keys["ccstae"],
                wait_for=[trained],
            )
    steps = {"ingest": scan["status"]}
    for method in methods:
        if method in futures:
            if method in upstream:  # not inference's "upstream task run did not complete"
                upstream[method].result()
            futures[method].result()
            steps[method] = "done"
        else:
            steps[method] = "skipped"
            logger.info(
                "%s: finished in an earlier run (%s), skipped", method, redact(outputs[method])
            )

    published = publish_strain.submit(
        scan["url"],
        {m: outputs[m] for m in methods},
        dest,
        run_keys={m: keys[m] for m in methods},
        request=request,
    ).result()
    return published, steps


def _scan_name(source: str) -> str:
    """What this run calls its scan: NAME of its run name ``process-NAME`` (in a facility run,
    the scan's path below the root), else the source's file name."""
    run_name = flow_run.name or ""
    if run_name.startswith("process-"):
        return run_name.removeprefix("process-")
    return file_name(source)


def _bases_png(dest: str) -> str:
    from stemlib.plots import png_url

    return png_url(dest, "ccstae-bases")


# python -m flows.process_scan ARGS... is stemflow run ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
