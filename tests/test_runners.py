"""The flows' local Dask cluster: one single-threaded worker per core this process may use."""

from __future__ import annotations

import os

import pytest

from flows.runners import local_cluster_kwargs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_local_cluster_has_one_worker_per_core_the_process_may_use():
    """A batch job or a container that gives the process some of a node's cores gets that many
    workers, not one per core of the node."""
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert local_cluster_kwargs()["n_workers"] == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert local_cluster_kwargs()["n_workers"] == len(cores)
    assert local_cluster_kwargs(3)["n_workers"] == 3
    assert local_cluster_kwargs()["threads_per_worker"] == 1


def test_a_task_that_kills_its_workers_is_one_sentence():
    """A task whose worker dies (as the Nanny restarts one past its memory limit) ends the run
    with a ResourceError naming the task and the fix, not distributed's KilledWorker."""
    import dask
    from distributed import Client

    from flows.runners import local_cluster, workers_that_died_explained
    from stemlib.errors import ResourceError

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
            future = client.submit(os._exit, 1, key="train_ccstae-0123abcd")
            with pytest.raises(ResourceError) as caught, workers_that_died_explained():
                future.result()
    message = str(caught.value)
    assert message.startswith("task train_ccstae stopped: every Dask worker that ran it died")
    assert message.endswith("or use a machine with more memory.")


def test_a_worker_may_use_more_than_its_share_of_the_memory():
    """One large task (the CC-ST-AE) may need more memory than distributed's default share (the
    machine's memory times threads per worker over cores), past which the Nanny would restart
    its worker: each worker's limit is the machine's. (Holding more than a share in a task
    cannot tell this apart on a 2-core CI machine without holding half its memory.)"""
    from distributed import Client
    from distributed.system import MEMORY_LIMIT

    from flows.runners import local_cluster

    workers = 2
    with local_cluster(n_workers=workers) as cluster, Client(cluster) as client:
        limits = client.run(_memory_limit, nanny=True)
    assert sorted(limits.values()) == [MEMORY_LIMIT] * workers


def _memory_limit(dask_worker) -> int:
    """The memory limit, in bytes, past which this Nanny restarts its worker."""
    return dask_worker.memory_manager.memory_limit
