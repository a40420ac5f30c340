"""Logging filters for the command's terminal: one keeps Prefect's traceback off a run that a
user's mistake ended, in the command's process and in the local cluster's Dask workers
(:mod:`flows.dask_preload`), whose task-run logs reach the same terminal; three keep a local
cluster's closing off it: a worker's report of the tasks it cancelled, a worker's traceback of
the scheduler it lost, and its Nanny's report of a worker it killed. It imports nothing but
:mod:`logging`: a worker imports it as it starts."""

from __future__ import annotations

import logging
import sys

__all__ = [
    "SentenceOnly",
    "no_tracebacks_for_mistakes",
    "quiet_cluster_close",
    "quiet_worker_close",
]


def _is_mistake(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a :class:`stemlib.errors.StemflowError` (a module that raised one has
    imported :mod:`stemlib.errors`; none is imported here)."""
    errors = sys.modules.get("stemlib.errors")
    return errors is not None and isinstance(exc, errors.StemflowError)


class SentenceOnly(logging.Filter):
    """A flow or task run that a user's mistake (:class:`stemlib.errors.StemflowError`) ended is
    logged with its sentence and without Prefect's traceback, which would come before the
    command's own one-sentence error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_mistake(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


_SENTENCE_ONLY = SentenceOnly()


def no_tracebacks_for_mistakes() -> None:
    """Filter Prefect's run loggers with :class:`SentenceOnly` (Prefect's logging setup, at its
    import, keeps a logger's filters)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if _SENTENCE_ONLY not in logger.filters:
            logger.addFilter(_SENTENCE_ONLY)


class _NotCancelledOnClose(logging.Filter):
    """Drops distributed's "Async instruction for <Task ...> ended with CancelledError": a
    worker that closes (Ctrl-C, the end of a run) cancels what it was running, and its state
    machine says so for each task, in a line of its own format and with asyncio's task repr."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Async instruction") and "CancelledError" in message)


def _filter_once(name: str, kind: type[logging.Filter]) -> None:
    """Add a ``kind`` filter to the logger ``name`` unless it has one."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


class _NotLostOnClose(logging.Filter):
    """Drops distributed's "Failed to communicate with scheduler during heartbeat." and its
    traceback of 40 lines. A local cluster's scheduler runs in the command's process and stops
    listening as the command closes the cluster (Ctrl-C, the end of a run): a worker whose
    heartbeat falls between the two logs it, then closes with the cluster. The traceback came
    before the command's own last sentence, and read as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to communicate with scheduler")


def quiet_worker_close() -> None:
    """Filter a Dask worker's state-machine logger with :class:`_NotCancelledOnClose`, and its
    worker logger with :class:`_NotLostOnClose`."""
    _filter_once("distributed.worker.state_machine", _NotCancelledOnClose)
    _filter_once("distributed.worker", _NotLostOnClose)


class _NotKilledOnClose(logging.Filter):
    """Drops distributed's "Worker process still alive after 4.0 seconds, killing": a Nanny
    gives its closing worker 4 s to exit, then kills it. A worker that held torch and py4DSTEM
    takes about that long to tear down on a busy machine, so a good run could end with one
    such warning per worker, and a run stopped by Ctrl-C always did; by then its results are
    published or discarded, and nothing is left to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Worker process still alive after")


def quiet_cluster_close() -> None:
    """Filter the Nanny logger of the command's process, where a local cluster's Nannies run,
    with :class:`_NotKilledOnClose`."""
    _filter_once("distributed.nanny", _NotKilledOnClose)
