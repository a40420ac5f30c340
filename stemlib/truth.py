"""Ground truth stored beside a scan: what a simulated (or multislice) scan really holds.

A scan store may carry per-position truth variables with dims (rx, ry): ``truth_exx``,
``truth_eyy``, ``truth_exy`` ("1", detector frame ``V - I``), ``truth_theta`` (rad, positive from
+qx towards +qy), ``grain_id`` and ``reference_mask`` (the unstrained, unrotated reference grain).
The lattice symmetry is the store attribute ``truth_symmetry``.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import xarray as xr

from .errors import InputError
from .io.scan_store import refuse_damaged
from .io.storage import Location, locate, storage_errors
from .types import SCAN_DIMS

__all__ = [
    "TRUTH_COMPONENTS",
    "as_truth",
    "truth_dataset",
    "open_truth",
    "read_truth_group",
    "write_truth_group",
]

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
        {
            f"truth_{k}": (
                SCAN_DIMS,
                np.asarray(v, np.float64),
                {"units": TRUTH_COMPONENTS[k][0], "long_name": TRUTH_COMPONENTS[k][1]},
            )
            for k, v in values.items()
        }
    )
    if grain_id is not None:
        ds["grain_id"] = (
            SCAN_DIMS,
            np.asarray(grain_id, np.int32),
            {"units": "1", "long_name": "grain index (-1 in vacuum)"},
        )
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
    ``reference_mask``; attribute ``symmetry``), or None if it carries none. Loaded into memory.

    Raises
    ------
    InputError
        The store lost an object its writer stored (:func:`~stemlib.io.scan_store.refuse_damaged`).
    """
    location = locate(url) if isinstance(url, str) else url
    refuse_damaged(location)  # a lost block of the truth would read as NaN
    with warnings.catch_warnings(), storage_errors(location.url):
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        ds = xr.open_zarr(location.url, storage_options=location.storage_options or None)
    if "truth_exx" not in ds:
        return None
    return as_truth(ds).load()


def as_truth(ds: xr.Dataset) -> xr.Dataset:
    """The truth with plain names (``exx, eyy, exy, theta``; attribute ``symmetry``), from a
    dataset that holds it under either name: plain, as :func:`open_truth` returns it, or
    ``truth_*``, as :func:`stemlib.simulate.simulate` returns it and a scan store carries it.

    Parameters
    ----------
    ds
        A dataset with maps of dims (rx, ry): ``exx, eyy, exy`` ("1"), ``theta`` (rad), or the
        same with the prefix ``truth_`` (then ``grain_id`` and ``reference_mask`` come along,
        and the attribute ``truth_symmetry`` becomes ``symmetry``).

    Returns
    -------
    xarray.Dataset
        The ``truth_*`` maps renamed where ``ds`` holds them (lazy where ``ds`` is), else ``ds``
        itself: a published strain dataset, which holds a method's ``exx`` beside the truth's
        ``truth_exx``, gives its truth.

    Raises
    ------
    InputError
        If ``ds`` holds neither form.

    Examples
    --------
    >>> from stemlib.simulate import SimulationConfig, simulate
    >>> truth = as_truth(simulate(SimulationConfig(scan=(4, 4), pattern=32, grains=2)))
    >>> sorted(truth.data_vars), truth.attrs["symmetry"]
    (['exx', 'exy', 'eyy', 'grain_id', 'reference_mask', 'theta'], 4)
    """
    names = {f"truth_{k}": k for k in TRUTH_COMPONENTS}
    if not all(n in ds for n in names):
        if all(k in ds for k in TRUTH_COMPONENTS):
            return ds
        raise InputError(
            f"the truth has variables {sorted(map(str, ds.data_vars))}, not exx, eyy, exy, theta "
            "(or truth_exx, ...); pass the dataset stemlib.simulate returns or "
            "stemlib.truth.open_truth(url)."
        )
    keep = [*names, *(n for n in ("grain_id", "reference_mask") if n in ds)]
    truth = ds[keep].rename(names)
    truth.attrs = {"symmetry": ds.attrs.get("truth_symmetry")}
    return truth


def write_truth_group(group: h5py.Group, truth: xr.Dataset) -> None:
    """Store truth maps (``truth_*`` variables of :func:`truth_dataset`) in an HDF5 group.

    Layout: datasets ``exx, eyy, exy`` ("1"), ``theta`` (rad), optional ``grain_id`` and
    ``reference_mask``, each (RX, RY); the group attribute ``symmetry``. A raw scan file with
    such a ``truth`` group keeps its truth through ``stemflow ingest``.
    """
    for name in TRUTH_COMPONENTS:
        group.create_dataset(name, data=truth[f"truth_{name}"].values)
    for name in ("grain_id", "reference_mask"):
        if name in truth:
            group.create_dataset(name, data=truth[name].values)
    if truth.attrs.get("truth_symmetry") is not None:
        group.attrs["symmetry"] = int(truth.attrs["truth_symmetry"])


def read_truth_group(group: h5py.Group, scan_shape: tuple[int, int]) -> xr.Dataset | None:
    """Truth maps from an HDF5 ``truth`` group, or None when it holds none for this scan.

    Reads the layout of :func:`write_truth_group`, and that of the shared multislice scans
    (``exx_lab, eyy_lab, exy_lab`` in the detector frame, ``theta_deg``). Maps of another shape
    than ``scan_shape`` are ignored.
    """
    if all(f"{k}_lab" in group for k in ("exx", "eyy", "exy")) and "theta_deg" in group:
        values = {k: group[f"{k}_lab"][()] for k in ("exx", "eyy", "exy")}
        values["theta"] = np.radians(group["theta_deg"][()])
    elif all(k in group for k in TRUTH_COMPONENTS):
        values = {k: group[k][()] for k in TRUTH_COMPONENTS}
    else:
        return None
    if any(np.shape(v) != tuple(scan_shape) for v in values.values()):
        return None
    extras = {
        k: group[k][()]
        for k in ("grain_id", "reference_mask")
        if k in group and group[k].shape == tuple(scan_shape)
    }
    symmetry = group.attrs.get("symmetry")
    return truth_dataset(
        **values, **extras, symmetry=int(symmetry) if symmetry is not None else None
    )
