"""The direct beam in a mean diffraction pattern: where it is and how large."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["beam_centre", "beam_radius", "direct_beam", "misplaced_origin"]


def beam_radius(mean_pattern: np.ndarray, *, center: tuple[float, float]) -> float:
    """Radius (px) of the direct-beam disk in a mean pattern of shape (H, W).

    The radius where the azimuthal mean about ``center`` (qx, qy) px falls most steeply
    (gradient x radius, so the sharp centre of a Lorentzian background does not win), searched
    from 2 px to a quarter of the pattern.

    Examples
    --------
    >>> rows, cols = np.indices((64, 64))
    >>> beam_radius((np.hypot(rows - 30, cols - 36) <= 8).astype(float), center=(30, 36))
    8.0
    """
    h, w = mean_pattern.shape
    rows, cols = np.indices((h, w))
    r = np.hypot(rows - center[0], cols - center[1])
    bins = np.round(r).astype(int)
    profile = np.bincount(bins.ravel(), mean_pattern.ravel()) / np.maximum(
        np.bincount(bins.ravel()), 1
    )
    radii = np.arange(len(profile))
    strength = -np.gradient(profile) * radii
    lo, hi = 2, max(3, min(h, w) // 4)
    return float(radii[lo:hi][np.argmax(strength[lo:hi])])


def direct_beam(mean_pattern: np.ndarray) -> tuple[tuple[float, float], float]:
    """The direct beam's centre (qx, qy) px and radius (px) in a mean pattern (QX, QY),
    wherever it is on the detector.

    The centre is the centroid of the connected region, above half its peak, around the
    brightest pixel after a 3 x 3 median (a hot pixel is not a beam); the radius is
    :func:`beam_radius` about that centre (a beam brighter in its middle has a half-maximum
    well inside its edge). A pattern with nothing above zero gives the detector's centre and an
    eighth of its size.

    Examples
    --------
    >>> rows, cols = np.indices((64, 64))
    >>> beam = (np.hypot(rows - 30.0, cols - 36.0) <= 8).astype(float)
    >>> beam[3, 5] = 1e6  # a hot pixel
    >>> direct_beam(beam)
    ((30.0, 36.0), 8.0)
    """
    image = ndimage.median_filter(np.asarray(mean_pattern, np.float64), size=3, mode="nearest")
    h, w = image.shape
    peak = float(image.max())
    if not peak > 0:
        return ((h - 1) / 2, (w - 1) / 2), min(h, w) / 8
    labels, _ = ndimage.label(image > 0.5 * peak)
    beam = labels == labels[np.unravel_index(np.argmax(image), image.shape)]
    qx, qy = (float(c) for c in ndimage.center_of_mass(beam))
    return (qx, qy), beam_radius(image, center=(qx, qy))


def beam_centre(
    mean_pattern: np.ndarray, *, expected: tuple[float, float], tolerance: float = 1.0
) -> tuple[float, float]:
    """The direct beam's centre (qx, qy) px in a mean pattern (QX, QY): ``expected``, unless the
    measured centre (:func:`direct_beam`) lies over ``tolerance`` px from it and the pattern is
    brighter there (the mean over the beam's disk), then the measured one.

    ``expected`` is what the scan records (its calibration's ``origin_px``) or, without one, the
    detector's centre. A beam seldom sits at the centre of a real detector, and a calibration
    can be stale (a detector binned after it was recorded); where either agrees with the
    patterns it is kept, to the digit.

    Examples
    --------
    >>> rows, cols = np.indices((64, 64))
    >>> beam = (np.hypot(rows - 20.0, cols - 41.0) <= 6).astype(float)
    >>> beam_centre(beam, expected=(32.0, 32.0)), beam_centre(beam, expected=(20.4, 41.3))
    ((20.0, 41.0), (20.4, 41.3))
    """
    image = np.asarray(mean_pattern, np.float64)
    measured, radius = direct_beam(image)
    return _kept_or_measured(image, expected, measured, radius, tolerance)


def _disk_mean(image: np.ndarray, centre: tuple[float, float], radius: float) -> float:
    """Mean of ``image`` over the disk of ``radius`` px (at least 1) about ``centre`` (qx, qy);
    -inf where the disk holds no pixel."""
    rows, cols = np.indices(image.shape)
    disk = np.hypot(rows - centre[0], cols - centre[1]) <= max(radius, 1.0)
    return float(image[disk].mean()) if disk.any() else -np.inf


def _kept_or_measured(
    image: np.ndarray,
    expected: tuple[float, float],
    measured: tuple[float, float],
    radius: float,
    tolerance: float,
) -> tuple[float, float]:
    """:func:`beam_centre`'s choice, given the beam :func:`direct_beam` measured in ``image``."""
    kept = (float(expected[0]), float(expected[1]))
    if np.hypot(measured[0] - kept[0], measured[1] - kept[1]) <= tolerance:
        return kept
    if _disk_mean(image, kept, radius) >= _disk_mean(image, measured, radius):
        return kept
    return measured


def misplaced_origin(
    mean_pattern: np.ndarray, origin: tuple[float, float]
) -> tuple[float, float] | None:
    """The direct beam's centre (qx, qy) px in a mean pattern (QX, QY) where a recorded
    ``origin`` (qx, qy) px lies outside the beam's disk (farther than its radius) and
    :func:`beam_centre` takes the measured centre over it; else None: the record is good, lies
    off the pattern (no position to compare), or the pattern shows no beam (its brightest disk
    not above twice the pattern's median).

    Examples
    --------
    >>> rows, cols = np.indices((64, 64))
    >>> beam = (np.hypot(rows - 20.0, cols - 41.0) <= 6).astype(float)
    >>> misplaced_origin(beam, (32.0, 32.0)), misplaced_origin(beam, (22.0, 39.0))
    ((20.0, 41.0), None)
    """
    image = np.asarray(mean_pattern, np.float64)
    if not all(0 <= o < n for o, n in zip(origin, image.shape, strict=True)):
        return None
    measured, radius = direct_beam(image)
    if not _disk_mean(image, measured, radius) > 2 * np.median(image):
        return None
    centre = _kept_or_measured(image, origin, measured, radius, tolerance=1.0)
    if np.hypot(centre[0] - origin[0], centre[1] - origin[1]) <= radius:
        return None
    return centre
