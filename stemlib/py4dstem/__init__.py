"""The py4DSTEM correlation baseline: py4DSTEM's template-correlation disk detection, run per scan
block on Dask workers, with a per-pattern lattice fit that indexes grains of any rotation and
reports strain in stemflow's convention (CONVENTIONS.md).

py4DSTEM (GPL) is called, never copied.
"""

from __future__ import annotations

from .config import Py4DSTEMConfig
from .pipeline import METHOD, py4dstem_strain

__all__ = ["METHOD", "Py4DSTEMConfig", "py4dstem_strain"]
