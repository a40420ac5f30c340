"""Prefect tasks: thin, typed wrappers around stemlib calls (retries, caching, logging).

Importing them sends stemlib's warnings to the logs of the run that meets them
(:func:`._logs.stemlib_logs_to_runs`): in every process that runs a task, Dask workers
included.
"""

from ._logs import stemlib_logs_to_runs

stemlib_logs_to_runs()
