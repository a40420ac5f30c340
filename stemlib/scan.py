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
from dask.base import tokenize

from .errors import InputError
from .types import DIMS

__all__ = ["ScanLike", "as_scan", "stored_array_name", "stored_content"]

#: What the strain methods accept as a scan.
ScanLike: TypeAlias = "xr.DataArray | np.ndarray | da.Array"


def stored_array_name(content_sha256: str, chunks: tuple[tuple[int, ...], ...], dtype: Any) -> str:
    """The dask name :func:`stemlib.io.open_scan` gives the patterns of a store whose content
    hash is ``content_sha256``, read in ``chunks`` (dask's normalised chunks) of ``dtype``."""
    return "scan-" + tokenize(content_sha256, chunks, str(np.dtype(dtype)))


def stored_content(scan: Any) -> str | None:
    """The ``content_sha256`` of the scan store that ``scan`` holds as read, or None.

    xarray keeps a DataArray's attributes through selections, binning and arithmetic
    (``scan.isel(rx=slice(8))``, ``scan.coarsen(...).sum()``, ``add_noise(scan, ...)``): the
    store's hash then no longer describes the values. It does only while the values are the
    array :func:`stemlib.io.open_scan` read (its dask name, :func:`stored_array_name`).

    Examples
    --------
    >>> chunks = ((2,), (3,), (8,), (8,))
    >>> name = stored_array_name("ab", chunks, "uint16")
    >>> data = da.zeros((2, 3, 8, 8), dtype="uint16", chunks=chunks, name=name)
    >>> stored = xr.DataArray(data, dims=DIMS, attrs={"content_sha256": "ab"})
    >>> stored_content(stored), stored_content(stored.isel(rx=[0])), stored_content(stored * 2)
    ('ab', None, None)
    """
    attrs = getattr(scan, "attrs", None) or {}
    content = attrs.get("content_sha256")
    data = getattr(scan, "data", None)
    if not content or not isinstance(data, da.Array):
        return None
    same = data.name == stored_array_name(content, data.chunks, data.dtype)
    return str(content) if same else None


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


def _refuse_empty_or_complex(scan: xr.DataArray, name: str) -> None:
    if 0 in scan.shape:
        raise InputError(
            f"{name} has shape {tuple(scan.shape)}, with no probe positions or no pixels; pass a "
            "scan of at least one pattern."
        )
    if scan.dtype.kind not in "iuf":
        raise InputError(
            f"{name} has dtype {scan.dtype}; the strain methods take intensities of an integer or "
            f"float dtype: pass the counts, e.g. np.abs({name}) of a complex wave."
        )


def _first_nonfinite(block: np.ndarray) -> tuple[int, int] | None:
    """(i, j) of the first pattern of a block (crx, cry, QX, QY) holding NaN or Inf, or None."""
    bad = np.argwhere(~np.isfinite(block).all(axis=(2, 3)))
    return (int(bad[0, 0]), int(bad[0, 1])) if len(bad) else None


def _nonfinite(name: str, rx: int, ry: int) -> InputError:
    return InputError(
        f"{name} holds NaN or Inf, first in the pattern at (rx, ry) = ({rx}, {ry}); replace them "
        f"first, e.g. np.nan_to_num({name}) for 0 counts where a pixel read nothing."
    )


def _finite_block(block: np.ndarray, *, argument: str, block_info: Any = None) -> np.ndarray:
    """``block`` itself, or the sentence naming its first pattern holding NaN or Inf."""
    first = _first_nonfinite(block)
    if first is not None:
        (r0, _), (c0, _) = block_info[0]["array-location"][:2]
        raise _nonfinite(argument, r0 + first[0], c0 + first[1])
    return block


def _checked_finite(scan: xr.DataArray, name: str) -> xr.DataArray:
    """``scan`` with its float values checked finite: at once in memory, per block when lazy (so
    that building a graph computes nothing). A stemflow store as read is not checked again
    (:func:`stored_content`): its writer refused NaN and Inf, or recorded them as
    ``nonfinite_pixels``, read as 0 counts."""
    if scan.dtype.kind != "f" or stored_content(scan):
        return scan
    if not isinstance(scan.data, da.Array):
        first = _first_nonfinite(np.asarray(scan.data))
        if first is not None:
            raise _nonfinite(name, *first)
        return scan
    checked = scan.data.map_blocks(
        _finite_block,
        argument=name,
        dtype=scan.dtype,
        meta=scan.data._meta,
        name="stemflow-finite-" + tokenize(scan.data, name),
    )
    return scan.copy(data=checked)


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
        centre, ``(QX // 2, QY // 2)``). A lazy scan comes back lazy, its values checked as
        each block is computed.

    Raises
    ------
    InputError
        If ``scan`` is not 4-dimensional, has dims of other names or order, is not an array, is
        empty or of a dtype other than integer or float; if a float scan holds NaN or Inf (at
        once in memory, when the block is computed for a dask array; a store that
        :func:`stemlib.io.open_scan` opened is not checked again).

    Examples
    --------
    >>> as_scan(np.zeros((2, 3, 8, 8), np.uint16)).dims
    ('rx', 'ry', 'qx', 'qy')
    >>> as_scan(xr.DataArray(np.zeros((8, 8, 2, 3)), dims=("qx", "qy", "rx", "ry")))
    Traceback (most recent call last):
    ...
    stemlib.errors.InputError: scan has dims ('qx', 'qy', 'rx', 'ry'); expected (rx, ry, qx, qy) in that order: transpose it: scan.transpose('rx', 'ry', 'qx', 'qy').
    """  # noqa: E501
    labelled = _labelled(scan, name)
    _refuse_empty_or_complex(labelled, name)
    return _checked_finite(labelled, name)
