"""Prefect tasks: train the CC-ST-AE on a scan, and infer its strain maps.

Both run on a GPU where there is one, and take turns on a machine's GPUs (:func:`gpu_turn`).
They carry the tag ``gpu``, so a Prefect concurrency limit on that tag (``prefect
concurrency-limit create gpu 1``) also limits them across a server's runs. On a Dask task
runner, submit them inside :func:`gpu_resources` so that the scheduler places them on a worker
advertising the resource ``GPU=1`` (:func:`flows.runners.dask_runner` does when CUDA is
visible)::

    with gpu_resources():
        trained = train_ccstae.submit(scan, workdir, config=config)
    strain = infer_ccstae.submit(scan, dest, workdir, config=config, wait_for=[trained])

On CPU both use every core the worker process may run on (:func:`torch_cores`), not the one
thread per task a Dask worker starts with.

Training checkpoints into ``workdir`` after every epoch: a retried or rerun task resumes from the
last epoch, and inference with the same ``workdir`` only infers. A ``workdir`` in object storage
(``s3://...``) is mirrored into a local folder for the task and copied back when it ends, failed
or not.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dask
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemlib.ccstae import CCSTAEConfig, ccstae_strain, train_on_scan
from stemlib.ccstae.config import resolve_device
from stemlib.io import open_scan
from stemlib.io.storage import local_workdir, redact
from stemlib.resources import usable_cores
from stemlib.results import write_strain
from stemlib.types import Device, Symmetry

if TYPE_CHECKING:
    import torch

__all__ = [
    "train_ccstae",
    "infer_ccstae",
    "gpu_resources",
    "gpu_turn",
    "hold_one",
    "torch_cores",
]


@contextlib.contextmanager
def gpu_resources() -> Iterator[None]:
    """Submit tasks inside this block to ask Dask for a worker with ``GPU=1``, when CUDA is
    visible here (otherwise no worker would advertise it and the task would never start)."""
    import torch

    if torch.cuda.is_available():
        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield


@contextlib.contextmanager
def torch_cores(device: Device | torch.device) -> Iterator[None]:
    """On CPU, torch uses every core this process may run on inside the block.

    A Dask worker starts with ``OMP_NUM_THREADS=1``, one thread per task, so torch ran the
    CC-ST-AE, one long task on the flow's critical path, on one core. Measured side by side on
    a 2-core machine (the process-scan flow, 64 x 64 patterns of 128 px, 2 epochs): the step
    took 434 and 440 s on one core, 348 and 312 s on both, the whole flow 466/476 s against
    381/342 s. The py4DSTEM baseline's short block tasks share the cores with it meanwhile. On
    CUDA the thread count is left alone (several GPU workers may share one host's cores).
    """
    import torch

    if resolve_device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Seconds a task waits on one busy GPU before it looks at the others again.
GPU_POLL_S = 0.5


@contextlib.contextmanager
def gpu_turn(device: Device) -> Iterator[torch.device]:
    """The device to run on, held for the block.

    On CUDA inside a Dask worker, waits for a free GPU among those visible here, holds it
    (:func:`hold_one`, one Dask lock per GPU, named by its UUID) and yields it, ``cuda:N``, made
    the current device of this thread. Elsewhere yields ``device`` resolved, holding nothing.

    A local cluster gives every worker the resource GPU=1, so that GPU tasks go where a GPU is.
    Without turns, the noise sweep's levels or a reprocess's scans would train side by side on
    one GPU, each with the gpu preset's memory (over 11 GB of activations when run on a CPU).
    On a host with several GPUs each task gets its own: they all used GPU 0 when only their
    number was held. Naming the locks by UUID keeps workers that see the GPUs in different
    orders (``CUDA_VISIBLE_DEVICES``) apart."""
    import torch

    resolved = resolve_device(device)
    if resolved.type != "cuda":
        yield resolved
        return
    gpus = range(torch.cuda.device_count())
    names = [f"stemflow-gpu-{torch.cuda.get_device_properties(i).uuid}" for i in gpus]
    with hold_one(names) as index:
        if index is None:  # not in a Dask worker
            yield resolved
            return
        with torch.cuda.device(index):  # what a bare "cuda" means in this thread
            yield torch.device("cuda", index)


@contextlib.contextmanager
def hold_one(names: list[str]) -> Iterator[int | None]:
    """Hold one of the Dask locks ``names`` for the block, the first free one, waiting while all
    are held; yields its index in ``names``. A no-op outside a Dask worker (yields None).

    The scheduler frees a lock whose worker died (distributed's lease timeout)."""
    from distributed import Lock, get_worker

    try:
        get_worker()
    except ValueError:
        yield None
        return
    locks = [Lock(name) for name in names]
    for attempt in itertools.count():
        index = attempt % len(locks)
        # one look at each, then wait on each in turn a little
        if locks[index].acquire(timeout=GPU_POLL_S if attempt >= len(locks) else 0):
            break
    try:
        yield index
    finally:
        locks[index].release()


@task(name="train-ccstae", tags=["gpu"], cache_policy=NO_CACHE)
def train_ccstae(
    scan: str,
    workdir: str,
    *,
    reference: str = "auto",
    config: CCSTAEConfig | None = None,
    device: Device = "auto",
) -> dict[str, Any]:
    """Train the CC-ST-AE on the scan store ``scan``; the checkpoint goes to ``workdir``."""
    logger = get_run_logger()
    with gpu_turn(device) as held, local_workdir(workdir) as folder, torch_cores(held):
        summary = train_on_scan(
            open_scan(scan),
            workdir=folder,
            reference=reference,
            config=config,
            device=held,
            progress=logger.info,  # on the terminal and in the task's logs in the UI
        )
    loss = summary["final_loss"]  # None after no epoch (epochs: 0)
    logger.info(
        "trained on %s: %d epochs, final loss %s, checkpoint sha256 %s",
        redact(scan),
        summary["epochs"],
        "none" if loss is None else f"{loss:.5g}",
        summary["checkpoint_sha256"][:16],
    )
    return summary


@task(name="infer-ccstae", tags=["gpu"], cache_policy=NO_CACHE)
def infer_ccstae(
    scan: str,
    dest: str,
    workdir: str,
    *,
    reference: str = "auto",
    symmetry: Symmetry = "auto",
    config: CCSTAEConfig | None = None,
    device: Device = "auto",
    bases_png: str | None = None,
    run_key: str | None = None,
) -> dict[str, Any]:
    """Strain maps of ``scan`` by the model in ``workdir`` (trained first if it is not), written
    atomically to ``dest``; ``run_key`` is recorded in its ``run_keys`` (see
    :func:`tasks.py4dstem.py4dstem_strain_scan`)."""
    logger = get_run_logger()
    with gpu_turn(device) as held, local_workdir(workdir) as folder, torch_cores(held):
        ds = ccstae_strain(
            open_scan(scan),
            reference=reference,
            symmetry=symmetry,
            config=config,
            device=held,
            workdir=folder,
            bases_png=bases_png,
            progress=logger.info,  # each quarter of the scan inferred
        )
    if run_key:
        ds.attrs["run_keys"] = {"ccstae": run_key}
    url = write_strain(ds, dest)
    record = ds.attrs["methods"]["ccstae"]
    logger.info(
        "wrote %s: coverage %.3f, symmetry %d, inference %.1f s",
        redact(url),
        record["coverage"],
        record["symmetry"],
        record["timings_s"]["inference_s"],
    )
    return {
        "url": redact(url),
        "coverage": record["coverage"],
        "symmetry": record["symmetry"],
        "model_checkpoint_sha256": record["model_checkpoint_sha256"],
    }
