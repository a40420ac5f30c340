"""Ground truth stored beside a scan: what a simulated (or multislice) scan really holds.

A scan store may carry per-position truth variables with dims (rx, ry): ``truth_exx``,
``truth_eyy``, ``truth_exy`` ("1", detector frame ``V - I``), ``truth_theta`` (rad, positive from
+qx towards +qy), ``grain_id`` and ``reference_mask`` (the unstrained, unrotated reference grain).
The lattice symmetry is the store attribute ``truth_symmetry``.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from .io.storage import Location, locate, storage_errors
from .types import SCAN_DIMS

__all__ = ["TRUTH_COMPONENTS", "truth_dataset", "open_truth"]

#: Truth components: (units, long_name).
TRUTH_COMPONENTS: dict[str, tuple[str, str]] = {
    "exx": ("1", "true normal strain along qx (V - I)"),
    "eyy": ("1", "true normal strain along qy (V - I)"),
    "exy": ("1", "true tensor shear strain"),
    "theta": ("rad", "true lattice rotation from +qx towards +qy"),
}


def truth_dataset(
    *,
    exx: np.ndarray,
    eyy: np.ndarray,
    exy: np.ndarray,
    theta: np.ndarray,
    grain_id: np.ndarray | None = None,
    reference_mask: np.ndarray | None = None,
    symmetry: int | None = None,
) -> xr.Dataset:
    """Truth maps of shape (RX, RY) as the variables a scan store carries (``truth_*`` names).

    Pass the result as ``extras`` to :func:`stemlib.io.scan_store.write_scan`; the symmetry is
    returned in ``attrs`` for the caller to store with the scan's attributes.
    """
    values = {"exx": exx, "eyy": eyy, "exy": exy, "theta": theta}
    ds = xr.Dataset(
        {f"truth_{k}": (SCAN_DIMS, np.asarray(v, np.float64), {"units": TRUTH_COMPONENTS[k][0], "long_name": TRUTH_COMPONENTS[k][1]}) for k, v in values.items()}
    )
    if grain_id is not None:
        ds["grain_id"] = (SCAN_DIMS, np.asarray(grain_id, np.int32), {"units": "1", "long_name": "grain index"})
    if reference_mask is not None:
        ds["reference_mask"] = (
            SCAN_DIMS,
            np.asarray(reference_mask, bool),
            {"units": "1", "long_name": "unstrained, unrotated reference grain"},
        )
    if symmetry is not None:
        ds.attrs["truth_symmetry"] = int(symmetry)
    return ds


def open_truth(url: str | Location) -> xr.Dataset | None:
    """The truth a scan store carries, with plain names (``exx, eyy, exy, theta``, ``grain_id``,
    ``reference_mask``; attribute ``symmetry``), or None if it carries none. Loaded into memory."""
    location = locate(url) if isinstance(url, str) else url
    with warnings.catch_warnings(), storage_errors(location.url):
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        ds = xr.open_zarr(location.url, storage_options=location.storage_options or None)
    if "truth_exx" not in ds:
        return None
    names = {f"truth_{k}": k for k in TRUTH_COMPONENTS}
    keep = [*names, *(n for n in ("grain_id", "reference_mask") if n in ds)]
    truth = ds[keep].rename(names).load()
    truth.attrs = {"symmetry": ds.attrs.get("truth_symmetry")}
    return truth
