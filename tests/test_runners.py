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
