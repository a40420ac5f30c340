"""Task runners and local clusters for stemflow's flows: a local Dask cluster by default, or an
existing one."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import dask
from prefect_dask import DaskTaskRunner

from stemlib.errors import InputError, ResourceError
from stemlib.resources import usable_cores

__all__ = [
    "check_scheduler",
    "dask_runner",
    "local_cluster",
    "local_cluster_kwargs",
    "scheduler_client",
    "workers_here",
    "workers_that_died_explained",
]

# distributed starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
# threshold at 128 KiB: every pattern-sized temporary (py4DSTEM's per-pattern FFTs, torch's
# batches) is then mapped and page-faulted afresh. Measured on the py4DSTEM step, 64 x 64
# patterns of 128 px on one worker: 29.5 patterns/s with it, 58.4 without. Our workers keep
# glibc's adaptive thresholds; a user's own Dask configuration still decides.
dask.config.update_defaults(
    {"distributed": {"nanny": {"pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": None}}}}
)
# distributed starts daemonic worker processes, and a daemonic process may not start children,
# such as the CC-ST-AE's DataLoader workers (4 in the gpu preset: "daemonic processes are not
# allowed to have children"). Our workers are not daemonic; the Nanny still ends them with the
# cluster.
dask.config.update_defaults({"distributed": {"worker": {"daemon": False}}})


def local_cluster_kwargs(n_workers: int | None = None) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments: ``n_workers`` single-threaded worker processes
    (default one per core this process may use, :func:`stemlib.resources.usable_cores`),
    scheduler and dashboard on loopback only, and the resource ``GPU=1`` on every worker when
    CUDA is visible, so that GPU tasks are placed where a GPU is. Workers ignore a terminal's
    Ctrl-C (:mod:`flows.dask_preload`): the command handles it and ends them.

    Each worker's memory limit is the machine's, not distributed's default share of it (the
    machine's memory times the worker's threads over the cores). The CC-ST-AE is one large
    task among many small ones: it peaked at 2.1 GB on the demo scan with the cpu preset, above
    a share on, say, 16 cores and 32 GB, where the Nanny would restart its worker again and
    again. Every step streams its data, so the workers
    together stay within the machine."""
    from distributed.system import MEMORY_LIMIT

    kwargs: dict[str, Any] = {
        "n_workers": n_workers or usable_cores(),
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "memory_limit": MEMORY_LIMIT,
        "preload": ["flows.dask_preload"],  # workers leave Ctrl-C to the command
    }
    if _cuda_visible():
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def local_cluster(n_workers: int | None = None) -> Any:
    """A started ``distributed.LocalCluster`` with :func:`local_cluster_kwargs` (use it in a
    ``with`` block)."""
    from distributed import LocalCluster

    return LocalCluster(**local_cluster_kwargs(n_workers))


#: Seconds to wait for a Dask scheduler before calling it unreachable.
SCHEDULER_TIMEOUT_S = 10


def dask_runner(address: str | None = None, *, n_workers: int | None = None) -> DaskTaskRunner:
    """A :class:`~prefect_dask.DaskTaskRunner`.

    Parameters
    ----------
    address
        Scheduler address of an existing Dask cluster (``tcp://host:8786``: Kubernetes, SLURM);
        ``None`` starts a :func:`local_cluster` on this machine for the run.
    n_workers
        Worker processes of the local cluster (default: one per core, one thread each).
    """
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(n_workers)
    )


@contextlib.contextmanager
def scheduler_client(address: str, *, option: str) -> Iterator[Any]:
    """A ``distributed.Client`` of the Dask scheduler at ``address``, closed when the block ends
    (``option``: where the address came from, for the message).

    Raises
    ------
    InputError
        If no scheduler answers there within :data:`SCHEDULER_TIMEOUT_S`, or ``address`` is not
        an address.
    """
    from distributed import Client

    try:
        client = Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s")
    except (OSError, ValueError) as exc:
        raise InputError(
            f"no Dask scheduler answers at {address} ({option}: {exc}); start it, correct the "
            "address (tcp://host:8786) or leave it out to run on this machine."
        ) from None
    with client:
        yield client


def check_scheduler(address: str, *, option: str) -> None:
    """Refuse, before any work, a Dask scheduler at ``address`` that cannot be reached
    (:func:`scheduler_client`)."""
    with scheduler_client(address, option=option):
        pass


def workers_here(address: str | None) -> bool:
    """Whether every Dask worker of a run is on this machine: on a local cluster (``address``
    None), or on the cluster of a scheduler that listens on a loopback address, which no worker
    of another machine can reach.

    >>> workers_here(None), workers_here("tcp://127.0.0.1:8786"), workers_here("localhost:8786")
    (True, True, True)
    >>> workers_here("tcp://scheduler:8786"), workers_here("tcp://10.0.0.5:8786")
    (False, False)
    """
    if address is None:
        return True
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return False


@contextlib.contextmanager
def workers_that_died_explained() -> Iterator[None]:
    """A task that killed every Dask worker that ran it is one sentence (:class:`ResourceError`)
    instead of distributed's ``KilledWorker`` traceback. The usual cause is memory: a worker's
    Nanny restarts it past 95 % of its limit (on a local cluster, the machine's memory)."""
    from distributed.scheduler import KilledWorker

    try:
        yield
    except KilledWorker as exc:
        task = str(exc.task).rsplit("-", 1)[0]
        raise ResourceError(
            f"task {task} stopped: every Dask worker that ran it died, most often from running "
            "out of memory; give CC-ST-AE a smaller preset or batch_size, or use a machine "
            "with more memory."
        ) from None
