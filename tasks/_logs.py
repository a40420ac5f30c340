"""stemlib's warnings in the logs of the Prefect run that met them.

stemlib logs through the standard :mod:`logging` (a reference region that looks strained, a
damaged store written again); the process's handlers show it on the terminal once. Inside a
flow or task run, :class:`RunLogs` also sends it to that run's logs in the Prefect API, so that
the UI shows it under the task that met it, without a second line on the terminal.
"""

from __future__ import annotations

import logging

from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

__all__ = ["RunLogs", "stemlib_logs_to_runs"]


class RunLogs(APILogHandler):
    """Prefect's API log handler for records emitted inside a flow or task run; a record
    emitted outside one (``stemflow strain``, a notebook) is left to the other handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_run_context()
        except MissingContextError:
            return
        super().emit(record)


def stemlib_logs_to_runs() -> None:
    """Send stemlib's warnings to the logs of the run that meets them (:class:`RunLogs`), once
    per process."""
    logger = logging.getLogger("stemlib")
    if not any(isinstance(handler, RunLogs) for handler in logger.handlers):
        logger.addHandler(RunLogs(level=logging.WARNING))
