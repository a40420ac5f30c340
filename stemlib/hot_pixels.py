"""Hot pixels: detector pixels that read far more than their neighbours in every pattern.

A hot pixel (a noisy or stuck detector element) adds counts at the same place in every
pattern: disk detection takes it for a Bragg disk and a registration pulls the lattice towards
it. Three hot pixels of 500 counts in patterns of 2e4 electrons raised py4DSTEM's strain error
fivefold and CC-ST-AE's eyy error from 0.9e-3 to 4.3e-3 (simulated grains, 64 px patterns).

:func:`find_hot_pixels` looks for them in the mean and spread of a sample of the scan's
patterns (whole stored chunks spread over the scan). A hot pixel there reads more than five
times the median of its 8 neighbours, by many times their noise; above all of them but one (two
side by side are found); steadily (its spread is under half its excess: a Bragg peak comes and
goes with the grains); and alone (its neighbours read at most three times the pixels two away: a
sharp disk lifts its flank). The direct beam's peak is not looked at. A Bragg disk is wider than
one pixel, but one of a single pixel would be taken for a hot pixel: repairing them is a choice
(``--hot-pixels``), not a default. No pixel of the multislice development scans (clean, noisy
and at 1,000 electrons per pattern) nor of noisy simulated ones is found; noiseless simulated
scans of one grain at 48 px or less show a few of their sharp disk peaks as hot pixels.
:func:`repair_hot_pixels` replaces each in every pattern by the median of its other neighbours.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from scipy import ndimage

from .beam import direct_beam

__all__ = ["find_hot_pixels", "repair_hot_pixels", "SAMPLE_PATTERNS"]

#: Patterns (at least, in whole chunks) whose mean :func:`find_hot_pixels` examines.
SAMPLE_PATTERNS = 256

#: The 8 neighbours of a pixel, (dqx, dqy).
_NEIGHBOURS = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)])


def _finite(block: da.Array) -> da.Array:
    block = block.astype(np.float64)
    return da.where(da.isfinite(block), block, 0.0)


def _sample_moments(data: da.Array, patterns: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and variance (shape (QX, QY)) over whole chunks, spread evenly over the scan, that
    hold at least ``patterns`` patterns; and how many patterns they held."""
    per_chunk = max(1, int(data.chunksize[0]) * int(data.chunksize[1]))
    rows, cols = data.numblocks[0], data.numblocks[1]
    wanted = min(rows * cols, -(-patterns // per_chunk))
    picked = np.unique(np.linspace(0, rows * cols - 1, wanted).round().astype(int))
    # Non-finite pixels (masked, with --allow-nonfinite) count zero, as the methods read them.
    blocks = [_finite(data.blocks[int(k // cols), int(k % cols)]) for k in picked]
    sums = [(b.sum((0, 1)), (b**2).sum((0, 1)), b.shape[0] * b.shape[1]) for b in blocks]
    computed = dask.compute(*[(s, q) for s, q, _ in sums])
    count = sum(n for _, _, n in sums)
    total = np.sum([s for s, _ in computed], axis=0)
    squares = np.sum([q for _, q in computed], axis=0)
    mean = total / count
    return mean, np.maximum(squares / count - mean**2, 0.0), int(count)


def find_hot_pixels(
    data: da.Array,
    *,
    patterns: int = SAMPLE_PATTERNS,
    factor: float = 5.0,
    sigmas: float = 10.0,
) -> np.ndarray:
    """Hot pixels of a scan's detector.

    Parameters
    ----------
    data
        Array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2); only the chunks of the
        sample are read.
    patterns
        Patterns to sample (whole chunks, spread evenly over the scan; all if fewer).
    factor
        A hot pixel's mean exceeds ``factor`` times the median of its 8 neighbours' ...
    sigmas
        ... and exceeds it by ``sigmas`` times its standard error (the neighbours' median
        spread over the sample, over the root of the sample's size; for integer counts at
        least the Poisson error of that median, and of one count).

    Returns
    -------
    ndarray of shape (N, 2), int
        (qx, qy) of each hot pixel, in detector pixels; empty where there is none.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> scan = rng.poisson(3.0, size=(8, 8, 16, 16)).astype(np.uint16)
    >>> scan[..., 5, 9] += 200  # stuck high in every pattern
    >>> find_hot_pixels(da.from_array(scan, chunks=(4, 8, 16, 16))).tolist()
    [[5, 9]]
    """
    data = da.asarray(data)
    mean, variance, count = _sample_moments(data, patterns)
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    # The median of the 8 neighbours, and of their spreads. Beyond the detector's edge the edge
    # row repeats: a disk cut by the edge is as bright as its neighbours along it, and a hot
    # pixel on the edge is one value of eight.
    around = ndimage.median_filter(mean, footprint=footprint, mode="nearest")
    spread = ndimage.median_filter(np.sqrt(variance), footprint=footprint, mode="nearest")
    # A hot pixel stands above all its neighbours but one (its partner, where two sit side by
    # side); a pixel on a slope (a disk's flank, cut by the detector's edge) does not.
    second = ndimage.rank_filter(mean, rank=-2, footprint=footprint, mode="constant", cval=-np.inf)
    error = spread / np.sqrt(count)
    if np.issubdtype(data.dtype, np.integer):  # counts: one count in the sample is not a signal
        error = np.maximum(error, np.sqrt((np.maximum(around, 0.0) + 1.0 / count) / count))
    floor = np.finfo(np.float64).tiny
    # Smooth, noiseless patterns (simulated) have far tails of nothing at their edges, where a
    # ratio means nothing: an excess below a thousandth of the brightest mean is not looked at.
    noticeable = mean - around > 1e-3 * float(mean.max())
    # The direct beam's peak is not looked at: a sharply peaked beam stands out like a hot
    # pixel (the simulator's, at 32 px). A hot pixel on its flank still does.
    (cx, cy), _ = direct_beam(mean)
    rows, cols = np.indices(mean.shape)
    outside_beam = np.hypot(rows - cx, cols - cy) > 1.5
    # A hot pixel reads high in every pattern; a Bragg disk's peak comes and goes with the
    # grains: over a sample of two grains it scatters about as much as it stands out.
    steady = np.sqrt(variance) < 0.5 * (mean - around)
    # And it is one pixel: its neighbours read what the pixels two away read. A sharply peaked
    # disk (noiseless simulated ones) lifts its neighbours well above its surroundings.
    ring = np.ones((5, 5), bool)
    ring[1:4, 1:4] = False
    surroundings = ndimage.median_filter(mean, footprint=ring, mode="nearest")
    isolated = around <= 3 * np.maximum(surroundings, 0.0) + 3 * error
    hot = (
        (mean > factor * np.maximum(around, floor))
        & (mean - around > sigmas * np.maximum(error, floor))
        & (mean > second)
        & steady
        & isolated
        & noticeable
        & outside_beam
    )
    return np.argwhere(hot)


def _repair_block(block: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """``block`` (..., QX, QY) with each hot pixel the median of its in-bounds, not-hot
    neighbours (rounded for integers)."""
    qx, qy = block.shape[-2:]
    taken = np.zeros((qx, qy), bool)
    taken[hot[:, 0], hot[:, 1]] = True
    near = hot[:, None, :] + _NEIGHBOURS[None]  # (N, 8, 2)
    inside = (near >= 0).all(-1) & (near[..., 0] < qx) & (near[..., 1] < qy)
    near = np.clip(near, 0, [qx - 1, qy - 1])
    usable = inside & ~taken[near[..., 0], near[..., 1]]
    values = block[..., near[..., 0], near[..., 1]].astype(np.float64)  # (..., N, 8)
    values[..., ~usable] = np.nan
    out = block.copy()
    with np.errstate(all="ignore"):
        median = np.nanmedian(values, axis=-1)
    if np.issubdtype(block.dtype, np.integer):
        median = np.rint(median)
    keep = np.isfinite(median)  # a pixel with no usable neighbour keeps its value
    current = out[..., hot[:, 0], hot[:, 1]]
    out[..., hot[:, 0], hot[:, 1]] = np.where(keep, median, current).astype(block.dtype)
    return out


def repair_hot_pixels(data: da.Array, hot: np.ndarray) -> da.Array:
    """``data`` with each hot pixel, in every pattern, replaced by the median of its
    neighbours that are neither outside the detector nor hot themselves.

    Parameters
    ----------
    data
        Array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2).
    hot
        Array of shape (N, 2): (qx, qy) of the hot pixels (:func:`find_hot_pixels`).

    Returns
    -------
    dask.array.Array of the same shape, chunks (whole patterns) and dtype; ``data`` itself
    when ``hot`` is empty.

    Examples
    --------
    >>> scan = np.full((1, 1, 3, 3), 4, np.uint16)
    >>> scan[0, 0, 1, 1] = 900
    >>> repair_hot_pixels(da.from_array(scan), np.array([[1, 1]]))[0, 0].compute().tolist()
    [[4, 4, 4], [4, 4, 4], [4, 4, 4]]
    """
    data = da.asarray(data)
    hot = np.asarray(hot, int).reshape(-1, 2)
    if not len(hot):
        return data
    whole = data.rechunk({2: -1, 3: -1})
    return whole.map_blocks(_repair_block, hot=hot, dtype=data.dtype)
