"""Preload of the local cluster's Dask workers (``preload=["flows.dask_preload"]``): they
ignore SIGINT, log a task run that a user's mistake ended without its traceback, and do not
report each task they cancel, nor the scheduler they lose, as they close.

A terminal's Ctrl-C reaches every process of the command; the command records the interrupted
run and closes the cluster, whose Nannies end the workers. Without this, each worker would also
print its own ``KeyboardInterrupt`` traceback. A module of its own, so that a worker imports
nothing more at its start (:mod:`flows.runners` would import Prefect: seconds per worker).

A worker's task-run logs reach the command's terminal too: a task that a user's mistake stopped
(NaN patterns found while ingesting) would print Prefect's traceback there, before the
command's one sentence. :func:`flows.log_filters.no_tracebacks_for_mistakes` keeps it out, as
in the command's own process.
"""

from __future__ import annotations

import signal
from typing import Any

from flows.log_filters import no_tracebacks_for_mistakes, quiet_worker_close

__all__ = ["dask_setup"]


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process's main thread as it starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    no_tracebacks_for_mistakes()
    quiet_worker_close()
