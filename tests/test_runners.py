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
    """One large task (the CC-ST-AE) runs where it needs more memory than the machine's memory
    divided by the number of workers: distributed's default share would have its worker
    restarted by the Nanny."""
    from distributed import Client
    from distributed.system import MEMORY_LIMIT

    from flows.runners import local_cluster

    workers = 8
    share = MEMORY_LIMIT / workers
    with local_cluster(n_workers=workers) as cluster, Client(cluster) as client:
        held = client.submit(_hold, int(1.3 * share)).result()
    assert held == int(1.3 * share) // 8 * 8


def _hold(nbytes: int) -> int:
    """Touch ``nbytes`` of memory for a moment (the Nanny checks every 100 ms)."""
    import time

    import numpy as np

    block = np.ones(nbytes // 8)
    time.sleep(1.0)
    return block.nbytes
