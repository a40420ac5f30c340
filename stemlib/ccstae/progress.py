"""Progress of the CC-ST-AE's long stages, as lines for a terminal or a run's log.

A :data:`Progress` is True (print each line on stderr), a function that takes each line (a
logger's ``info``), or False (say nothing); :func:`reporter` turns it into a function or None.
The starting bases report each round, training each epoch; the stages that pass over every
pattern of the scan (the rotation search, inference and its second pass) report each further
quarter of the scan (:class:`Counter`): on a CPU, a 256 x 256 scan takes minutes per stage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "Report", "reporter", "Counter"]

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
    """Patterns done of a stage's ``total``, reported as ``ccstae: STAGE DONE/TOTAL patterns
    (RATE patterns/s)`` each time another quarter of ``total`` is done.

    Examples
    --------
    >>> lines = []
    >>> counter = Counter(lines.append, "inference", 1000)
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
            f"ccstae: {self._stage} {self._done:,}/{self._total:,} patterns ({rate:.0f} patterns/s)"
        )
