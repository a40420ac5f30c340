"""Resources of this process: the cores it may use, and its peak memory for benchmarks and
memory tests."""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["peak_rss", "usable_cores"]


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one (a batch job or
    container given 4 of a node's 64 cores has 4), else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def peak_rss() -> int:
    """This process's peak resident set size in bytes since it started.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux carries a
    parent's ``ru_maxrss`` across fork + exec into the child, so a child started by a large
    process would report the parent's peak. Elsewhere it is ``ru_maxrss``.
    """
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, others KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
