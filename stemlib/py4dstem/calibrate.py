"""Detection parameters measured on the data: no hand tuning per scan.

From a sample of patterns spread over the scan (a few whole chunks, never the whole scan):

- the direct beam's centre, radius and edge width, from the sharpest step of the mean pattern's
  radial profile (robust to a bright background peak on the centre, which defeats thresholds);
- the correlation template: the mean direct beam of the patterns without Bragg disks (vacuum)
  where there are enough of them, else py4DSTEM's synthetic disk of the measured radius; the
  kernel is py4DSTEM's sigmoid-trench kernel of that template;
- the detection threshold from the pixel noise, carried through the kernel;
- the lattice's shape (the reduced basis' lengths and angle, rotation-invariant) and spacing,
  from the sampled patterns' own lattices;
- the descan: a plane fitted to the sampled direct-beam positions over the scan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage, signal

from ..bad_pixels import no_disks_remedy
from ..errors import InputError
from ._import import load_py4dstem
from .config import Py4DSTEMConfig
from .detect import (
    RECORD_FIELDS,
    DetectionParameters,
    beam_positions,
    detect_disks,
    detect_lattices_in,
    flatten_background,
)
from .lattice import basis_metric

#: Smallest provisional disk radius (px): below it a bright halo on the centre is taken for the
#: direct beam's edge.
_SMALLEST_RADIUS = 1.5
#: Disks smaller than this (px) have correlation peaks too sharp for DFT up-sampling unless the
#: patterns are smoothed (see ``Py4DSTEMConfig.sigma_dp``).
_SHARP_PEAK_RADIUS = 6.0
#: Fewest stored chunks a sample is read from: one large chunk (a scan row of a big scan) is
#: one line across the sample, which may miss its grains or hold only vacuum.
_SPREAD_CHUNKS = 8

__all__ = [
    "DetectionSetup",
    "calibrate",
    "sample_patterns",
    "measure_direct_beam",
    "bragg_disk_radius",
    "pixel_noise",
]


@dataclass(frozen=True)
class DetectionSetup:
    """The measured detection set-up: kernel, parameters and what they were derived from."""

    kernel: np.ndarray
    params: DetectionParameters
    template: str
    disk_radius_px: float
    edge_width_px: float
    pixel_noise: float
    sample_size: int
    sample_indexed: float
    vacuum_in_sample: int

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the parameters used (for the result's attributes)."""
        return {
            "template": self.template,
            "disk_radius_px": round(self.disk_radius_px, 4),
            "edge_width_px": round(self.edge_width_px, 4),
            "pixel_noise": self.pixel_noise,
            "sample_patterns": self.sample_size,
            "sample_indexed_fraction": round(self.sample_indexed, 4),
            "vacuum_patterns_in_sample": self.vacuum_in_sample,
            **self.params.as_dict(),
        }


