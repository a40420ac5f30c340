"""Cropping and binning a scan, lazily: fewer probe positions, or fewer detector pixels.

Binning **sums** each n x n block of probe positions or of detector pixels (:func:`binned`), as
a scan with longer dwells, or a detector with larger pixels, would have counted: a binned
pattern of counts is still Poisson, which the noise model and CC-ST-AE's Poisson fit rely on.
Integer counts are summed into a wider integer type wherever the sum could overflow the
detector's (:func:`summed_dtype`). Trailing positions or pixels that fill no whole block are
dropped. Each block is summed inside one dask chunk: memory grows with the chunk, never with the
scan.

Binning probe positions pools n^2 patterns: the noise of each measured strain falls by about n,
and the map's resolution by n. It is the way to map a scan at a dose too low for any method
that fits one pattern at a time (:mod:`stemlib.bounds`).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from .calibration import Calibration, scan_coords
from .errors import InputError
from .scan import ScanLike, as_scan
from .types import DIMS

__all__ = [
    "crop_scan",
    "binned",
    "binned_scan",
    "summed_dtype",
    "binned_calibration",
    "crop_truth",
    "binned_truth",
]


def crop_scan(data: da.Array, region: tuple[int, int, int, int]) -> da.Array:
    """The probe positions ``RX0:RX1, RY0:RY1`` (half-open) of ``data``.

    Parameters
    ----------
    data
        Array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2).
    region
        (RX0, RX1, RY0, RY1), scan indices with 0 <= RX0 < RX1 <= RX and 0 <= RY0 < RY1 <= RY
        (:func:`stemlib.reference.rectangle` parses and checks them).

    Returns
    -------
    dask.array.Array of shape (RX1 - RX0, RY1 - RY0, QX, QY), the same dtype.
    """
    x0, x1, y0, y1 = region
    return da.asarray(data)[x0:x1, y0:y1]


def summed_dtype(dtype: np.dtype | type, count: int) -> np.dtype:
    """The type that holds the sum of ``count`` values of ``dtype`` without overflow.

    Integers keep their signedness and widen only as far as the largest possible sum needs (up
    to 64 bits); float16 becomes float32; other floats are kept.

    Examples
    --------
    >>> summed_dtype(np.uint16, 4), summed_dtype(np.uint8, 4), summed_dtype(np.float32, 4)
    (dtype('uint32'), dtype('uint16'), dtype('float32'))
    >>> summed_dtype(np.uint16, 1)
    dtype('uint16')
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.promote_types(dtype, np.float32)
    if dtype.kind not in "uib":
        raise TypeError(f"cannot sum values of type {dtype}; pass integer or float counts.")
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    info = np.iinfo(dtype)
    widths = (np.uint8, np.uint16, np.uint32, np.uint64)
    if dtype.kind == "i":
        widths = (np.int8, np.int16, np.int32, np.int64)
    for candidate in widths:
        wide = np.iinfo(candidate)
        if wide.bits >= info.bits and wide.max >= info.max * count and wide.min <= info.min * count:
            return np.dtype(candidate)
    return np.dtype(widths[-1])


