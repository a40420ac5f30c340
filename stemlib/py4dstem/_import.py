"""py4DSTEM, imported once under a lock before any of its submodules.

py4DSTEM's package imports are circular (``py4DSTEM`` imports ``braggvectors``, whose
``diskdetection`` imports back into the package). Two threads that first import different parts
of it at once, as two py4DSTEM tasks of one flow do, deadlock in importlib (``_DeadlockError``).
Call :func:`load_py4dstem` before any ``from py4DSTEM... import``.
"""

from __future__ import annotations

import threading
from types import ModuleType

_LOCK = threading.Lock()


def load_py4dstem() -> ModuleType:
    """The ``py4DSTEM`` package, fully imported (once, by one thread at a time)."""
    with _LOCK:
        import py4DSTEM

    return py4DSTEM
