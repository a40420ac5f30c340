"""Retry policy shared by I/O tasks: retry a store that could not be reached, never a user's
mistake (refused credentials and missing buckets included) or science."""

from __future__ import annotations

from typing import Any

from stemlib.errors import StorageError

__all__ = ["retry_on_storage_error", "STORAGE_RETRY_DELAYS", "STORAGE_RETRY"]

#: Seconds to wait before each retry of an I/O task.
STORAGE_RETRY_DELAYS = [5, 30]


def retry_on_storage_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure was a transient
    :class:`StorageError` (an object store that could not be reached); refused credentials, a
    missing bucket, bad input and science errors fail at once."""
    try:
        state.result()
    except StorageError as exc:
        return exc.transient
    except Exception:  # noqa: BLE001 - every other failure is final
        return False
    return False


#: ``@task`` options of an I/O task: retry an unreachable store, after each of
#: :data:`STORAGE_RETRY_DELAYS`, and nothing else.
STORAGE_RETRY: dict[str, Any] = {
    "retries": len(STORAGE_RETRY_DELAYS),
    "retry_delay_seconds": STORAGE_RETRY_DELAYS,
    "retry_condition_fn": retry_on_storage_error,
}
