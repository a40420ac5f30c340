"""The py4DSTEM baseline end to end: calibrate, detect on Dask workers, fit, strain."""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from ..calibration import Calibration
from ..ellipse import detector_distortion, undistort_lattice
from ..errors import InputError
from ..io.scan_store import finite_counts, scan_label
from ..progress import Counter, Progress, computed_by_blocks, reporter
from ..provenance import input_provenance
from ..reference import (
    ReferenceLike,
    auto_reference,
    describe_reference,
    parse_reference,
    reference_name,
    reference_warnings,
    region_mean,
)
from ..results import strain_dataset
from ..scan import ScanLike, as_scan
from ..strain import detect_symmetry, reference_lattice
from ..types import SCAN_DIMS, Symmetry
from .calibrate import DetectionSetup, calibrate
from .config import Py4DSTEMConfig
from .convention import strain_from_bases
from .detect import RECORD_FIELDS, detect_lattices_in, expected_origin, process_block
from .lattice import align_bases

__all__ = ["METHOD", "py4dstem_strain", "lattice_records", "region_lattice"]

#: The ``method`` label of this baseline's results.
METHOD = "py4dstem"


def _divisor_at_most(n: int, most: int) -> int:
    return max(d for d in range(1, min(n, max(1, most)) + 1) if n % d == 0)


