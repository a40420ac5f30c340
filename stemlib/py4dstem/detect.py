"""Disk detection and lattice fit of a block of patterns, as one Dask task runs it.

Disks are found by py4DSTEM's template correlation (``find_Bragg_disks`` on a stack of patterns,
sub-pixel ``multicorr`` refinement); each pattern's lattice is then indexed and fitted on its own
(:mod:`stemlib.py4dstem.lattice`). A block returns one small record per pattern (see
:data:`RECORD_FIELDS`), never the patterns themselves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ._import import load_py4dstem
from .convention import peaks_from_qpoints
from .lattice import index_pattern

__all__ = [
    "RECORD_FIELDS",
    "DetectionParameters",
    "detect_disks",
    "expected_origin",
    "beam_positions",
    "flatten_background",
    "detect_lattices_in",
    "process_block",
]

#: Per-pattern record of :func:`process_block`, in this order along its last axis.
RECORD_FIELDS = (
    "origin_qx",  # fitted lattice origin (the direct beam's place), px
    "origin_qy",
    "g1_qx",  # reduced reciprocal basis, px, det [g1 g2] > 0
    "g1_qy",
    "g2_qx",
    "g2_qy",
    "n_disks",  # Bragg disks indexed and fitted
    "residual_px",  # weighted RMS distance of the fitted disks from the lattice, px
    "n_peaks",  # Bragg correlation peaks detected (indexed or not)
    "indexed_fraction",  # fraction of the summed peak intensity that the lattice indexes
)


@dataclass(frozen=True)
class DetectionParameters:
    """Everything a worker needs besides the kernel: detection thresholds and lattice priors.

    Lengths in detector px; ``disk_radius`` is the direct beam's. ``origin_plane`` holds the
    direct beam's fitted descan, the
    coefficients ``(c0, c_rx, c_ry)`` of ``qx`` then of ``qy`` against the scan indices.
    """

    corr_power: float
    sigma_dp: float
    sigma_cc: float
    subpixel: str
    upsample_factor: int
    min_intensity: float
    min_relative: float
    min_spacing: float
    edge_boundary: int
    max_peaks: int
    disk_radius: float
    tolerance: float
    prior: tuple[float, float, float] | None
    prior_tolerance: float
    origin_plane: tuple[float, float, float, float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def detect_disks(
    patterns: np.ndarray, kernel: np.ndarray, params: DetectionParameters
) -> list[np.ndarray]:
    """Correlation peaks of each pattern with py4DSTEM's ``find_Bragg_disks``.

    Parameters
    ----------
    patterns
        (N, QX, QY) patterns (any real dtype; ``qx`` = rows).
    kernel
        (QX, QY) correlation kernel in py4DSTEM's layout (centred on pixel (0, 0)).

    Returns
    -------
    list of ndarray of shape (K, 3)
        Per pattern: ``qx, qy`` (px) and correlation intensity of each peak, brightest first.
    """
    load_py4dstem()
    from py4DSTEM.braggvectors.diskdetection import find_Bragg_disks

    stack = np.asarray(patterns, dtype=np.float64)
    if stack.shape[0] == 0:
        return []
    # py4DSTEM's sub-pixel step multiplies small complex matrices: BLAS threads only contend
    # with the other Dask workers (ten times slower on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        found = find_Bragg_disks(
            stack,
            kernel,
            corrPower=params.corr_power,
            sigma_dp=params.sigma_dp,
            sigma_cc=params.sigma_cc,
            subpixel=params.subpixel,
            upsample_factor=params.upsample_factor,
            minAbsoluteIntensity=params.min_intensity,
            minRelativeIntensity=params.min_relative,
            minPeakSpacing=params.min_spacing,
            edgeBoundary=params.edge_boundary,
            maxNumPeaks=params.max_peaks,
        )
    return [peaks_from_qpoints(q) for q in found]


def expected_origin(rx: np.ndarray, ry: np.ndarray, plane: tuple[float, ...]) -> np.ndarray:
    """Direct beam ``(qx, qy)`` px predicted by the descan plane at scan indices ``rx, ry``."""
    rx, ry = np.asarray(rx, float), np.asarray(ry, float)
    return np.stack(
        [plane[0] + plane[1] * rx + plane[2] * ry, plane[3] + plane[4] * rx + plane[5] * ry], -1
    )


def fit_records(
    peak_lists: list[np.ndarray], origins: np.ndarray, params: DetectionParameters
) -> np.ndarray:
    """Index and fit each pattern's peaks; returns (N, len(RECORD_FIELDS)) float64, NaN where no
    lattice was found (``n_disks`` 0 there)."""
    out = np.full((len(peak_lists), len(RECORD_FIELDS)), np.nan)
    prior = None if params.prior is None else np.asarray(params.prior)
    for i, (peaks, origin) in enumerate(zip(peak_lists, origins, strict=True)):
        out[i, 6], out[i, 8], out[i, 9] = 0.0, len(peaks), 0.0
        fit = index_pattern(
            peaks,
            origin,
            exclude_radius=1.5 * params.disk_radius,
            tolerance=params.tolerance,
            prior=prior,
            prior_tolerance=params.prior_tolerance,
        )
        if fit is None:
            continue
        out[i, 0:2] = fit.origin
        out[i, 2:6] = fit.basis.T.ravel()  # g1 (qx, qy), g2 (qx, qy)
        out[i, 6] = fit.n_disks
        out[i, 7] = fit.residual
        out[i, 9] = fit.indexed_fraction
    return out


def beam_positions(patterns: np.ndarray, expected: np.ndarray, radius: float) -> np.ndarray:
    """Direct-beam centre of each pattern: the centre of mass of the pixels above half the
    maximum within ``2 radius`` of the expected position, iterated twice (good to a fraction of
    a pixel: it only anchors the indexing and the beam mask).

    Parameters
    ----------
    patterns
        (N, QX, QY) patterns.
    expected
        (N, 2) expected ``(qx, qy)`` px (the calibrated descan).
    radius
        Direct-beam radius, px.

    Returns
    -------
    ndarray of shape (N, 2)
    """
    out = np.array(expected, np.float64, copy=True)
    n, h, w = patterns.shape
    half = int(math.ceil(2 * radius)) + 1  # a box that holds the window wherever it centres
    offsets = np.arange(-half, half + 1)
    for _ in range(2):
        # Each pattern's box about its current estimate (clipped to the pattern): the window's
        # pixels only, not the whole pattern.
        top = np.clip(np.round(out[:, 0]).astype(np.int64), 0, h - 1)
        left = np.clip(np.round(out[:, 1]).astype(np.int64), 0, w - 1)
        rows = top[:, None] + offsets  # (N, S)
        cols = left[:, None] + offsets
        inside_rows, inside_cols = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        box = patterns[
            np.arange(n)[:, None, None],
            np.clip(rows, 0, h - 1)[:, :, None],
            np.clip(cols, 0, w - 1)[:, None, :],
        ].astype(np.float64)
        qx, qy = rows[:, :, None].astype(np.float64), cols[:, None, :].astype(np.float64)
        window = (
            inside_rows[:, :, None]
            & inside_cols[:, None, :]
            & (
                (qx - out[:, 0, None, None]) ** 2 + (qy - out[:, 1, None, None]) ** 2
                <= (2 * radius) ** 2
            )
        )
        inside = np.where(window, box, -np.inf)
        peak = inside.reshape(n, -1).max(axis=1)
        weight = np.where(window & (box >= 0.5 * peak[:, None, None]), box, 0.0)
        total = weight.sum(axis=(1, 2))
        ok = total > 0
        out[ok, 0] = (weight * qx).sum(axis=(1, 2))[ok] / total[ok]
        out[ok, 1] = (weight * qy).sum(axis=(1, 2))[ok] / total[ok]
    return out


def flatten_background(
    patterns: np.ndarray, beams: np.ndarray, radius: float, *, quantile: float = 0.2
) -> np.ndarray:
    """Patterns less their radial background, with the direct beam removed.

    The background at distance ``q`` from the beam is the ``quantile`` of the pixels in the
    1-px ring at ``q`` (a low quantile: Bragg disks may cover half a ring); it takes away the
    smooth halo around the direct beam (thermal diffuse scattering, a Lorentzian noise
    background) whose slope would pull the correlation peaks of weak disks towards the centre.
    The direct beam itself is tapered to zero inside ``max(1.2 radius, radius + 1.5 px)`` (over a
    further ``0.3 radius + 0.5 px``; Bragg disks lie at least two radii out): it is often
    hundreds of
    times brighter than the Bragg disks, and py4DSTEM's DFT up-sampling of the correlation would
    ring across the pattern from its edge and shift weak disks by up to half a pixel.

    Parameters
    ----------
    patterns
        (N, QX, QY) patterns.
    beams
        (N, 2) direct-beam centres (px).
    radius
        Direct-beam radius (px).
    quantile
        Background quantile of each ring.

    Returns
    -------
    ndarray of shape (N, QX, QY), float64
    """
    qx, qy = np.indices(patterns.shape[1:], dtype=np.float64)
    out = np.empty(patterns.shape, np.float64)
    inner = max(1.2 * radius, radius + 1.5)  # clear of the beam's pixelated edge
    for n, (pattern, beam) in enumerate(zip(patterns, beams, strict=True)):
        r = np.hypot(qx - beam[0], qy - beam[1]).ravel()
        ring = r.astype(np.int64)
        values = np.asarray(pattern, np.float64).ravel()
        # Sort by ring, then value, in one float sort: ring + value scaled into [0, 1).
        low, span = values.min(), max(float(np.ptp(values)), 1e-300)
        keys = ring + (values - low) * (0.999 / span)
        keys.sort()
        counts = np.bincount(ring)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        filled = counts > 0
        picks = starts[filled] + (quantile * (counts[filled] - 1)).astype(np.int64)
        level = low + (keys[picks] - np.flatnonzero(filled)) * (span / 0.999)
        background = np.interp(r, np.flatnonzero(filled) + 0.5, level)
        taper = np.clip((r - inner) / (0.3 * radius + 0.5), 0.0, 1.0)
        taper = 0.5 - 0.5 * np.cos(np.pi * taper)
        out[n] = ((values - background) * taper).reshape(pattern.shape)
    return out


def detect_lattices_in(
    patterns: np.ndarray, expected: np.ndarray, kernel: np.ndarray, params: DetectionParameters
):
    """Beam, Bragg peaks and lattice record of each pattern of a stack (see :func:`process_block`).

    Returns
    -------
    beams : ndarray of shape (N, 2)
    peaks : list of ndarray of shape (K, 3)
    records : ndarray of shape (N, len(RECORD_FIELDS))
    """
    stack = np.asarray(patterns, np.float64)
    beams = beam_positions(stack, expected, params.disk_radius)
    peaks = detect_disks(flatten_background(stack, beams, params.disk_radius), kernel, params)
    return beams, peaks, fit_records(peaks, beams, params)


def process_block(
    block: np.ndarray, kernel: np.ndarray, *, params: DetectionParameters, block_info: Any = None
) -> np.ndarray:
    """One Dask task: find the beam, detect the Bragg disks, index and fit every pattern of a
    block.

    Parameters
    ----------
    block
        (crx, cry, QX, QY) patterns, read by this task from the scan store.
    kernel
        (QX, QY) correlation kernel.
    params
        Detection and fit parameters.
    block_info
        Dask's block information (the block's place in the scan, for the descan prior).

    Returns
    -------
    ndarray of shape (crx, cry, len(RECORD_FIELDS))
    """
    crx, cry = block.shape[:2]
    (x0, _), (y0, _) = block_info[0]["array-location"][:2] if block_info else ((0, crx), (0, cry))
    rx, ry = np.meshgrid(np.arange(x0, x0 + crx), np.arange(y0, y0 + cry), indexing="ij")
    expected = expected_origin(rx.ravel(), ry.ravel(), params.origin_plane)
    patterns = block.reshape((crx * cry,) + block.shape[2:])
    _, _, records = detect_lattices_in(patterns, expected, kernel, params)
    return records.reshape(crx, cry, len(RECORD_FIELDS))
