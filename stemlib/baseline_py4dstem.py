"""The py4DSTEM correlation baseline (the method microscopists trust today), beside CC-ST-AE.

The implementation lives in :mod:`stemlib.py4dstem`; this module is the entry point named in the
design: ``py4dstem_strain(scan, reference=..., symmetry=..., config=...)``.
"""

from __future__ import annotations

from .py4dstem import METHOD, Py4DSTEMConfig, py4dstem_strain

__all__ = ["METHOD", "Py4DSTEMConfig", "py4dstem_strain"]
