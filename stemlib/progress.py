"""Progress of the strain methods' long stages, as lines for a terminal or a run's log.

A :data:`Progress` is True (print each line on stderr), a function that takes each line (a
logger's ``info``), or False (say nothing); :func:`reporter` turns it into a function or None.
CC-ST-AE's starting bases report each round, its training each epoch; the stages that pass
over every pattern of the scan (CC-ST-AE's rotation search, inference and its second pass,
py4DSTEM's disk detection, :func:`computed_by_blocks`) report each further quarter of the scan
(:class:`Counter`): on a CPU, a 256 x 256 scan takes minutes to half an hour per stage.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback
from dask.core import flatten

__all__ = ["Progress", "Report", "reporter", "Counter", "computed_by_blocks"]

#: A function that takes one line of progress.
Report = Callable[[str], None]
#: True prints each line on stderr, a :data:`Report` receives it, False says nothing.
Progress = bool | Report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def reporter(progress: Progress) -> Report | None:
    """The function that receives each line of ``progress``, or None for no progress."""
    if progress is True:
        return _stderr
    return progress or None


class Counter:
    """Patterns done of a stage's ``total``, reported as ``STAGE DONE/TOTAL patterns (RATE
    patterns/s)`` each time another quarter of ``total`` is done (``stage`` names the method:
    ``"ccstae: inference"``).

    Examples
    --------
    >>> lines = []
    >>> counter = Counter(lines.append, "ccstae: inference", 1000)
    >>> for _ in range(4):
    ...     counter.add(300)
    >>> [line.split(" (")[0] for line in lines]
    ['ccstae: inference 300/1,000 patterns', 'ccstae: inference 600/1,000 patterns', \
'ccstae: inference 900/1,000 patterns', 'ccstae: inference 1,000/1,000 patterns']
    """

    def __init__(self, report: Report | None, stage: str, total: int) -> None:
        self._report, self._stage, self._total = report, stage, total
        self._done = self._quarters = 0
        self._start = time.perf_counter()

    def add(self, n: int) -> None:
        """Count ``n`` more patterns done."""
        self._done = min(self._done + n, self._total)
        quarters = 4 * self._done // max(self._total, 1)
        if self._report is None or quarters <= self._quarters:
            return
        self._quarters = quarters
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._report(
            f"{self._stage} {self._done:,}/{self._total:,} patterns ({rate:.0f} patterns/s)"
        )


def computed_by_blocks(array: da.Array, counter: Counter) -> np.ndarray:
    """``array`` (RX, RY, ...: one record per pattern) computed, each finished block counted on
    ``counter`` as its RX x RY patterns: on the Dask cluster of the current client as its
    blocks finish, else on Dask's local scheduler as their tasks end."""
    keys = list(flatten(array.__dask_keys__()))
    patterns = dict(
        zip(keys, (r * c for r, c, *_ in itertools.product(*array.chunks)), strict=True)
    )
    client = getattr(dask.base.get_scheduler(), "__self__", None)
    if client is None or not hasattr(client, "persist"):
        with _Finished(lambda key: counter.add(patterns.get(key, 0))):
            return np.asarray(array.compute())
    from distributed import as_completed, futures_of

    persisted = client.persist(array)
    for future in as_completed(futures_of(persisted)):
        counter.add(patterns.get(future.key, 0))
    return np.asarray(persisted.compute())


class _Finished(Callback):  # type: ignore[misc]
    """Calls ``finished(key)`` as each task of a local-scheduler computation ends."""

    def __init__(self, finished: Callable[[Any], None]) -> None:
        super().__init__()
        self._finished = finished

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self._finished(key)
