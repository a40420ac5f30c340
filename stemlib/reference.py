"""The reference region of a strain map: parsed from the user's ``--reference`` or found.

Strain is measured against the lattice of a reference region of the scan (CONVENTIONS.md
section 2). A user names it as ``"auto"``, a rectangle of probe positions
``"RX0:RX1,RY0:RY1"`` (half-open, like Python slices), or a boolean ``mask.npy`` of the scan's
shape; ``"auto"`` takes the largest connected region whose lattice is the same everywhere.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import warnings
from typing import TypeAlias

import dask.array as da
import numpy as np
import xarray as xr
from scipy.ndimage import binary_dilation
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import InputError
from .io.storage import Location, locate, redact, storage_errors

__all__ = [
    "ReferenceLike",
    "parse_reference",
    "reference_name",
    "check_reference",
    "rectangle",
    "check_rectangle",
    "REGION_PATTERN",
    "auto_reference",
    "describe_reference",
    "region_mean",
    "strained_reference_warning",
    "near_symmetry_warning",
    "reference_warnings",
    "STRAINED_REFERENCE_LIMIT",
]

#: Median anisotropy of the strain maps above which the reference looks strained (unitless).
#: Against their true, unstrained reference, 80 simulated scans of the paper's protocol (8 or 12
#: grains, strain within +-2 %) leave at most 1.9 %; against the largest grain, which "auto"
#: takes and which is strained, the multislice Si and WS2 development scans leave 4.1 and 4.0 %.
STRAINED_REFERENCE_LIMIT = 0.025

log = logging.getLogger("stemlib.reference")

#: A reference region as the strain methods take it: ``"auto"``, ``"RX0:RX1,RY0:RY1"``, a
#: ``.npy`` path, or a boolean mask of shape (RX, RY) in memory.
ReferenceLike: TypeAlias = "str | np.ndarray | xr.DataArray"

#: A rectangle of scan indices, "RX0:RX1,RY0:RY1" (an empty bound: the scan's edge).
REGION_PATTERN = r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*,\s*(-?\d*)\s*:\s*(-?\d*)\s*$"
_REGION = re.compile(REGION_PATTERN)


def parse_reference(spec: ReferenceLike, scan_shape: tuple[int, int]) -> np.ndarray | None:
    """The reference region named by ``spec``.

    Parameters
    ----------
    spec
        ``"auto"``; a rectangle ``"RX0:RX1,RY0:RY1"`` of scan indices (half-open; an empty bound
        means the scan's edge); the path or URL of a ``.npy`` boolean mask; or a boolean mask of
        shape (RX, RY) itself (NumPy array or DataArray, such as a simulated scan's
        ``reference_mask``).
    scan_shape
        (RX, RY) of the scan.

    Returns
    -------
    ndarray of shape (RX, RY), bool, or None
        None for ``"auto"`` (see :func:`auto_reference`).

    Raises
    ------
    InputError
        For a rectangle outside the scan or empty, a mask of another shape or not boolean, or a
        file that cannot be read.

    Examples
    --------
    >>> parse_reference("auto", (4, 4)) is None
    True
    >>> parse_reference("0:2,1:3", (4, 4)).astype(int)
    array([[0, 1, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0],
           [0, 0, 0, 0]])
    """
    rx, ry = (int(n) for n in scan_shape)
    if not isinstance(spec, str):
        return _checked_mask(np.asarray(spec), (rx, ry), where="the reference mask")
    text = spec.strip()
    if text.lower() == "auto":
        return None
    if _REGION.match(text):
        x0, x1, y0, y1 = rectangle(text, (rx, ry))
        mask = np.zeros((rx, ry), bool)
        mask[x0:x1, y0:y1] = True
        return mask
    if text.endswith(".npy"):
        return _load_mask(text, (rx, ry))
    raise _not_understood(text)


def reference_name(spec: ReferenceLike) -> str:
    """How a result and a checkpoint name the reference: ``spec`` itself, or for a mask in
    memory its content, ``"mask sha256:<12 hex digits>"``.

    Examples
    --------
    >>> reference_name("0:8,0:8")
    '0:8,0:8'
    >>> reference_name(np.ones((2, 2), bool))
    'mask sha256:5d69f3a773fe'
    """
    if isinstance(spec, str):
        return spec
    mask = np.ascontiguousarray(np.asarray(spec, bool))
    digest = hashlib.sha256(f"{mask.shape}".encode() + mask.tobytes()).hexdigest()
    return f"mask sha256:{digest[:12]}"


def check_reference(spec: str) -> None:
    """Refuse a ``--reference`` that no scan could take, before any scan is read (what a run
    over many scans checks first): one not understood, a rectangle empty in any scan, or a
    mask file that does not exist. :func:`parse_reference` checks the rest against each scan.

    Examples
    --------
    >>> check_reference("8:,0:8")
    >>> try:
    ...     check_reference("8:4,0:8")
    ... except InputError as exc:
    ...     print(exc)
    --reference 8:4,0:8 is an empty region; give RX0:RX1,RY0:RY1 with RX0 < RX1 and RY0 < RY1.
    """
    text = str(spec).strip()
    if text.lower() == "auto":
        return
    if _REGION.match(text):
        check_rectangle(text)
    elif text.endswith(".npy"):
        _existing_mask(text)
    else:
        raise _not_understood(text)


def rectangle(
    text: str, scan_shape: tuple[int, int], *, flag: str = "--reference", where: str = "the scan"
) -> tuple[int, int, int, int]:
    """The rectangle ``"RX0:RX1,RY0:RY1"`` of scan indices (half-open; an empty bound means the
    scan's edge) as (RX0, RX1, RY0, RY1).

    Raises
    ------
    InputError
        For text of another form, an empty rectangle, or one outside ``scan_shape``, in one
        sentence naming ``flag`` and ``where`` (the scan).

    Examples
    --------
    >>> rectangle("8:,0:16", (32, 24))
    (8, 32, 0, 16)
    """
    rx, ry = (int(n) for n in scan_shape)
    x0, x1, y0, y1 = check_rectangle(text, flag=flag, scan_shape=(rx, ry))
    if min(x0, x1, y0, y1) < 0 or x1 > rx or y1 > ry:
        raise InputError(
            f"{flag} {text.strip()} lies outside {where} of {rx} x {ry} positions; give "
            f"RX0:RX1,RY0:RY1 with 0 <= RX0 < RX1 <= {rx} and 0 <= RY0 < RY1 <= {ry}."
        )
    return x0, x1, y0, y1


def check_rectangle(
    text: str,
    *,
    flag: str = "--reference",
    scan_shape: tuple[int, int] = (sys.maxsize, sys.maxsize),
) -> tuple[int, int, int, int]:
    """(RX0, RX1, RY0, RY1) of the rectangle ``text``, an empty bound at the edge of
    ``scan_shape``; refuses text of another form or an empty rectangle in any scan, naming
    ``flag``, before any scan is read."""
    text = text.strip()
    match = _REGION.match(text)
    if not match:
        raise InputError(f"{flag} {text!r} is not understood; give RX0:RX1,RY0:RY1 (e.g. 0:8,0:8).")
    edges = (0, scan_shape[0], 0, scan_shape[1])
    x0, x1, y0, y1 = (
        int(v) if v not in ("", "-") else edge
        for v, edge in zip(match.groups(), edges, strict=True)
    )
    if x0 >= x1 or y0 >= y1:
        raise InputError(
            f"{flag} {text} is an empty region; give RX0:RX1,RY0:RY1 with RX0 < RX1 and RY0 < RY1."
        )
    return x0, x1, y0, y1


def _not_understood(text: str) -> InputError:
    return InputError(
        f"--reference {text!r} is not understood; use auto, RX0:RX1,RY0:RY1 (e.g. 0:8,0:8) "
        "or a mask.npy file."
    )


def _existing_mask(url: str) -> Location:
    """The mask file at ``url``, or one sentence where it does not exist."""
    location = locate(url)
    if not location.exists():
        raise InputError(
            f"reference mask {redact(location.url)} does not exist; pass an existing .npy file."
        )
    return location


def _load_mask(url: str, shape: tuple[int, int]) -> np.ndarray:
    location = _existing_mask(url)
    where = f"reference mask {redact(location.url)}"
    try:
        with storage_errors(location.url), location.fs.open(location.path, "rb") as f:
            mask = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{where} is not a readable .npy array ({exc}); save it with numpy.save."
        ) from None
    return _checked_mask(mask, shape, where=where)


def _checked_mask(mask: np.ndarray, shape: tuple[int, int], *, where: str) -> np.ndarray:
    """``mask`` as a boolean array of the scan's ``shape`` selecting a position, or the
    sentence saying why it is not one."""
    if mask.shape != shape:
        raise InputError(f"{where} has shape {mask.shape}; it must have the scan shape {shape}.")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
            raise InputError(
                f"{where} holds {mask.dtype} values other than 0 and 1; save a boolean mask."
            )
        mask = mask.astype(bool)
    if not mask.any():
        raise InputError(f"{where} selects no position; mark the reference region True.")
    return mask


def auto_reference(
    matrices: np.ndarray, valid: np.ndarray, *, rtol: float = 0.01, min_positions: int = 4
) -> np.ndarray:
    """The largest connected region of consistent lattice.

    Neighbouring positions (4-connectivity) are linked when their matrices, each the median
    over its valid 3 x 3 neighbourhood, differ by at most ``rtol`` times the typical matrix
    norm (Frobenius), and each one's own matrix is that median, noise aside. The largest linked
    component is narrowed to the positions whose neighbourhood median lies within ``rtol`` of
    the region's and whose own matrix lies within the noise of single positions of the
    region's median (``rtol``, or twice the typical distance that noise makes, measured on
    second differences along rows and columns, which a steady gradient leaves at zero; at most
    ``4 rtol``), three times over, so that a component that leaked into a grain of a close
    lattice returns to its majority; then the positions next to it whose own matrix lies
    within that noise join it (its edge, where neighbourhoods are partly other grains').

    The cut stops a chain of small steps from drifting across a gradual change. The
    neighbourhood median keeps a grain's edges and takes out the noise of single positions,
    which broke every grain into pieces where linked directly (multislice Si at 1,000
    electrons per pattern, py4DSTEM's lattices: the largest region found held 20 of a grain's
    104 positions).

    Parameters
    ----------
    matrices
        (RX, RY, 2, 2) per-position lattice (reciprocal basis) or affine matrices, expressed on
        one branch (NaN where unknown).
    valid
        (RX, RY) bool, positions with an answer.
    rtol
        Relative tolerance (0.01 = 1 %: well below the strain differences between grains and
        above the noise of a lattice fit, once smoothed over neighbours).
    min_positions
        Fewest positions of an acceptable region.

    Returns
    -------
    ndarray of shape (RX, RY), bool

    Raises
    ------
    InputError
        If no region of at least ``min_positions`` consistent positions exists.

    Examples
    --------
    >>> m = np.broadcast_to(np.eye(2), (4, 6, 2, 2)).copy()
    >>> m[:, 4:] *= 1.05  # another lattice on the last two columns
    >>> int(auto_reference(m, np.ones((4, 6), bool)).sum())
    16
    """
    matrices = np.asarray(matrices, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(matrices).all(axis=(-1, -2))
    rx, ry = valid.shape
    if not valid.any():
        raise InputError(
            "no position has a lattice, so no reference region can be found; check the scan."
        )
    scale = float(np.median(np.linalg.norm(matrices[valid], axis=(-1, -2))))
    cut = min(max(rtol * scale, 2 * _noise_distance(matrices, valid)), 4 * rtol * scale)
    smooth = _neighbourhood_median(matrices, valid)
    # Linked only where the neighbourhood's median is the position's own lattice, noise aside:
    # elsewhere the neighbourhood holds several lattices and its median none of them.
    settled = valid & (_distance(matrices, smooth) <= cut)
    index = np.arange(rx * ry).reshape(rx, ry)
    rows, cols = [], []
    for axis in (0, 1):
        head = tuple(slice(1, None) if d == axis else slice(None) for d in (0, 1))
        tail = tuple(slice(None, -1) if d == axis else slice(None) for d in (0, 1))
        close = settled[head] & settled[tail]
        close &= _distance(smooth[head], smooth[tail]) <= rtol * scale
        rows.append(index[head][close])
        cols.append(index[tail][close])
    rows_, cols_ = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows_)), (rows_, cols_)), shape=(rx * ry, rx * ry))
    _, labels = connected_components(graph, directed=False)
    labels = np.where(settled.ravel(), labels, -1)
    region = np.zeros((rx, ry), bool)
    if settled.any():
        linked = (labels == np.argmax(np.bincount(labels[labels >= 0]))).reshape(rx, ry)
        region = linked
        for _ in range(3):  # a component that leaked into a close grain: back to its majority
            median = np.median(smooth[region], axis=0)
            region = linked & (_distance(smooth, median) <= rtol * scale)
            if not region.any():
                break
            region &= _distance(matrices, np.median(matrices[region], axis=0)) <= cut
        if region.any():  # and its edge, whose neighbourhoods are partly other grains'
            edge = binary_dilation(region) & valid
            region |= edge & (_distance(matrices, np.median(matrices[region], axis=0)) <= cut)
    if region.sum() < min_positions:
        raise InputError(
            f"no region of at least {min_positions} neighbouring positions shares one lattice; "
            "pass --reference RX0:RX1,RY0:RY1 or a mask.npy."
        )
    return region


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Frobenius distance between matrices (..., 2, 2), 0 where either is NaN."""
    return np.linalg.norm(np.nan_to_num(a - b), axis=(-1, -2))


def _noise_distance(matrices: np.ndarray, valid: np.ndarray) -> float:
    """The typical distance (Frobenius) of one position's matrix (RX, RY, 2, 2) from its
    lattice's that noise alone makes: the median norm of the second differences
    ``m[i-1] - 2 m[i] + m[i+1]`` along rows and columns over three valid positions, over
    sqrt(6) (for independent noise a second difference has six times the variance of one
    position); 0 where no three neighbours in a line are valid.

    >>> m = np.broadcast_to(np.eye(2), (3, 40, 2, 2)) * (1 + 0.01 * np.arange(40))[:, None, None]
    >>> _noise_distance(m, np.ones((3, 40), bool)) < 1e-12  # a steady gradient is no noise
    True
    """
    norms = []
    for axis in (0, 1):
        n = valid.shape[axis]
        if n < 3:
            continue
        m, ok = (
            [np.take(a, range(k, n - 2 + k), axis=axis) for k in range(3)]
            for a in (matrices, valid)
        )
        second = m[0] - 2 * m[1] + m[2]
        norms.append(np.linalg.norm(second[ok[0] & ok[1] & ok[2]], axis=(-1, -2)))
    joined = np.concatenate(norms) if norms else np.empty(0)
    return float(np.median(joined)) / np.sqrt(6) if joined.size else 0.0


def _neighbourhood_median(matrices: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each valid position's matrix (RX, RY, 2, 2) replaced by the element-wise median over the
    valid positions of its 3 x 3 neighbourhood; NaN elsewhere.

    >>> m = np.zeros((3, 3, 2, 2))
    >>> m[1, 1] = 9.0  # one outlier among neighbours that agree
    >>> float(_neighbourhood_median(m, np.ones((3, 3), bool))[1, 1, 0, 0])
    0.0
    """
    rx, ry = valid.shape
    padded = np.full((rx + 2, ry + 2, 2, 2), np.nan)
    padded[1:-1, 1:-1] = np.where(valid[..., None, None], matrices, np.nan)
    windows = np.stack(
        [padded[i : i + rx, j : j + ry] for i in range(3) for j in range(3)]
    )  # (9, RX, RY, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows of invalid positions
        smoothed = np.nanmedian(windows, axis=0)
    return np.where(valid[..., None, None], smoothed, np.nan)


def describe_reference(spec: str, mask: np.ndarray) -> str:
    """A short description for the result's attributes, e.g. ``"auto: 120 positions"``."""
    return f"{str(spec).strip()}: {int(mask.sum())} positions"


def strained_reference_warning(
    strain: dict[str, np.ndarray],
    valid: np.ndarray,
    *,
    reference: str,
    limit: float = STRAINED_REFERENCE_LIMIT,
) -> str | None:
    """A warning sentence when the strain maps say that their reference region is strained.

    Against an unstrained reference, grains of various strains leave a median anisotropy,
    ``|(exx - eyy) + 2i exy|`` with each part's median over the valid positions, near 0; against
    a strained reference every position carries the reference's own anisotropy with the sign
    turned. A strained reference also reads as an elliptic detector, which both methods then
    remove (:mod:`stemlib.ellipse`), and the methods no longer agree.

    Parameters
    ----------
    strain
        ``exx, eyy, exy`` maps ("1"), each (RX, RY), in the detector frame.
    valid
        (RX, RY) bool: the positions with an answer.
    reference
        How the region was named, for the sentence (:func:`describe_reference`).
    limit
        Median anisotropy above which to warn (:data:`STRAINED_REFERENCE_LIMIT`).

    Returns
    -------
    str or None
        The sentence, or None when the maps give no sign of a strained reference.

    Examples
    --------
    >>> flat = np.zeros((4, 4))
    >>> strain_of = lambda exx: {"exx": np.full((4, 4), exx), "eyy": flat, "exy": flat}
    >>> strained_reference_warning(strain_of(0.01), np.ones((4, 4), bool), reference="auto")
    >>> strained_reference_warning(strain_of(-0.04), np.ones((4, 4), bool), reference="auto")[:49]
    'the strain maps show a median anisotropy of 4.0 %'
    """
    use = np.asarray(valid, bool)
    if not use.any():
        return None
    parts = [
        np.median(np.asarray(strain["exx"])[use] - np.asarray(strain["eyy"])[use]),
        np.median(2 * np.asarray(strain["exy"])[use]),
    ]
    anisotropy = float(np.hypot(*parts))
    if anisotropy <= limit:
        return None
    return (
        f"the strain maps show a median anisotropy of {100 * anisotropy:.1f} % (exx - eyy and "
        f"2 exy) against the reference region {reference}, above the {100 * limit:g} % that "
        "grains of random strain leave against an unstrained one: the reference region looks "
        "strained (and may have been taken for an elliptic detector); pass --reference with a "
        "region known to be unstrained."
    )


def near_symmetry_warning(g_ref: np.ndarray, *, reference: str) -> str | None:
    """A warning sentence when a reference lattice taken as 2-fold is nearly square or
    hexagonal (lengths within 8 %, angle within 8 deg), as a strained reference of a 4- or 6-fold
    crystal is: the multislice Si development scan's largest grain, strained by 2.1, -0.6 and
    1.5 %, has basis lengths 3.7 % apart.

    Parameters
    ----------
    g_ref
        (2, 2) reference basis, columns ``g1, g2`` (any unit).
    reference
        How the region was named, for the sentence (:func:`describe_reference`).

    Examples
    --------
    >>> near_symmetry_warning(np.array([[20.0, 0.0], [0.0, 25.0]]), reference="auto")
    >>> near_symmetry_warning(np.array([[20.0, 0.0], [0.0, 20.8]]), reference="auto")[:60]
    'the lattice of the reference region auto was taken as 2-fold'
    """
    from .strain import detect_symmetry

    if detect_symmetry(g_ref) != 2:
        return None
    near = detect_symmetry(g_ref, length_tol=0.08, angle_tol_deg=8.0)
    if near == 2:
        return None
    return (
        f"the lattice of the reference region {reference} was taken as 2-fold, but it is within "
        f"8 % and 8 deg of {near}-fold, as a strained reference of a {near}-fold crystal is; if "
        f"the crystal is {near}-fold, pass --symmetry {near} and --reference with a region "
        "known to be unstrained."
    )


def reference_warnings(
    strain: dict[str, np.ndarray],
    valid: np.ndarray,
    *,
    reference: str,
    lattice: np.ndarray | None = None,
) -> list[str]:
    """Every warning a strain result gets about its reference region, each also logged: the
    maps' sign of a strained reference (:func:`strained_reference_warning`) and, given the
    reference ``lattice`` whose symmetry was detected, its nearness to a higher symmetry
    (:func:`near_symmetry_warning`).

    Parameters
    ----------
    strain, valid, reference
        As :func:`strained_reference_warning`.
    lattice
        (2, 2) reference basis when the symmetry was taken from it, else None.

    Returns
    -------
    list of str
        The sentences, for the result's ``methods.<name>.warnings``.
    """
    found = [
        near_symmetry_warning(lattice, reference=reference) if lattice is not None else None,
        strained_reference_warning(strain, valid, reference=reference),
    ]
    warnings = [w for w in found if w]
    for warning in warnings:
        log.warning(warning)
    return warnings


def region_mean(data: da.Array, mask: np.ndarray) -> np.ndarray:
    """The mean pattern of a region, reading only the stored chunks that hold one of its positions.

    Parameters
    ----------
    data
        Lazy scan of shape (RX, RY, QX, QY).
    mask
        (RX, RY) bool, not empty.

    Returns
    -------
    ndarray of shape (QX, QY), float64, in the scan's intensity unit.

    Examples
    --------
    >>> data = da.from_array(np.arange(64).reshape(4, 4, 2, 2), chunks=(2, 2, 2, 2))
    >>> mask = np.zeros((4, 4), bool)
    >>> mask[0, 0] = mask[3, 3] = True
    >>> region_mean(data, mask)
    array([[30., 31.],
           [32., 33.]])
    """
    mask = np.asarray(mask, bool)
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in data.chunks[:2]]
    parts = []
    for i in range(data.numblocks[0]):
        for j in range(data.numblocks[1]):
            inside = mask[offsets[0][i] : offsets[0][i + 1], offsets[1][j] : offsets[1][j + 1]]
            if inside.any():
                block = data.blocks[i, j]
                flat = block.reshape((-1,) + block.shape[2:])
                parts.append(flat[np.flatnonzero(inside)].astype(np.float64).sum(axis=0))
    return np.asarray(da.stack(parts).sum(axis=0).compute()) / mask.sum()