def binned(data: da.Array, *, scan: int = 1, q: int = 1) -> da.Array:
    """Each ``scan`` x ``scan`` block of probe positions summed into one pattern, and each
    ``q`` x ``q`` block of detector pixels into one pixel.

    Parameters
    ----------
    data
        Array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2), counts.
    scan, q
        Positions per block along ``rx`` and ``ry``; pixels per block along ``qx`` and ``qy``.
        1 leaves those axes as they are.

    Returns
    -------
    dask.array.Array of shape (RX // scan, RY // scan, QX // q, QY // q), of
    :func:`summed_dtype` for ``scan**2 q**2`` values: trailing positions, rows and columns
    that fill no block are dropped.

    Examples
    --------
    >>> patterns = np.arange(4 * 5 * 1 * 1, dtype=np.uint8).reshape(4, 5, 1, 1)
    >>> out = binned(patterns, scan=2)
    >>> out.shape, out.dtype, int(out[0, 0, 0, 0])  # 0 + 1 + 5 + 6
    ((2, 2, 1, 1), dtype('uint16'), 12)
    """
    data = da.asarray(data)
    factors = {a: f for a, f in ((0, scan), (1, scan), (2, q), (3, q)) if f > 1}
    if not factors:
        return data
    whole = tuple(slice(0, n - n % factors.get(a, 1)) for a, n in enumerate(data.shape))
    data = data[whole]
    # Chunks of whole blocks: each block is summed inside one chunk.
    data = data.rechunk({a: max(f, data.chunksize[a] // f * f) for a, f in factors.items()})
    dtype = summed_dtype(data.dtype, scan**2 * q**2)
    return da.coarsen(np.sum, data, factors, dtype=dtype)


def binned_scan(data: ScanLike, *, scan: int = 1, q: int = 1) -> xr.DataArray:
    """A labelled scan binned as ``stemflow ingest --bin-scan --bin-q`` bins a raw file: for a
    scan already opened (:func:`stemlib.io.open_scan`) or held in a notebook.

    Unlike xarray's ``data.coarsen(...).sum()``, the calibration follows (probe step, pixel
    size and beam centre, :func:`binned_calibration`), and with it the coordinates.

    Parameters
    ----------
    data
        A DataArray of dims (rx, ry, qx, qy) (its calibration attributes are converted, the
        others kept), or a NumPy or dask array of shape (RX, RY, QX, QY) of counts.
    scan, q
        Positions per block along ``rx`` and ``ry``, pixels per block along ``qx`` and ``qy``
        (:func:`binned`); at least 1 and at most the scan's (the pattern's) smaller side.

    Returns
    -------
    xarray.DataArray of dims (rx, ry, qx, qy), of shape (RX // scan, RY // scan, QX // q,
    QY // q) and :func:`summed_dtype`: lazy, or in memory where ``data`` was; coordinates
    (where ``data`` has them) as :func:`stemlib.calibration.scan_coords` gives them.

    Raises
    ------
    InputError
        A factor below 1 or larger than what it bins, or a ``data`` that is no scan
        (:func:`stemlib.scan.as_scan`).

    Examples
    --------
    >>> counts = xr.DataArray(np.ones((4, 4, 6, 6), np.uint16), dims=("rx", "ry", "qx", "qy"),
    ...                       attrs={"origin_px": [3.0, 3.0], "probe_step_nm": 0.5})
    >>> out = binned_scan(counts, scan=2, q=2)
    >>> out.shape, out.dtype, int(out[0, 0, 0, 0])
    ((2, 2, 3, 3), dtype('uint32'), 16)
    >>> out.attrs["origin_px"], out.attrs["probe_step_nm"]
    ([1.25, 1.25], 1.0)
    """
    labelled = as_scan(data, name="data")
    for name, factor, sides in (("scan", scan, labelled.shape[:2]), ("q", q, labelled.shape[2:])):
        if not 1 <= factor <= min(sides):
            raise InputError(
                f"{name}={factor} cannot bin the {'scan' if name == 'scan' else 'patterns'} of "
                f"{sides[0]} x {sides[1]}; give 1 to {min(sides)}."
            )
    calibration = binned_calibration(Calibration.from_attrs(labelled.attrs), scan=scan, q=q)
    summed = binned(labelled.data, scan=scan, q=q)
    if not isinstance(labelled.data, da.Array):
        summed = summed.compute()
    coords = scan_coords(tuple(summed.shape), calibration)
    attrs = {k: v for k, v in labelled.attrs.items() if k not in Calibration.model_fields}
    return xr.DataArray(
        summed,
        dims=DIMS,
        coords={d: coords[d] for d in DIMS if d in labelled.coords},
        attrs={**attrs, **calibration.to_attrs()},
        name=labelled.name,
    )


def binned_calibration(calibration: Calibration, *, scan: int = 1, q: int = 1) -> Calibration:
    """``calibration`` of the scan :func:`binned` by ``scan`` positions and ``q`` pixels.

    The probe step (nm) and the detector pixel size grow by their factors; the direct beam's
    pixel ``o`` becomes ``(o - (q - 1) / 2) / q`` (pixel ``j`` of the binned detector covers
    pixels ``q j`` to ``q j + q - 1``, centred half-way). Beam energy,
    convergence angle and the scan's rotation against the detector do not change.

    Examples
    --------
    >>> cal = Calibration(probe_step_nm=0.5, q_pixel_size=0.01, origin_px=(63.5, 64.0))
    >>> binned = binned_calibration(cal, scan=2, q=2)
    >>> binned.probe_step_nm, binned.q_pixel_size, binned.origin_px
    (1.0, 0.02, (31.5, 31.75))
    """
    update: dict[str, object] = {}
    if calibration.probe_step_nm is not None:
        update["probe_step_nm"] = calibration.probe_step_nm * scan
    if calibration.q_pixel_size is not None:
        update["q_pixel_size"] = calibration.q_pixel_size * q
    if calibration.origin_px is not None:
        update["origin_px"] = tuple((o - (q - 1) / 2) / q for o in calibration.origin_px)
    return calibration.model_copy(update=update)


def crop_truth(truth: xr.Dataset, region: tuple[int, int, int, int]) -> xr.Dataset:
    """Per-position truth maps (dims ``rx, ry``) of the positions :func:`crop_scan` keeps."""
    x0, x1, y0, y1 = region
    return truth.isel(rx=slice(x0, x1), ry=slice(y0, y1))


def binned_truth(truth: xr.Dataset, factor: int) -> xr.Dataset:
    """Truth maps of the positions :func:`binned` makes of ``factor`` x ``factor`` blocks (the
    truth of a scan binned with :func:`binned_scan`, to score its maps against).

    A binned position lies in one grain when all its ``factor`` x ``factor`` positions do (by
    ``grain_id``; without one, when their truth agrees): its strain is their mean, its rotation
    their mean over the lattice's symmetry (the truth's ``symmetry`` or ``truth_symmetry``
    attribute), and it is in the reference region when all of them are. A position that spans
    grains or vacuum has no truth (NaN, ``grain_id`` -1): no method is scored there.

    Parameters
    ----------
    truth
        Maps of dims (rx, ry): ``truth_exx, truth_eyy, truth_exy`` ("1"), ``truth_theta`` (rad)
        (:func:`stemlib.truth.truth_dataset`, a scan store's truth, the dataset
        :func:`stemlib.simulate.simulate` returns) or the same without the prefix
        (:func:`stemlib.truth.open_truth`), optional ``grain_id`` and ``reference_mask``.
        Variables of other dims (a simulation's patterns) are left out.
    factor
        Positions per block along ``rx`` and ``ry``.

    Returns
    -------
    xarray.Dataset of dims (rx, ry) of shape (RX // factor, RY // factor), the same maps under
    the same names and the same attributes, without coordinates (the scan store sets them).

    Examples
    --------
    >>> from stemlib.simulate import SimulationConfig, simulate
    >>> sim = simulate(SimulationConfig(scan=(8, 6), pattern=32, grains=2))
    >>> binned_truth(sim, 2)["truth_exx"].shape
    (4, 3)
    """
    if factor == 1:
        return truth
    prefix = "truth_" if "truth_exx" in truth else ""
    maps = [name for name, var in truth.data_vars.items() if var.dims == ("rx", "ry")]
    rx, ry = truth.sizes["rx"] // factor, truth.sizes["ry"] // factor

    def blocks(name: str) -> np.ndarray:
        values = np.asarray(truth[name].values)[: rx * factor, : ry * factor]
        return values.reshape(rx, factor, ry, factor).transpose(0, 2, 1, 3).reshape(rx, ry, -1)

    if "grain_id" in truth:
        grains = blocks("grain_id")
        one = (grains == grains[..., :1]).all(-1) & (grains[..., 0] >= 0)
    else:
        strains = (f"{prefix}{c}" for c in ("exx", "eyy", "exy"))
        one = np.all([np.ptp(blocks(n), axis=-1) < 1e-9 for n in strains], axis=0)
    symmetry = truth.attrs.get("symmetry") or truth.attrs.get("truth_symmetry") or 1
    out = xr.Dataset(attrs=dict(truth.attrs))
    for name in maps:
        var, values = truth[name], blocks(str(name))
        if name == f"{prefix}theta":
            turns = np.exp(1j * int(symmetry) * values.astype(np.float64)).mean(-1)
            mean = np.angle(turns) / int(symmetry)
        elif name == "grain_id":
            mean = values[..., 0]
        elif name == "reference_mask":
            mean = values.all(-1)
        else:
            mean = values.astype(np.float64).mean(-1)
        if name == "grain_id":
            mean = np.where(one, mean, -1)
        elif name != "reference_mask":
            mean = np.where(one, mean, np.nan)
        else:
            mean = mean & one
        out[name] = (("rx", "ry"), mean.astype(var.dtype, copy=False), dict(var.attrs))
    return out