def _blocks(data: da.Array, most: int) -> da.Array:
    """``data`` in blocks of at most ``most`` patterns that tile its stored chunks (so a task
    reads within one chunk)."""
    crx, cry = data.chunks[0][0], data.chunks[1][0]
    if crx * cry <= most:
        return data
    bry = _divisor_at_most(cry, math.isqrt(most))
    brx = _divisor_at_most(crx, most // bry)
    return data.rechunk((brx, bry) + data.shape[2:])


def lattice_records(
    data: da.Array, setup: DetectionSetup, *, block_patterns: int = 256
) -> da.Array:
    """Disk detection and per-pattern lattice fit over the whole scan, lazily: one Dask task per
    block, each reading only its own block of the scan.

    Parameters
    ----------
    data
        Lazy scan of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2).
    setup
        Kernel and parameters from :func:`stemlib.py4dstem.calibrate.calibrate`.
    block_patterns
        Most patterns per task (blocks never straddle a stored chunk).

    Returns
    -------
    dask.array.Array of shape (RX, RY, len(RECORD_FIELDS)), float64
        Per-position records (see :data:`stemlib.py4dstem.detect.RECORD_FIELDS`).
    """
    blocks = _blocks(data, block_patterns)
    kernel = da.from_array(
        setup.kernel,
        chunks=setup.kernel.shape,
        name="stemflow-py4dstem-kernel-" + tokenize(setup.kernel),
    )
    return da.map_blocks(
        process_block,
        blocks,
        kernel,
        params=setup.params,
        dtype=np.float64,
        drop_axis=[2, 3],
        new_axis=[2],
        chunks=blocks.chunks[:2] + ((len(RECORD_FIELDS),),),
        meta=np.empty((0, 0, 0), np.float64),
        name="stemflow-py4dstem-" + tokenize(blocks, setup.kernel, setup.params),
    )


def region_lattice(
    data: da.Array,
    mask: np.ndarray,
    config: Py4DSTEMConfig | None = None,
    *,
    where: str = "the scan",
) -> np.ndarray:
    """The lattice of a region's mean pattern, by py4DSTEM's disk detection and the lattice fit.

    The mean of a grain's patterns keeps their disks and averages their noise away, so this
    measures the region's lattice on the detector far better than any one pattern (the
    detection set-up is measured on the scan as in :func:`py4dstem_strain`).

    Parameters
    ----------
    data
        Lazy scan of shape (RX, RY, QX, QY).
    mask
        (RX, RY) bool: the region (one grain, e.g. the reference region).
    config
        Detection overrides.
    where
        The scan's name, for messages.

    Returns
    -------
    ndarray of shape (2, 2)
        Reciprocal basis, columns ``g1, g2`` as ``(qx, qy)`` px.

    Raises
    ------
    InputError
        If the mean pattern shows no lattice of Bragg disks.
    """
    config = config or Py4DSTEMConfig()
    setup = calibrate(data, config, where=where)
    rx, ry = np.argwhere(mask).mean(axis=0)
    expected = expected_origin(np.array([rx]), np.array([ry]), setup.params.origin_plane)
    _, _, records = detect_lattices_in(
        region_mean(data, mask)[None], expected, setup.kernel, setup.params
    )
    basis = records[0, 2:6].reshape(2, 2).T
    if not np.isfinite(basis).all():
        raise InputError(
            f"the mean pattern of {where}'s reference region shows no lattice of Bragg disks; "
            "choose another reference region, or give the ellipse in the config."
        )
    return basis


def _anchor(
    bases: np.ndarray, valid: np.ndarray, n_disks: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    """The basis of the best-fitted position (inside ``mask`` if it has a valid one)."""
    pool = valid & mask if mask is not None and (valid & mask).any() else valid
    score = np.where(pool, n_disks, -1)
    return bases[np.unravel_index(np.argmax(score), score.shape)]


def _descan(records: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """Plane fitted to the measured direct beam over the scan, and its RMS residual (px)."""
    rx, ry = np.nonzero(valid)
    if len(rx) < 3:
        return {}
    design = np.column_stack([np.ones(len(rx)), rx, ry]).astype(float)
    origins = records[rx, ry, :2]
    coef = np.linalg.lstsq(design, origins, rcond=1e-9)[0]
    rms = float(np.sqrt(np.mean(np.sum((origins - design @ coef) ** 2, axis=1))))
    return {
        "origin_plane_px": [float(v) for v in (*coef[:, 0], *coef[:, 1])],
        "origin_plane_terms": "qx = c0 + c1 rx + c2 ry, then qy likewise (scan indices)",
        "origin_plane_rms_px": rms,
    }


def py4dstem_strain(
    scan: ScanLike,
    *,
    reference: ReferenceLike = "auto",
    symmetry: Symmetry = "auto",
    config: Py4DSTEMConfig | None = None,
    progress: Progress = True,
) -> xr.Dataset:
    """Strain, shear and rotation maps by py4DSTEM's template-correlation disk detection and a
    per-pattern lattice fit, in stemflow's convention.

    1. Detection set-up measured on a sample of the scan (no hand tuning): direct-beam radius
       and edge, vacuum or synthetic template and py4DSTEM's sigmoid kernel, noise threshold,
       the lattice's shape and the descan (see :mod:`stemlib.py4dstem.calibrate`).
    2. py4DSTEM's ``find_Bragg_disks`` (sub-pixel ``multicorr``) on every block of the scan, one
       Dask task per block; each pattern's own basis is found among its disks and refined by an
       intensity-weighted least-squares fit of every indexed disk (any grain rotation).
    3. The reference lattice is the median over the reference region; the detector's elliptic
       distortion, measured on it (a square or hexagonal lattice is isotropic) or given, is
       removed from every basis (:mod:`stemlib.ellipse`).
    4. Every basis put on the reference's branch under the lattice symmetry; strain and
       rotation by :func:`stemlib.strain.strain_from_lattice`.

    Parameters
    ----------
    scan
        Lazy DataArray with dims (rx, ry, qx, qy) (``qx`` = pattern rows, axis 2), as
        :func:`stemlib.io.open_scan` returns (attrs carry calibration and provenance), or a
        NumPy or dask array of shape (RX, RY, QX, QY) or a DataArray of those dims without
        attributes (:func:`stemlib.scan.as_scan`).
    reference
        ``"auto"`` (largest region of consistent lattice), ``"RX0:RX1,RY0:RY1"``, or a boolean
        mask of shape (RX, RY), in memory or the path of a ``.npy`` file (see
        :func:`stemlib.reference.parse_reference`).
    symmetry
        n of the projected lattice's n-fold symmetry (2, 4 or 6) for the rotation branch;
        ``"auto"`` measures it on the reference lattice.
    config
        Overrides of the measured detection parameters (:class:`Py4DSTEMConfig`).
    progress
        A line per quarter of the scan's patterns through the disk detection
        (:mod:`stemlib.progress`): True prints them on stderr, a function (such as a logger's
        ``info``) receives them, False says nothing.

    Returns
    -------
    xarray.Dataset
        :func:`stemlib.results.strain_dataset` with method ``"py4dstem"``: ``exx, eyy, exy``
        ("1", detector frame, tensor shear), ``theta`` (rad, from +qx towards +qy, wrapped into
        ``(-pi/n, pi/n]``), ``valid`` (at least ``min_disks`` Bragg disks indexed; NaN
        elsewhere), extras ``n_disks``, ``fit_residual`` (px), ``origin_qx, origin_qy`` (px, the
        measured direct beam) and ``reference_region``; the method's attributes hold the
        parameters used, the reference lattice, the detector ellipse, the descan plane and the
        coverage.

    Raises
    ------
    InputError
        For a scan that is not 4-dimensional (rx, ry, qx, qy), a reference region outside the
        scan, empty or of the wrong shape, a scan without Bragg disks, or a reference region
        without any measured lattice.

    References
    ----------
    Savitzky et al., "py4DSTEM: a software package for four-dimensional scanning transmission
    electron microscopy data analysis", Microsc. Microanal. 27, 712 (2021).

    Examples
    --------
    A simulated scan's patterns as a NumPy array; its grain 1 is turned by -0.742 rad:

    >>> from stemlib.simulate import SimulationConfig, simulate
    >>> sim = simulate(SimulationConfig(scan=(8, 8), pattern=64, grains=2, seed=1))
    >>> ds = py4dstem_strain(sim["data"].values, reference="0:8,4:8")
    >>> ds["exx"].dims, ds["exx"].attrs["units"], ds["theta"].attrs["units"]
    (('method', 'rx', 'ry'), '1', 'rad')
    >>> round(float(ds["theta"].sel({"method": "py4dstem"})[0, 0]), 3)
    -0.742
    """
    config = config or Py4DSTEMConfig()
    scan = as_scan(scan)
    where = scan_label(scan)
    data = finite_counts(scan)
    shape = (int(data.shape[0]), int(data.shape[1]))
    mask = parse_reference(reference, shape)
    if symmetry not in ("auto", 2, 4, 6):
        raise InputError(f"symmetry={symmetry!r} is not one of auto, 2, 4, 6.")

    setup = calibrate(data, config, where=where, attrs=scan.attrs)
    records = computed_by_blocks(
        lattice_records(data, setup, block_patterns=config.block_patterns),
        Counter(reporter(progress), "py4dstem: Bragg disks", shape[0] * shape[1]),
    )
    n_disks = np.nan_to_num(records[..., RECORD_FIELDS.index("n_disks")]).astype(int)
    bases = np.swapaxes(records[..., 2:6].reshape(shape + (2, 2)), -1, -2)
    fraction = np.nan_to_num(records[..., RECORD_FIELDS.index("indexed_fraction")])
    valid = (n_disks >= config.min_disks) & (fraction >= config.min_indexed_fraction)
    valid &= np.isfinite(bases).all(axis=(-1, -2))
    if not valid.any():
        raise InputError(
            f"{where} has no position with {config.min_disks} or more indexed Bragg disks; "
            "pass a diffraction scan of a crystal (or lower min_disks in --config)."
        )
    bases = np.where(valid[..., None, None], bases, np.nan)
    provisional = align_bases(bases, _anchor(bases, valid, n_disks, mask))
    if mask is None:
        mask = auto_reference(provisional, valid)
    g_ref = reference_lattice(provisional, mask)
    n = detect_symmetry(g_ref) if symmetry == "auto" else int(symmetry)
    distortion, ellipse = detector_distortion(config.ellipse, n, lambda: g_ref)
    maps = strain_from_bases(
        undistort_lattice(bases, distortion), undistort_lattice(g_ref, distortion), symmetry=n
    )

    coords = {d: scan.coords[d] for d in SCAN_DIMS if d in scan.coords}
    extras = {
        "n_disks": (n_disks, {"units": "1", "long_name": "Bragg disks indexed and fitted"}),
        "fit_residual": (
            records[..., RECORD_FIELDS.index("residual_px")],
            {
                "units": "px",
                "long_name": "weighted RMS distance of the fitted disks from the lattice",
            },
        ),
        "origin_qx": (
            records[..., 0],
            {"units": "px", "long_name": "lattice origin (direct beam) qx, measured"},
        ),
        "origin_qy": (
            records[..., 1],
            {"units": "px", "long_name": "lattice origin (direct beam) qy, measured"},
        ),
        "reference_region": (mask, {"units": "1", "long_name": "reference region"}),
    }
    described = describe_reference(reference_name(reference), mask)
    warnings = reference_warnings(
        maps, valid, reference=described, lattice=g_ref if symmetry == "auto" else None
    )
    attrs = {
        "reference": described,
        "symmetry": n,
        **input_provenance(scan),
    }
    method_attrs = {
        "method": "py4DSTEM template-correlation disk detection + per-pattern lattice fit",
        "reference": described,
        "parameters": setup.describe(),
        "config": config.model_dump(mode="json"),
        "symmetry": n,
        "reference_lattice_px": g_ref.T.tolist(),
        "reference_lattice_layout": "[[g1_qx, g1_qy], [g2_qx, g2_qy]] in detector px",
        "detector_ellipse": ellipse,
        "positions": int(valid.size),
        "invalid_positions": int((~valid).sum()),
        "warnings": warnings,
        **_descan(records, valid),
    }
    return strain_dataset(
        METHOD,
        **maps,
        valid=valid,
        coords=coords or None,
        extras=extras,
        attrs=attrs,
        method_attrs=method_attrs,
        calibration=Calibration.from_attrs(scan.attrs),
    )
