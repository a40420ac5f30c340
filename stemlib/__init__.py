"""stemlib: the science and I/O of stemflow, as plain functions (no orchestration).

4D-STEM scans -> strain, shear and rotation maps, in the convention of CONVENTIONS.md:
datacube dims (rx, ry, qx, qy), strain ``e = V - I`` of ``F = V R`` in the detector frame,
rotation in radians from +qx towards +qy.
"""

from __future__ import annotations

from .calibration import Calibration
from .errors import InputError, StemflowError, StorageError
from .ingest import IngestOptions, IngestResult, ingest
from .io import open_scan, open_source, write_scan
from .results import combine_methods, open_strain, strain_dataset, write_strain

__all__ = [
    "Calibration",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "StemflowError",
    "StorageError",
    "combine_methods",
    "ingest",
    "open_scan",
    "open_source",
    "open_strain",
    "strain_dataset",
    "write_scan",
    "write_strain",
]
