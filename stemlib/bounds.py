"""The Cramér-Rao bound: the least error any unbiased strain estimator can reach on a pattern.

A method's error means little without the error the data allow. For a clean pattern ``P``
(normalised to sum 1) recorded under the noise model of CONVENTIONS.md section 3, the expected
counts are ``lambda = N ((1 - w) P + w B)``. A strain moves the Bragg disks with the reciprocal
lattice: the pattern becomes ``P(o + A^-1 (q - o))`` for a (2, 2) map ``A`` near ``I`` about
the direct beam ``o``. The Fisher information of the four entries of ``A`` under Poisson counts is

    I_ab = sum_q  d lambda / d A_a  d lambda / d A_b  /  lambda,
    d lambda / d A_ij = -N (1 - w) dP/dq_i (q - o)_j,

over the pixels outside ``exclude_radius`` of ``o`` (the direct beam does not move with strain).
Its inverse bounds the covariance of any unbiased estimate of ``A`` from one pattern. To first
order, ``exx = 1 - A_xx``, ``eyy = 1 - A_yy``, ``exy = -(A_xy + A_yx) / 2`` and
``theta = +-(A_yx - A_xy) / 2`` (the signs do not change a standard deviation).

The warp also rescales each disk about the beam, which a real strain does not: that adds a
little information, so the value is, if anything, below the true bound. It stays a lower bound.
Gradients are central differences (within 1 % of the closed form for spots 2.5 px wide). A
method that pools patterns (a spatial prior, binning) can go below the bound; one fitting each
pattern alone, without bias, cannot.

Patterns whose disks are sharp to the pixel and sit on no background (multislice simulations
without noise background) need ``psf``. Across a one-pixel edge, central differences give the
faint pixels just outside a disk a slope of half the edge's step at almost no expected counts,
and those pixels then hold most of the information. No fit we tried recovers it: on the
multislice Si scan, CC-ST-AE's per-pattern fit spreads 2.3-2.8x the bound of the patterns as
simulated, at 1,000 and at 100,000 electrons per pattern, and 1.05-1.2x the bound of the same
patterns seen through a Gaussian point spread of 0.7 px (``benchmarks/efficiency.py``).

References
----------
Kay, "Fundamentals of Statistical Signal Processing: Estimation Theory", Prentice Hall (1993),
ch. 3.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from .noise import background_pattern
from .py4dstem.calibrate import measure_direct_beam
from .py4dstem.detect import beam_positions

__all__ = ["affine_information", "strain_bound", "bound_mae", "least_errors"]

#: Mean absolute error of a zero-mean normal variable, per unit standard deviation.
_MAE_PER_STD = math.sqrt(2.0 / math.pi)


def affine_information(
    pattern: np.ndarray,
    *,
    counts: float,
    background: float = 0.0,
    origin: tuple[float, float] | np.ndarray | None = None,
    exclude_radius: float = 0.0,
    psf: float = 0.0,
) -> np.ndarray:
    """Fisher information of the pattern warp ``A`` from one recorded pattern.

    Parameters
    ----------
    pattern
        (QX, QY) clean pattern, any positive scale (normalised here to sum 1); ``qx`` = rows.
    counts
        Dose ``N``, electrons per pattern.
    background
        Background weight ``w`` in [0, 1] of the paper's model; 0 is shot noise alone, 1 the
        background alone (no information).
    origin
        Direct beam ``(qx, qy)`` px; default the pattern's centre ``(QX // 2, QY // 2)``.
        :func:`strain_bound` also takes one per pattern, (N, 2).
    exclude_radius
        Pixels closer than this (px) to ``origin`` carry no strain information (the beam).
    psf
        Standard deviation (px) of the detector's Gaussian point spread, applied to the clean
        pattern first; 0 takes the pattern as it is (see the module's text for when to give it).

    Returns
    -------
    ndarray of shape (4, 4)
        Information about ``(A_xx, A_xy, A_yx, A_yy)``, in that order.
    """
    p = np.asarray(pattern, np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError("pattern must be a finite 2D array with a positive sum.")
    if not 0.0 <= background <= 1.0:
        raise ValueError(f"background={background} is not in [0, 1].")
    if psf < 0:
        raise ValueError(f"psf={psf} px is negative; give 0 for no point spread.")
    p = gaussian_filter(p, psf) if psf > 0 else p
    p = p / p.sum()
    o = np.array([p.shape[0] // 2, p.shape[1] // 2] if origin is None else origin, float)
    qx, qy = np.indices(p.shape, dtype=np.float64)
    dx, dy = qx - o[0], qy - o[1]
    expected = counts * ((1.0 - background) * p + background * background_pattern(p.shape))
    use = (np.hypot(dx, dy) >= exclude_radius) & (expected > 0)
    grad_x, grad_y = np.gradient(p)
    scale = -counts * (1.0 - background)
    rows = np.stack([grad_x * dx, grad_x * dy, grad_y * dx, grad_y * dy])[:, use] * scale
    return (rows / expected[use]) @ rows.T


def strain_bound(
    patterns: np.ndarray,
    *,
    counts: float,
    background: float = 0.0,
    origin: tuple[float, float] | np.ndarray | None = None,
    exclude_radius: float = 0.0,
    psf: float = 0.0,
) -> dict[str, np.ndarray]:
    """Least standard deviation of ``exx, eyy, exy`` ("1") and ``theta`` (rad) that an unbiased
    estimator reaches on each pattern (see the module's text).

    Parameters
    ----------
    patterns
        (N, QX, QY) or (QX, QY) clean patterns.
    counts, background, origin, exclude_radius, psf
        As :func:`affine_information`.

    Returns
    -------
    dict of ndarray of shape (N,) (or floats for one pattern)
        ``exx, eyy, exy, theta``; ``inf`` where a pattern holds no information (no disks).

    Examples
    --------
    One Gaussian spot of ``n`` counts and width ``s`` px on +qx, at ``d`` px from the beam:
    its position is known to ``s / sqrt(n)``, so ``exx`` to about ``s / (d sqrt(n))``.

    >>> q = np.indices((64, 64)) - np.array([32.0, 32.0])[:, None, None]
    >>> spot = np.exp(-((q[0] - 20.0) ** 2 + q[1] ** 2) / (2 * 2.0**2))
    >>> info = affine_information(spot, counts=400.0)
    >>> round(float(1.0 / np.sqrt(info[0, 0])), 3), 2.0 / (20.0 * math.sqrt(400.0))
    (0.005, 0.005)
    """
    stack = np.asarray(patterns, np.float64)
    single = stack.ndim == 2
    stack = stack[None] if single else stack
    centres = np.array([stack.shape[1] // 2, stack.shape[2] // 2], float)
    origins = np.broadcast_to(
        centres if origin is None else np.asarray(origin, float), (len(stack), 2)
    )
    out = {k: np.full(len(stack), np.inf) for k in ("exx", "eyy", "exy", "theta")}
    for n, p in enumerate(stack):
        info = affine_information(
            p,
            counts=counts,
            background=background,
            origin=origins[n],
            exclude_radius=exclude_radius,
            psf=psf,
        )
        if np.linalg.cond(info) > 1e12:
            continue
        cov = np.linalg.inv(info)
        out["exx"][n] = math.sqrt(cov[0, 0])
        out["eyy"][n] = math.sqrt(cov[3, 3])
        out["exy"][n] = 0.5 * math.sqrt(cov[1, 1] + cov[2, 2] + 2.0 * cov[1, 2])
        out["theta"][n] = 0.5 * math.sqrt(cov[1, 1] + cov[2, 2] - 2.0 * cov[1, 2])
    return {k: float(v[0]) for k, v in out.items()} if single else out


def bound_mae(std: np.ndarray) -> float:
    """Least mean absolute error over positions whose errors have the bound's standard
    deviations ``std`` (normal errors: ``sqrt(2 / pi)`` times the mean standard deviation).

    >>> round(bound_mae(np.array([1.0, 1.0])), 4)
    0.7979
    """
    return float(_MAE_PER_STD * np.mean(np.asarray(std, np.float64)))


def least_errors(
    patterns: np.ndarray, *, counts: float, background: float = 0.0, psf: float = 0.0
) -> dict[str, float]:
    """Least mean absolute error of ``exx, eyy, exy`` ("1") and ``theta`` (rad) over a sample of
    a scan's clean patterns recorded at ``counts`` with background weight ``background``.

    Each pattern's direct beam is found as the py4DSTEM baseline finds it (radius from the mean
    pattern); pixels within 1.5 beam radii of it are excluded.

    Parameters
    ----------
    patterns
        (N, QX, QY) clean patterns (a few hundred spread over the scan is plenty), of crystal
        only, like the positions a method's MAE is taken over: a vacuum pattern has no lattice
        to measure, and its huge bound would dominate the mean.
    counts, background
        The noise model of CONVENTIONS.md section 3 (``background=0``: shot noise alone).
    psf
        The detector's point spread (px), as :func:`affine_information`.

    Returns
    -------
    dict of float
        ``exx, eyy, exy, theta``: :func:`bound_mae` of the per-pattern bounds.
    """
    stack = np.asarray(patterns, np.float64)
    centre, radius, _ = measure_direct_beam(stack.mean(axis=0))
    origins = beam_positions(stack, np.tile(centre, (len(stack), 1)), radius)
    std = strain_bound(
        stack,
        counts=counts,
        background=background,
        origin=origins,
        exclude_radius=1.5 * radius,
        psf=psf,
    )
    return {k: bound_mae(v) for k, v in std.items()}
