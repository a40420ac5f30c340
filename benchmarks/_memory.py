"""Peak memory of a benchmark's child process and everything it starts (Dask workers included)."""

from __future__ import annotations

import subprocess
import time
from typing import Any


def run_sampled(args: list[str], **popen: Any) -> tuple[subprocess.Popen, str, float]:
    """Run ``args`` to the end, sampling the resident memory of its whole process tree every
    0.2 s; returns the finished process, its stdout (text) and the peak of the tree's summed
    RSS in bytes."""
    import psutil

    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **popen)
    parent = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output, _ = child.communicate()
    return child, output, float(peak)
