"""Attributes and records as strict JSON, which every reader parses.

Zarr keeps a store's attributes in ``zarr.json``, and Python's :mod:`json` writes NaN and
infinities there as the bare tokens ``NaN`` and ``Infinity``, which JSON (RFC 8259) has not:
JavaScript, Julia and Rust readers refuse the whole file (zarr-python issue #412). A method's
``reference_spread`` is NaN where its region holds too few positions, a sweep's error NaN
where a method gave no answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["json_values"]


def json_values(obj: Any) -> Any:
    """``obj`` as values that JSON holds: NaN and infinities as None (``null``), NumPy scalars
    and arrays as Python numbers and lists, tuples as lists, mapping keys as strings, and any
    other object as its ``str``.

    >>> json_values({"spread": {"exx": np.float32("nan"), "n": np.int64(3)}, "c": (1.0, np.inf)})
    {'spread': {'exx': None, 'n': 3}, 'c': [1.0, None]}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_values(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_values(obj.tolist())
    if isinstance(obj, np.generic):
        return json_values(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)
