"""stemlib: the science and I/O of stemflow, as plain functions (no orchestration).

4D-STEM scans -> strain, shear and rotation maps, in the convention of CONVENTIONS.md:
datacube dims (rx, ry, qx, qy), strain ``e = V - I`` of ``F = V R`` in the detector frame,
rotation in radians from +qx towards +qy.
"""

from __future__ import annotations

import importlib
from typing import Any

from .binning import binned_scan, binned_truth
from .calibration import Calibration
from .compare import compare_methods
from .errors import InputError, StemflowError, StorageError
from .ingest import IngestOptions, IngestResult, ingest
from .io import open_scan, open_source, write_scan
from .masks import MaskSchedule
from .metrics import strain_errors
from .noise import add_noise, noise_store
from .results import combine_methods, open_strain, strain_dataset, write_strain
from .scan import as_scan
from .simulate import SimulationConfig, simulate, write_simulation
from .truth import open_truth
from .virtual import virtual_images

#: The strain methods and the plots, imported on first use: they pull in py4DSTEM, PyTorch or
#: matplotlib, which ``import stemlib`` alone does not need.
_ON_FIRST_USE = {
    "Py4DSTEMConfig": "baseline_py4dstem",
    "py4dstem_strain": "baseline_py4dstem",
    "CCSTAEConfig": "ccstae",
    "ccstae_strain": "ccstae",
    "strain_figure": "plots",
    "comparison_figure": "plots",
    "virtual_figure": "plots",
}

__all__ = [
    "CCSTAEConfig",
    "Calibration",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "MaskSchedule",
    "Py4DSTEMConfig",
    "SimulationConfig",
    "StemflowError",
    "StorageError",
    "add_noise",
    "as_scan",
    "binned_scan",
    "binned_truth",
    "ccstae_strain",
    "combine_methods",
    "compare_methods",
    "comparison_figure",
    "ingest",
    "noise_store",
    "open_scan",
    "open_source",
    "open_strain",
    "open_truth",
    "py4dstem_strain",
    "simulate",
    "strain_dataset",
    "strain_errors",
    "strain_figure",
    "virtual_figure",
    "virtual_images",
    "write_scan",
    "write_simulation",
    "write_strain",
]


def __getattr__(name: str) -> Any:
    """The entry points of :data:`_ON_FIRST_USE`, imported when first asked for."""
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE})
