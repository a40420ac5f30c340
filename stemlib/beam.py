"""The direct beam in a mean diffraction pattern: where it is and how large."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["beam_radius", "direct_beam"]


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
