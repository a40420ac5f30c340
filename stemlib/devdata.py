"""The shared multislice development scans (``../shared/data/abtem-dev/``) with their truth.

abTEM multislice simulations of Voronoi-grain scans (Si [001] and WS2) with the true
deformation of every position; see that folder's README. Tests and benchmarks read them from
the ``shared/`` folder beside the checkout, or from ``$STEMFLOW_SHARED_DATA``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import xarray as xr

from .calibration import Calibration
from .errors import InputError
from .io.scan_store import WriteResult, write_scan
from .truth import truth_dataset

__all__ = ["DevScan", "shared_data_dir", "abtem_dev_path", "read_abtem_dev", "write_abtem_dev"]


def shared_data_dir() -> Path:
    """The folder of the development scans: ``$STEMFLOW_SHARED_DATA`` or
    ``../shared/data/abtem-dev``."""
    env = os.environ.get("STEMFLOW_SHARED_DATA")
    return (
        Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "abtem-dev"
    )


def abtem_dev_path(name: str) -> Path:
    """Path of a development scan by file name or stem, e.g.
    ``"dev_si001_32x32_128px_12grains_seed11_clean"``."""
    path = shared_data_dir() / (name if name.endswith(".h5") else f"{name}.h5")
    if not path.exists():
        raise InputError(
            f"{path} does not exist; set STEMFLOW_SHARED_DATA to the abtem-dev folder."
        )
    return path


@dataclass(frozen=True)
class DevScan:
    """A development scan in memory: ``data`` (RX, RY, QX, QY), its truth and calibration."""

    data: np.ndarray
    truth: xr.Dataset
    calibration: Calibration
    symmetry: int
    name: str


def read_abtem_dev(path: str | Path) -> DevScan:
    """Read a development scan (32 x 32 x 128 x 128, small enough for memory) and its truth.

    Noisy files hold ``datacube`` (uint16 counts); clean files hold the distinct patterns
    ``variants/patterns`` (float32, fraction of the probe), expanded here by the per-position
    ``truth/variant_id`` and ``truth/position_id``. The truth is the detector-frame ``*_lab``
    strain and ``theta_deg`` converted to radians.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        t = f["truth"]
        if "datacube" in f:
            data = f["datacube"][()]
        else:
            data = f["variants/patterns"][()][t["variant_id"][()], t["position_id"][()]]
        truth_values = {
            "exx": t["exx_lab"][()],
            "eyy": t["eyy_lab"][()],
            "exy": t["exy_lab"][()],
            "theta": np.radians(t["theta_deg"][()]),
        }
        grain_id, reference = t["grain_id"][()], t["reference_mask"][()]
        a = f.attrs
        material = str(a["material"])
        calibration = Calibration(
            beam_energy_keV=float(a["energy_keV"]),
            convergence_semiangle_mrad=float(a["semiangle_mrad"]),
            probe_step_nm=float(a["nominal_scan_step_A"]) / 10.0,
            q_pixel_size=float(a["invA_per_px"]),
            q_pixel_units="1/A",
            origin_px=(float(a["centre_px"]), float(a["centre_px"])),
        )
    symmetry = 6 if "ws2" in material.lower() else 4
    truth = truth_dataset(
        **truth_values, grain_id=grain_id, reference_mask=reference, symmetry=symmetry
    )
    return DevScan(
        data=data, truth=truth, calibration=calibration, symmetry=symmetry, name=path.stem
    )


def write_abtem_dev(path: str | Path, dest: str) -> WriteResult:
    """Write a development scan as a scan store carrying its truth (``truth_*`` variables)."""
    scan = read_abtem_dev(path)
    return write_scan(
        da.from_array(scan.data, chunks=(16, 16) + scan.data.shape[2:]),
        dest,
        calibration=scan.calibration,
        attrs={"source": scan.name, "truth_symmetry": scan.symmetry},
        extras=scan.truth,
    )
