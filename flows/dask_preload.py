"""Preload of the local cluster's Dask workers (``preload=["flows.dask_preload"]``): they
ignore SIGINT.

A terminal's Ctrl-C reaches every process of the command; the command records the interrupted
run and closes the cluster, whose Nannies end the workers. Without this, each worker would also
print its own ``KeyboardInterrupt`` traceback. A module of its own, so that a worker imports
nothing more at its start (:mod:`flows.runners` would import Prefect: seconds per worker).
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["dask_setup"]


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process's main thread as it starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