def sample_patterns(data: da.Array, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """About ``n`` patterns from whole chunks spread evenly over the scan (at least
    ``_SPREAD_CHUNKS`` of them where the scan has that many).

    Parameters
    ----------
    data
        Lazy scan of shape (RX, RY, QX, QY).
    n
        Patterns wanted.

    Returns
    -------
    patterns : ndarray of shape (N, QX, QY), float64
    rx, ry : ndarray of shape (N,)
        Scan indices of each sampled pattern.
    """
    crx, cry = data.chunks[0][0], data.chunks[1][0]
    per_chunk = crx * cry
    grid = data.numblocks[:2]
    # At least a few chunks, so that large chunks (a scan row) still sample the whole scan.
    n_chunks = min(grid[0] * grid[1], max(_SPREAD_CHUNKS, math.ceil(n / per_chunk)))
    flat = np.unique(np.linspace(0, grid[0] * grid[1] - 1, n_chunks).round().astype(int))
    step = max(1, (len(flat) * per_chunk) // n)  # every step-th pattern of each chunk, raster order
    parts, where = [], []
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in data.chunks[:2]]
    for f in flat:
        i, j = divmod(int(f), grid[1])
        block = data.blocks[i, j]
        bx, by = block.shape[:2]
        parts.append(block.reshape((bx * by,) + block.shape[2:])[::step])
        rx, ry = np.meshgrid(
            offsets[0][i] + np.arange(bx), offsets[1][j] + np.arange(by), indexing="ij"
        )
        where.append((rx.ravel()[::step], ry.ravel()[::step]))
    blocks = dask.compute(*parts)
    patterns = np.concatenate([b.astype(np.float64) for b in blocks])
    return patterns, np.concatenate([w[0] for w in where]), np.concatenate([w[1] for w in where])


def _profile(image: np.ndarray, centre: np.ndarray, rmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Radial profile sampled at the pixels' own distances from ``centre`` (no binning), then
    resampled on a 0.25 px grid."""
    r = np.hypot(*(np.indices(image.shape) - centre[:, None, None])).ravel()
    use = r < rmax
    radii, inverse = np.unique(np.round(r[use], 2), return_inverse=True)
    profile = np.bincount(inverse, image.ravel()[use]) / np.bincount(inverse)
    grid = np.arange(radii[0], radii[-1], 0.25)
    return grid, np.interp(grid, radii, profile)


def _step_radius(
    grid: np.ndarray, profile: np.ndarray, *, outermost: bool = True
) -> tuple[float, float] | None:
    """Radius and width (px) of the outermost (or the steepest) sharp fall of a radial
    profile: a fall counts if its slope reaches a fifth of the steepest one. None if none."""
    if len(grid) < 4:
        return None
    slope = -np.gradient(profile, grid)
    if slope.max() <= 0:
        return None
    peaks, props = signal.find_peaks(slope, height=0.2 * slope.max(), prominence=0.1 * slope.max())
    if len(peaks) == 0:
        return None
    k = peaks[-1] if outermost else peaks[np.argmax(props["peak_heights"])]
    lo, hi = k, k
    half = 0.5 * slope[k]
    while lo > 0 and slope[lo - 1] > half:
        lo -= 1
    while hi < len(slope) - 1 and slope[hi + 1] > half:
        hi += 1
    weights = slope[lo : hi + 1]
    radius = float(np.sum(weights * grid[lo : hi + 1]) / weights.sum())
    return radius, float(max(grid[hi] - grid[lo], 0.5))


def measure_direct_beam(mean: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Centre, radius and edge width (px) of the direct-beam disk of a mean pattern.

    The radius is the outermost sharp fall of the radial profile before it first rises again
    (towards the first Bragg disks). A bright narrow halo on the centre (thermal diffuse
    scattering, or the Lorentzian of the CC-ST-AE noise model) can hide the edge of a small
    disk: the value is then too small, and :func:`bragg_disk_radius` measures it on the
    Bragg disks instead. The centre is the centre of mass of the pixels within the radius.

    Examples
    --------
    >>> q = np.hypot(*np.indices((64, 64)) - 32.0)
    >>> centre, radius, width = measure_direct_beam(1.0 / (1.0 + np.exp((q - 5.0) / 0.3)))
    >>> [round(float(v), 1) for v in (*centre, radius)]
    [32.0, 32.0, 5.0]
    """
    mean = np.asarray(mean, np.float64)
    qx, qy = np.indices(mean.shape, dtype=np.float64)
    peak = np.unravel_index(np.argmax(ndimage.gaussian_filter(mean, 1.0)), mean.shape)
    bright, _ = ndimage.label(mean >= 0.5 * mean[peak])
    region = bright == bright[peak]
    centre = np.array([(qx * mean)[region].sum(), (qy * mean)[region].sum()]) / mean[region].sum()
    radius, width = math.sqrt(region.sum() / math.pi), 1.0
    for _ in range(2):
        grid, profile = _profile(mean, centre, min(mean.shape) / 2.5)
        fallen = profile < 0.5 * profile[0]
        rises = np.flatnonzero(fallen[:-1] & (np.diff(ndimage.gaussian_filter1d(profile, 2.0)) > 0))
        end = int(rises[0]) + 1 if len(rises) else len(grid)
        step = _step_radius(grid[:end], profile[:end])
        if step is None:
            break
        radius, width = step
        inside = np.hypot(qx - centre[0], qy - centre[1]) <= radius
        centre = (
            np.array([(qx * mean)[inside].sum(), (qy * mean)[inside].sum()]) / mean[inside].sum()
        )
    return centre, float(radius), float(width)


def bragg_disk_radius(
    patterns: np.ndarray,
    centre: np.ndarray,
    radius: float,
    width: float,
    noise: float,
    sigma_cc: float,
    *,
    beam_radius: float = 0.0,
) -> tuple[float, float, int]:
    """Disk radius and edge width (px) measured on the mean of the Bragg disks of ``patterns``.

    Every disk of a pattern has the probe's radius. The direct beam often sits on a bright
    narrow halo; the Bragg disks, their radial background removed, do not. The disks are found
    with a provisional kernel of ``radius``, cut out around their integer peak positions and
    averaged; the steepest fall of that average's radial profile (within half the disks'
    spacing) is the radius.

    ``beam_radius`` (the direct beam's own measure, if larger) sets how much of the beam is
    removed and how far out disks are looked for: the pixelated rim of a beam masked too
    tightly would pass for a ring of small disks.

    Returns
    -------
    radius, width : float
    disks : int
        How many disks were averaged (0: none found, ``radius`` returned unchanged).
    """
    shape = patterns.shape[1:]
    masked = max(radius, beam_radius)
    beams = beam_positions(patterns, np.tile(centre, (len(patterns), 1)), masked)
    flat = flatten_background(patterns, beams, masked)
    params = DetectionParameters(
        corr_power=1.0,
        sigma_dp=0.0,
        sigma_cc=sigma_cc,
        subpixel="poly",
        upsample_factor=16,
        min_intensity=_threshold(
            _synthetic_kernel(shape, radius, width, (1.0, 2.0)), noise, sigma_cc, 5.0
        ),
        min_relative=0.0,
        min_spacing=2.0 * radius,
        edge_boundary=1,
        max_peaks=70,
        disk_radius=radius,
        tolerance=0.15,
        prior=None,
        prior_tolerance=0.12,
        origin_plane=(float(centre[0]), 0.0, 0.0, float(centre[1]), 0.0, 0.0),
    )
    peaks = detect_disks(flat, _synthetic_kernel(shape, radius, width, (1.0, 2.0)), params)
    # The brightest dozen peaks beyond the beam's rim: disks, rarely side lobes or noise.
    found = [
        p[np.linalg.norm(p[:, :2] - b, axis=1) > 3.0 * masked + 1.0][:12]
        for p, b in zip(peaks, beams, strict=True)
    ]
    spacing = [
        np.median(np.sort(np.linalg.norm(p[:, None, :2] - p[None, :, :2], axis=2), axis=1)[:, 1])
        for p in found
        if len(p) >= 3
    ]
    if not spacing:
        return radius, width, 0
    half = int(np.median(spacing) / 2.0)
    crops = []
    for image, p in zip(flat, found, strict=True):
        for qx, qy in np.rint(p[:10, :2]).astype(int):
            if half <= qx < shape[0] - half and half <= qy < shape[1] - half:
                crops.append(image[qx - half : qx + half + 1, qy - half : qy + half + 1])
    if len(crops) < 8 or half < 2:
        return radius, width, 0
    grid, profile = _profile(np.mean(crops, axis=0), np.array([half, half], float), float(half))
    step = _step_radius(grid, profile, outermost=False)
    if step is None or step[0] > 0.8 * half:  # no edge, or the edge of a group of disks
        return radius, width, 0
    return step[0], step[1], len(crops)


def _disk_radius(
    patterns: np.ndarray, centre: np.ndarray, radius: float, width: float, noise: float
) -> tuple[float, float]:
    """The disk radius from the Bragg disks (:func:`bragg_disk_radius`), iterated from the
    direct beam's value until it changes by 2 % or less; if that does not settle (the
    measured radius within 25 % of the one it was measured with), from a ladder of radii
    (1.5 px doubling up to a tenth of the pattern), keeping the largest radius that settles.
    Falls back to the direct beam's value."""
    starts = [max(radius, _SMALLEST_RADIUS)]
    ladder = _SMALLEST_RADIUS
    while ladder <= min(patterns.shape[1:]) / 10:
        starts.append(ladder)
        ladder *= 2
    settled: list[tuple[float, float]] = []
    for k, start in enumerate(starts):
        current, edge, disks = start, 1.0, 0  # a moderate edge: the beam's may be a halo's
        for _ in range(6):  # until it settles within 2 % (crops cut with a small kernel blur)
            used = current
            current, edge, disks = bragg_disk_radius(
                patterns, centre, used, edge, noise, min(2.0, used / 2), beam_radius=radius
            )
            if not disks or abs(current - used) <= 0.02 * current:
                break
        if disks and abs(current - used) <= 0.25 * current:
            if k == 0:
                return current, edge
            settled.append((current, edge))
    if not settled:
        return max(radius, _SMALLEST_RADIUS), width
    return max(settled)


def pixel_noise(patterns: np.ndarray) -> float:
    """Robust standard deviation of the pixel noise, the median over patterns of
    ``1.4826 MAD(d) / sqrt(2)`` of the differences ``d`` of neighbouring pixels.

    Where most pixels hold no count (low dose), the MAD is 0 and the RMS of the differences
    over ``sqrt(2)`` is used for that pattern instead. Noise-free data give (nearly) 0.
    """
    diff = np.diff(np.asarray(patterns, np.float64), axis=-1).reshape(len(patterns), -1)
    mad = 1.4826 * np.median(np.abs(diff - np.median(diff, axis=1, keepdims=True)), axis=1)
    rms = np.sqrt(np.mean(diff**2, axis=1))
    return float(np.median(np.where(mad > 0, mad, rms)) / math.sqrt(2.0))


def _valid(records: np.ndarray, config: Py4DSTEMConfig) -> np.ndarray:
    """Positions whose lattice fit meets ``min_disks`` and ``min_indexed_fraction``."""
    n_disks = np.nan_to_num(records[:, RECORD_FIELDS.index("n_disks")])
    fraction = np.nan_to_num(records[:, RECORD_FIELDS.index("indexed_fraction")])
    return (n_disks >= config.min_disks) & (fraction >= config.min_indexed_fraction)


def _kernel(
    probe: Any, centre: np.ndarray, radius: float, radii: tuple[float, float]
) -> np.ndarray:
    return probe.get_kernel(
        mode="sigmoid",
        origin=(float(centre[0]), float(centre[1])),
        radii=(radii[0] * radius, radii[1] * radius),
    )


def _synthetic_kernel(
    shape: tuple[int, int], radius: float, width: float, radii: tuple[float, float]
) -> np.ndarray:
    load_py4dstem()
    from py4DSTEM.braggvectors import Probe

    with np.errstate(over="ignore"):  # exp of the far field overflows to a probe value of 0
        probe = Probe.generate_synthetic_probe(radius, width, shape)
    return _kernel(probe, np.array(shape, float) / 2.0, radius, radii)


def _vacuum_kernel(
    patterns: np.ndarray, beams: np.ndarray, radius: float, radii: tuple[float, float]
) -> np.ndarray:
    """Kernel of the mean vacuum direct beam, each pattern shifted onto the first one's beam."""
    load_py4dstem()
    from py4DSTEM.braggvectors import Probe
    from py4DSTEM.process.utils import get_shifted_ar

    target = beams[0]
    aligned = [
        get_shifted_ar(p, *(target - b), bilinear=False)
        for p, b in zip(patterns, beams, strict=True)
    ]
    # py4DSTEM's default opening (3 iterations) erases a probe of a few pixels' radius.
    opening = int(min(3, max(1, radius // 2)))
    probe = Probe.from_vacuum_data(np.mean(aligned, axis=0), opening=opening)
    return _kernel(probe, target, radius, radii)


def _threshold(kernel: np.ndarray, noise: float, smoothing: float, n_sigma: float) -> float:
    """Correlation value ``n_sigma`` noise deviations up: white pixel noise through the kernel
    and the Gaussian smoothing (px) of the pattern and of the correlation."""
    response = np.fft.fftshift(kernel)
    if smoothing > 0:
        response = ndimage.gaussian_filter(response, smoothing, mode="wrap")
    return float(n_sigma * noise * np.sqrt(np.sum(response**2)))


def _floor(
    kernel: np.ndarray, mean: np.ndarray, noise: float, smoothing: float, config: Py4DSTEMConfig
) -> float:
    """Detection threshold: ``threshold_sigma`` noise deviations, and at least
    ``min_beam_fraction`` of the direct beam's own correlation peak (noise-free data have no
    noise, but numerical side lobes)."""
    beam = float(np.real(np.fft.ifft2(np.fft.fft2(mean) * np.conj(np.fft.fft2(kernel)))).max())
    return max(
        _threshold(kernel, noise, smoothing, config.threshold_sigma),
        config.min_beam_fraction * beam,
    )


def _indexes_as_well(
    vacuum: np.ndarray,
    synthetic: np.ndarray,
    crystal: np.ndarray,
    params: DetectionParameters,
    noise: float,
    config: Py4DSTEMConfig,
) -> bool:
    """Whether the vacuum template indexes at least as many of the sampled crystal patterns as
    the synthetic one. A vacuum beam carries what the crystal's disks do not: a diffuse halo on
    the beam, or the spike of the CC-ST-AE noise model's Lorentzian, whose template correlates
    with noise (measured: 0 of 144 patterns indexed at w = 0.5, 90 % with the synthetic one)."""
    crystal = crystal[: max(16, config.sample_patterns // 4)]
    smoothing = math.hypot(params.sigma_dp, params.sigma_cc)
    expected = np.tile(params.origin_plane[::3], (len(crystal), 1))
    counts = []
    for kernel in (vacuum, synthetic):
        trial = replace(
            params,
            subpixel="poly",
            min_intensity=_floor(kernel, crystal.mean(axis=0), noise, smoothing, config),
        )
        _, _, records = detect_lattices_in(crystal, expected, kernel, trial)
        counts.append(int((np.isfinite(records[:, 2]) & _valid(records, config)).sum()))
    return counts[0] >= counts[1]


def _plane(
    rx: np.ndarray, ry: np.ndarray, origins: np.ndarray
) -> tuple[float, float, float, float, float, float]:
    """Least-squares plane of the direct beam over the scan, refitted without 3-MAD outliers;
    a constant where the sample spans one scan row or column."""
    ok = np.isfinite(origins).all(axis=1)
    design = np.column_stack([np.ones(ok.sum()), rx[ok], ry[ok]]).astype(float)
    target = origins[ok]
    if len(target) == 0:
        return (math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    for _ in range(2):
        coef = np.linalg.lstsq(design, target, rcond=1e-9)[0]
        residual = np.linalg.norm(target - design @ coef, axis=1)
        mad = np.median(residual) + 1e-9
        keep = residual <= 3 * 1.4826 * mad + 1e-6
        design, target = design[keep], target[keep]
    (a, b, c), (d, e, f) = coef[:, 0], coef[:, 1]
    return (float(a), float(b), float(c), float(d), float(e), float(f))


def calibrate(
    data: da.Array,
    config: Py4DSTEMConfig,
    *,
    where: str = "the scan",
    attrs: Mapping[str, Any] | None = None,
) -> DetectionSetup:
    """Measure the detection set-up on a sample of the scan.

    Parameters
    ----------
    data
        Lazy scan of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2).
    config
        Overrides (:class:`Py4DSTEMConfig`).
    where
        The scan's name, for messages.
    attrs
        The scan's attributes: bad pixels that ingest found and left are named in the refusal
        (:func:`stemlib.bad_pixels.no_disks_remedy`).

    Returns
    -------
    DetectionSetup

    Raises
    ------
    InputError
        If no sampled pattern shows a lattice of Bragg disks (e.g. a vacuum scan).
    """
    patterns, rx, ry = sample_patterns(data, config.sample_patterns)
    shape = patterns.shape[1:]
    centre, radius, width = measure_direct_beam(patterns.mean(axis=0))
    noise = pixel_noise(patterns)
    if config.disk_radius_px is not None:
        radius = float(config.disk_radius_px)
    else:
        radius, width = _disk_radius(patterns[:64], centre, radius, width, noise)
    sigma_cc = config.sigma_cc if config.sigma_cc is not None else min(2.0, radius / 2)
    sigma_dp = (
        config.sigma_dp
        if config.sigma_dp is not None
        else max(0.0, (_SHARP_PEAK_RADIUS - radius) / 4.0)
    )
    kernel = _synthetic_kernel(shape, radius, width, config.kernel_radii)
    params = DetectionParameters(
        corr_power=config.corr_power,
        sigma_dp=sigma_dp,
        sigma_cc=sigma_cc,
        subpixel=config.subpixel,
        upsample_factor=config.upsample_factor,
        min_intensity=_floor(
            kernel, patterns.mean(axis=0), noise, math.hypot(sigma_dp, sigma_cc), config
        ),
        min_relative=config.min_relative,
        min_spacing=2.0 * radius,
        edge_boundary=int(math.ceil(config.kernel_radii[1] * radius)),
        max_peaks=config.max_peaks,
        disk_radius=radius,
        tolerance=config.index_tolerance,
        prior=None,
        prior_tolerance=config.prior_tolerance,
        origin_plane=(float(centre[0]), 0.0, 0.0, float(centre[1]), 0.0, 0.0),
    )
    expected = np.tile(centre, (len(patterns), 1))
    # The sample needs no sub-pixel precision (lattice shape, vacuum, descan): parabolic peaks.
    beams, peaks, records = detect_lattices_in(
        patterns, expected, kernel, replace(params, subpixel="poly")
    )
    indexed = np.isfinite(records[:, 2]) & _valid(records, config)
    # Vacuum: no lattice, and less Bragg signal than a tenth of a typical crystal pattern's.
    signal_sum = np.array([p[:, 2].sum() for p in peaks])
    typical = np.median(signal_sum[indexed]) if indexed.any() else np.inf
    vacuum = ~indexed & (signal_sum < 0.1 * typical)
    template = "synthetic"
    if config.template != "synthetic" and vacuum.sum() >= config.min_vacuum_patterns:
        measured = _vacuum_kernel(patterns[vacuum], beams[vacuum], radius, config.kernel_radii)
        if (
            config.template == "vacuum"
            or not indexed.any()
            or _indexes_as_well(measured, kernel, patterns[indexed], params, noise, config)
        ):
            kernel, template = measured, "vacuum"
    elif config.template == "vacuum":
        raise InputError(
            f"{where} has {int(vacuum.sum())} vacuum patterns in the {len(patterns)} sampled, "
            "fewer than "
            f"min_vacuum_patterns={config.min_vacuum_patterns}; use template: auto or synthetic."
        )
    if indexed.mean() < config.min_sample_indexed:
        left, fix = no_disks_remedy(attrs or {})
        raise InputError(
            f"{where} shows a lattice of Bragg disks above the noise in {int(indexed.sum())} of "
            f"{len(patterns)} patterns sampled over the scan (a vacuum scan, no crystal, "
            f"or disks too faint to find in single patterns{left}); {fix}."
        )
    metrics = np.array([basis_metric(r[2:6].reshape(2, 2).T) for r in records[indexed]])
    prior = np.median(metrics, axis=0)
    plane = _plane(rx, ry, np.where(indexed[:, None], records[:, :2], beams))
    params = replace(
        params,
        min_intensity=_floor(
            kernel, patterns.mean(axis=0), noise, math.hypot(sigma_dp, sigma_cc), config
        ),
        min_spacing=float(max(2.0 * radius, 0.4 * prior[0])),
        prior=(float(prior[0]), float(prior[1]), float(prior[2])),
        origin_plane=plane,
    )
    return DetectionSetup(
        kernel=kernel,
        params=params,
        template=template,
        disk_radius_px=radius,
        edge_width_px=width,
        pixel_noise=noise,
        sample_size=len(patterns),
        sample_indexed=float(indexed.mean()),
        vacuum_in_sample=int(vacuum.sum()),
    )
