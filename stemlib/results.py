"""Strain result datasets (CONVENTIONS.md section 4): build, combine, write atomically, open.

A strain dataset has variables ``exx, eyy, exy, theta, valid`` with dims ``(method, rx, ry)``;
method-specific extras (class map, residuals, disk counts) are further ``(method, rx, ry)``
variables, NaN for methods that do not have them. Attributes are set last, in one place,
because xarray drops them in arithmetic.

Select a method with a dict, ``ds.sel({"method": "ccstae"})``: the keyword form
``ds.sel(method="ccstae")`` is taken by xarray as its ``method=`` matching option and selects
nothing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from numbers import Number
from typing import Any

import numpy as np
import xarray as xr
import zarr

from .calibration import Calibration
from .errors import InputError
from .io.blocks import block_keys, missing_blocks
from .io.scan_store import check_destination, open_store_group
from .io.storage import Location, locate, redact, staged, storage_errors
from .jsonvalues import json_values
from .metrics import reference_spread
from .strain import strain_in_scan_frame
from .types import SCAN_DIMS

__all__ = [
    "CONVENTION",
    "STRAIN_VARIABLES",
    "strain_dataset",
    "combine_methods",
    "write_strain",
    "open_strain",
    "damaged_strain",
    "coverage",
    "netcdf_ready",
]

CONVENTION = "stemflow-1"
#: Group attribute: the count of objects that hold the store's arrays, every one of them
#: written, also one of NaN only (:func:`damaged_strain`).
BLOCKS_ATTR = "stored_blocks"

#: Required variables: (units, long_name).
STRAIN_VARIABLES: dict[str, tuple[str, str]] = {
    "exx": ("1", "normal strain along qx (V - I)"),
    "eyy": ("1", "normal strain along qy (V - I)"),
    "exy": ("1", "tensor shear strain (engineering shear is 2 exy)"),
    "theta": ("rad", "lattice rotation from +qx towards +qy"),
    "valid": ("1", "position has an answer"),
}
#: The same components in the scan's axes, where the scan-to-detector rotation is calibrated.
SCAN_FRAME_VARIABLES: dict[str, tuple[str, str]] = {
    "exx_scan": ("1", "normal strain along rx (V - I)"),
    "eyy_scan": ("1", "normal strain along ry (V - I)"),
    "exy_scan": ("1", "tensor shear strain in the scan frame (engineering shear is 2 exy_scan)"),
    "theta_scan": ("rad", "lattice rotation from +rx towards +ry"),
}


def strain_dataset(
    method: str,
    *,
    exx: np.ndarray,
    eyy: np.ndarray,
    exy: np.ndarray,
    theta: np.ndarray,
    valid: np.ndarray | None = None,
    coords: Mapping[str, xr.DataArray | tuple[str, np.ndarray, dict[str, Any]]] | None = None,
    extras: Mapping[str, tuple[np.ndarray, dict[str, str]]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    method_attrs: Mapping[str, Any] | None = None,
    calibration: Calibration | None = None,
) -> xr.Dataset:
    """Build the strain dataset of one method.

    Parameters
    ----------
    method
        The ``method`` label, e.g. ``"ccstae"`` or ``"py4dstem"``.
    exx, eyy, exy, theta
        Arrays of shape (RX, RY): strain ("1", tensor shear) and rotation (rad) in the detector
        frame, NaN where a position has no answer.
    valid
        Boolean array of shape (RX, RY); by default True where all four are finite. Positions
        that are not valid are set to NaN in every component.
    coords
        ``rx``/``ry`` coordinates with units (e.g. from the scan store); indices in ``"px"``
        if None.
    extras
        Further per-position maps ``{name: (array (RX, RY), {"units": ..., "long_name": ...})}``.
    attrs
        Dataset attributes: ``frame``, ``reference``, provenance (input fingerprint, versions).
    method_attrs
        This method's parameters and diagnostics, stored under ``attrs["methods"][method]``.
    calibration
        The scan's calibration. Where it knows the scan-to-detector rotation
        (``qr_rotation_deg``, and ``qr_flip``), the dataset also holds the strain in the scan's
        axes, ``exx_scan, eyy_scan, exy_scan, theta_scan``
        (:func:`stemlib.strain.strain_in_scan_frame`, the rotation wrapped by the
        ``symmetry`` of ``method_attrs``), and the attribute ``scan_frame`` says by which.

    Returns
    -------
    xarray.Dataset
        Variables of dims (method, rx, ry) with ``units`` and ``long_name``; ``convention``
        ``"stemflow-1"``; ``frame`` ``"detector"`` (that of ``exx``, ...); ``coverage``
        (fraction valid) in the method's attributes, and ``reference_spread``
        (:func:`stemlib.metrics.reference_spread`) where ``extras`` hold a
        ``reference_region``.

    Examples
    --------
    A detector turned by 30 deg against the scan: 1 % tension along qx is, along the scan's
    axes, 0.75 % along rx, 0.25 % along ry and a shear of 0.43 %:

    >>> one = np.ones((2, 3))
    >>> turned = Calibration(qr_rotation_deg=30.0)
    >>> ds = strain_dataset("a", exx=0.01 * one, eyy=0 * one, exy=0 * one, theta=0 * one,
    ...                     calibration=turned)
    >>> [round(float(ds[f"{c}_scan"][0, 0, 0]), 5) for c in ("exx", "eyy", "exy")]
    [0.0075, 0.0025, 0.00433]
    >>> ds.attrs["frame"], ds.attrs["scan_frame"]
    ('detector', {'qr_rotation_deg': 30.0, 'qr_flip': False})
    """
    maps = {"exx": exx, "eyy": eyy, "exy": exy, "theta": theta}
    shape = np.shape(exx)
    for name, value in maps.items():
        if np.shape(value) != shape or len(shape) != 2:
            raise InputError(
                f"{name} has shape {np.shape(value)}; every map must have the scan shape {shape}."
            )
    finite = np.logical_and.reduce([np.isfinite(v) for v in maps.values()])
    valid = finite if valid is None else (np.asarray(valid, bool) & finite)
    masked = {name: np.where(valid, np.asarray(v, np.float64), np.nan) for name, v in maps.items()}
    rotation = None if calibration is None else calibration.qr_rotation_deg
    if rotation is not None:
        flip = bool(calibration.qr_flip)
        turned = strain_in_scan_frame(
            **masked,
            qr_rotation_deg=rotation,
            qr_flip=flip,
            symmetry=int((method_attrs or {}).get("symmetry") or 1),
        )
        masked.update({f"{name}_scan": value for name, value in turned.items()})
    data_vars: dict[str, Any] = {
        name: (("method",) + SCAN_DIMS, value[None]) for name, value in masked.items()
    }
    data_vars["valid"] = (("method",) + SCAN_DIMS, valid[None])
    for name, (value, _) in (extras or {}).items():
        if np.shape(value) != shape:
            raise InputError(f"extra map {name} has shape {np.shape(value)}; expected {shape}.")
        data_vars[name] = (("method",) + SCAN_DIMS, np.asarray(value)[None])
    if coords is None:
        coords = {
            d: (
                d,
                np.arange(n, dtype=np.float64),
                {"units": "px", "long_name": f"probe position {d}"},
            )
            for d, n in zip(SCAN_DIMS, shape, strict=False)
        }
    # Variable-length strings: Zarr v3 has a specification for them, not for fixed-width ones.
    method_label = ("method", np.array([method], dtype=object), {"long_name": "strain method"})
    ds = xr.Dataset(data_vars, coords={"method": method_label, **dict(coords)})
    for name, (units, long_name) in {**STRAIN_VARIABLES, **SCAN_FRAME_VARIABLES}.items():
        if name in ds:
            ds[name].attrs = {"units": units, "long_name": long_name}
    for name, (_, var_attrs) in (extras or {}).items():
        ds[name].attrs = dict(var_attrs)
    ds.attrs = {
        "convention": CONVENTION,
        "frame": "detector",
        **(
            {"scan_frame": {"qr_rotation_deg": float(rotation), "qr_flip": flip}}
            if rotation is not None
            else {}
        ),
        **dict(attrs or {}),
        "methods": {method: {"coverage": float(valid.mean()), **dict(method_attrs or {})}},
    }
    if "reference_region" in ds:
        ds.attrs["methods"][method]["reference_spread"] = reference_spread(ds)
    return ds


def combine_methods(
    datasets: list[xr.Dataset], *, attrs: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """Concatenate single-method datasets along ``method`` (extras absent in one become NaN, as
    floats, also where the other method's are integers or booleans, and stay NaN when written).

    Dataset attributes are those on which the datasets agree (xarray's ``drop_conflicts``: a
    value that one method's dataset alone has is kept; one that the methods differ on, such as
    each one's reference region, is left to their records), updated by ``attrs``; the
    per-method records under ``methods`` are merged.

    >>> z = np.zeros((2, 2))
    >>> def one(method, **attrs):
    ...     return strain_dataset(method, exx=z, eyy=z, exy=z, theta=z, attrs=attrs)
    >>> a = one("a", source="s.zarr", reference="auto: 3 positions")
    >>> b = one("b", source="s.zarr", reference="auto: 4 positions", model="m")
    >>> sorted(combine_methods([a, b]).attrs)
    ['convention', 'frame', 'methods', 'model', 'source']
    """
    if not datasets:
        raise InputError("no strain results to combine; run at least one method.")
    names = [str(m) for ds in datasets for m in ds["method"].values]
    if len(set(names)) != len(names):
        raise InputError(f"methods {names} repeat; each method may appear once.")
    combined = xr.concat(
        datasets,
        dim="method",
        data_vars="all",
        coords="minimal",
        join="outer",
        fill_value=np.nan,
        combine_attrs="drop_conflicts",
    )
    combined["valid"] = combined["valid"].fillna(False).astype(bool)
    for ds in datasets:
        for name, var in ds.data_vars.items():
            combined[name].attrs = dict(var.attrs)
    for var in combined.data_vars.values():
        # A store's integer or boolean encoding would write the NaN of a method without that
        # variable as INT_MIN or True.
        var.encoding = {}
    methods: dict[str, Any] = {}
    for ds in datasets:
        methods.update(ds.attrs.get("methods", {}))
    combined.attrs = {**combined.attrs, **dict(attrs or {}), "methods": methods}
    return combined


def _check_strain(ds: xr.Dataset, where: str) -> None:
    missing = [name for name in STRAIN_VARIABLES if name not in ds]
    if missing or "method" not in ds.dims:
        raise InputError(
            f"{where} is not a strain dataset "
            f"(missing {', '.join(missing) or 'the method dimension'}); "
            "pass a store written by `stemflow strain`."
        )
    found = ds.attrs.get("convention")
    if found != CONVENTION:
        held = "records no convention" if found is None else f"is in convention {found!r}"
        raise InputError(
            f"{where} {held}, not {CONVENTION!r} (docs/CONVENTIONS.md), so the signs and frame "
            "of its strain are unknown to this stemflow; pass a store written by `stemflow "
            "strain`, or make its maps with stemlib.strain_dataset."
        )


def write_strain(ds: xr.Dataset, dest: str | Location) -> str:
    """Write a strain dataset to a Zarr v3 store atomically; returns the URL.

    The store is written under a temporary name, opened and checked, then published (see
    :func:`stemlib.io.storage.staged`); an existing strain store at ``dest`` is replaced only
    then, and anything else there is refused (:func:`stemlib.io.scan_store.check_destination`).
    Every block is stored, also one of NaN only, and their count is recorded, so that one lost
    later is found (:func:`damaged_strain`).
    """
    dest = locate(dest) if isinstance(dest, str) else dest
    _check_strain(ds, redact(dest.url))
    check_destination(dest, "strain", methods=[str(m) for m in ds["method"].values])
    out = ds.copy()
    out.attrs = json_values(ds.attrs)

    def verify(temp: Location) -> None:
        back = open_strain(temp.url)
        if dict(back.sizes) != dict(ds.sizes):
            raise RuntimeError(
                f"verification of {redact(dest.url)} failed: sizes {dict(back.sizes)}"
            )

    options = dest.storage_options or None
    with staged(dest, verify=verify) as temp, warnings.catch_warnings(), storage_errors(dest.url):
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        out.to_zarr(
            temp.url, mode="w-", zarr_format=3, write_empty_chunks=True, storage_options=options
        )
        group = zarr.open_group(temp.url, mode="r+", storage_options=options)
        group.attrs[BLOCKS_ATTR] = sum(len(block_keys(array)) for _, array in group.arrays())
        zarr.consolidate_metadata(group.store)
    return dest.url


def open_strain(url: str | Location) -> xr.Dataset:
    """Open a strain dataset (loaded into memory: maps are small).

    Raises
    ------
    InputError
        If ``url`` does not exist, is not a strain dataset of convention ``stemflow-1``, or
        lost blocks of its maps since it was written (:func:`damaged_strain`).

    Examples
    --------
    >>> zeros = np.zeros((2, 3))
    >>> ds = strain_dataset("py4dstem", exx=zeros, eyy=zeros, exy=zeros, theta=zeros)
    >>> back = open_strain(write_strain(ds, "memory://doc/strain.zarr"))
    >>> back["exx"].dims, back["method"].values.tolist(), back["exx"].attrs["units"]
    (('method', 'rx', 'ry'), ['py4dstem'], '1')
    """
    location = locate(url) if isinstance(url, str) else url
    where = redact(location.url)
    if not location.exists():
        raise InputError(f"{where} does not exist; run `stemflow strain` first.")
    group = open_store_group(location)  # for the damage check: xarray takes no zarr group
    with warnings.catch_warnings(), storage_errors(location.url):
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        try:
            ds = xr.open_zarr(
                location.url,
                storage_options=location.storage_options or None,
                zarr_format=None if group is None else 3,  # no v2 lookups once it is known
            )
        except (FileNotFoundError, KeyError, ValueError):
            raise InputError(
                f"{where} is not a Zarr store; pass a store written by `stemflow strain`."
            ) from None
        _check_strain(ds, where)
        damage = damaged_strain(location, ds.attrs, group=group)
        if damage is not None:
            raise InputError(
                f"{damage}; copy the store again from where it came from, or rerun the command "
                "that wrote it (stemflow strain or run) to write it again."
            )
        return ds.load()


def damaged_strain(
    location: Location, attrs: Mapping[str, Any], *, group: zarr.Group | None = None
) -> str | None:
    """What the strain store at ``location`` (group attributes ``attrs``) lost of the blocks
    its writer stored, as a clause naming the store, their count and the first missing key;
    None where it lost nothing.

    Zarr reads a missing block as NaN, which a reader would take for positions with no answer.
    One listing of the store; no data is read. A store that records no ``stored_blocks``
    (written before stemflow recorded it) is not checked: it may lack blocks of NaN that were
    never written. ``group`` is the store's Zarr group where the caller opened it already
    (:func:`~stemlib.io.scan_store.open_store_group`), whose arrays are checked without
    reading its metadata again; None opens it.
    """
    if BLOCKS_ATTR not in attrs:
        return None
    with storage_errors(location.url):
        if group is None:
            group = zarr.open_group(
                location.url, mode="r", storage_options=location.storage_options or None
            )
        missing, expected = missing_blocks(location, dict(group.arrays()))
    if not missing:
        return None
    return (
        f"{redact(location.url)} lacks {len(missing)} of the {expected} blocks that hold its "
        f"maps (first missing: {missing[0]}), which would read as positions with no answer"
    )


def coverage(ds: xr.Dataset) -> dict[str, float]:
    """Fraction of valid positions per method."""
    return {str(m): float(ds["valid"].sel({"method": m}).mean()) for m in ds["method"].values}


def netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    """A copy of ``ds`` that ``to_netcdf`` accepts: every attribute that netCDF refuses (a dict
    such as ``methods`` or ``software``, a nested list, a bool, None) becomes its JSON text.

    The stores keep these attributes as JSON objects, which ``xr.open_zarr`` gives back as
    Python dicts and lists; netCDF attributes can only be strings, numbers and flat arrays of
    numbers, and ``ds.to_netcdf`` raises ``TypeError: Invalid value for attr 'methods'``.
    Strings, numbers and flat lists of numbers are kept as they are, except integers beyond
    32 bits (a scan's ``source_bytes``), which netCDF3 cannot hold; data are not touched.
    Works on a strain dataset and on a scan store (or a slice of one) alike. Read an encoded
    attribute back with :func:`json.loads`.

    Examples
    --------
    >>> z = np.zeros((2, 2))
    >>> ds = strain_dataset("py4dstem", exx=z, eyy=z, exy=z, theta=z, attrs={"symmetry": 4})
    >>> out = netcdf_ready(ds)
    >>> out.attrs["methods"], out.attrs["symmetry"]
    ('{"py4dstem": {"coverage": 1.0}}', 4)
    """

    def number(value: Any) -> bool:
        # netCDF3, the format of the engine that needs no extra library, has no 64-bit integers.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Number):
            return False
        return not isinstance(value, (int, np.integer)) or -(2**31) <= value < 2**31

    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple, np.ndarray)):
            return np.ndim(value) == 1 and all(number(v) for v in value)
        return isinstance(value, str) or number(value)

    def encode(attrs: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: v if plain(v) else json.dumps(json_values(v), allow_nan=False)
            for k, v in attrs.items()
        }

    out = ds.copy()
    out.attrs = encode(ds.attrs)
    for name in out.variables:
        out[name].attrs = encode(ds[name].attrs)
    return out
