"""Task runners for stemflow's flows: a local Dask cluster by default, or an existing one."""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner

__all__ = ["dask_runner"]


def dask_runner(address: str | None = None, *, n_workers: int | None = None) -> DaskTaskRunner:
    """A :class:`~prefect_dask.DaskTaskRunner`.

    Parameters
    ----------
    address
        Scheduler address of an existing Dask cluster (``tcp://host:8786``: Kubernetes, SLURM);
        ``None`` starts a ``distributed.LocalCluster`` on this machine for the run.
    n_workers
        Worker processes of the local cluster (default: one per core, one thread each). Every
        worker advertises the resource ``GPU=1`` when CUDA is visible, so GPU tasks are placed
        where a GPU is.
    """
    if address:
        return DaskTaskRunner(address=address)
    workers = n_workers or max(1, os.cpu_count() or 1)
    kwargs: dict[str, object] = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        # The scheduler and dashboard listen on loopback only.
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    if _cuda_visible():
        kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return False
