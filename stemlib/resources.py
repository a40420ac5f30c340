"""Resource use of this process, for benchmarks and memory tests."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss"]


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
