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
from .masks import MaskSchedule
from .noise import add_noise, noise_store
from .results import combine_methods, open_strain, strain_dataset, write_strain
from .simulate import SimulationConfig, simulate, write_simulation

__all__ = [
    "Calibration",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "MaskSchedule",
    "SimulationConfig",
    "StemflowError",
    "StorageError",
    "add_noise",
    "combine_methods",
    "ingest",
    "noise_store",
    "open_scan",
    "open_source",
    "open_strain",
    "simulate",
    "strain_dataset",
    "write_scan",
    "write_simulation",
    "write_strain",
]
