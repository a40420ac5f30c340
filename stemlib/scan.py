"""A scan as the strain methods take it: an xarray DataArray of dims (rx, ry, qx, qy).

Both methods read a scan store (:func:`stemlib.io.open_scan`) or what a user holds in memory:
a NumPy or dask array of shape (RX, RY, QX, QY) in CONVENTIONS.md's order, or a DataArray with
those dims and no stemflow attributes. :func:`as_scan` turns each into the one form and refuses
anything else in one sentence before any work starts.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import dask.array as da
import numpy as np
import xarray as xr

from .errors import InputError
from .types import DIMS

__all__ = ["ScanLike", "as_scan"]

#: What the strain methods accept as a scan.
ScanLike: TypeAlias = "xr.DataArray | np.ndarray | da.Array"


def _labelled(scan: Any, name: str) -> xr.DataArray:
    """``scan`` as a DataArray of dims :data:`~stemlib.types.DIMS`, or the sentence saying how
    to make it one."""
    if isinstance(scan, xr.DataArray):
        dims = tuple(str(d) for d in scan.dims)
        if dims == DIMS:
            return scan
        if sorted(dims) == sorted(DIMS):
            fix = f"transpose it: {name}.transpose{DIMS}"
        elif len(dims) == 4:
            fix = f"rename them: {name}.rename({dict(zip(dims, DIMS, strict=True))})"
        else:
            fix = f"give it 4 dims {DIMS}"
        raise InputError(f"{name} has dims {dims}; expected (rx, ry, qx, qy) in that order: {fix}.")
    if not isinstance(scan, (np.ndarray, da.Array)):
        raise InputError(
            f"{name} is a {type(scan).__name__}; pass a NumPy or dask array of shape "
            "(RX, RY, QX, QY), an xarray DataArray with dims (rx, ry, qx, qy), or "
            "stemlib.open_scan(url)."
        )
    if scan.ndim != 4:
        raise InputError(
            f"{name} has shape {tuple(scan.shape)}; expected 4 dims (rx, ry, qx, qy): reshape a "
            "stack of patterns to (RX, RY, QX, QY) first."
        )
    return xr.DataArray(scan, dims=DIMS)


def as_scan(scan: ScanLike, *, name: str = "scan") -> xr.DataArray:
    """A user's scan as a DataArray of dims (rx, ry, qx, qy), checked.

    Parameters
    ----------
    scan
        A DataArray with dims (rx, ry, qx, qy) (``qx`` = pattern rows, axis 2), such as
        :func:`stemlib.io.open_scan` returns, or a NumPy or dask array of shape
        (RX, RY, QX, QY) in that order; intensities of an integer or float dtype.
    name
        The argument's name, for messages.

    Returns
    -------
    xarray.DataArray of dims (rx, ry, qx, qy)
        ``scan`` itself if it is such a DataArray, else the array with those dims and no
        coordinates or attributes (uncalibrated: the direct beam is taken at the pattern's
        centre, ``(QX // 2, QY // 2)``).

    Raises
    ------
    InputError
        If ``scan`` is not 4-dimensional, has dims of other names or order, or is not an array.

    Examples
    --------
    >>> as_scan(np.zeros((2, 3, 8, 8), np.uint16)).dims
    ('rx', 'ry', 'qx', 'qy')
    >>> as_scan(xr.DataArray(np.zeros((8, 8, 2, 3)), dims=("qx", "qy", "rx", "ry")))
    Traceback (most recent call last):
    ...
    stemlib.errors.InputError: scan has dims ('qx', 'qy', 'rx', 'ry'); expected (rx, ry, qx, qy) in that order: transpose it: scan.transpose('rx', 'ry', 'qx', 'qy').
    """  # noqa: E501
    return _labelled(scan, name)
