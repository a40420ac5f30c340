"""What CC-ST-AE measures in a sample of a scan's patterns before it trains, and the scans it
refuses.

:func:`survey` takes the raw patterns drawn by :func:`stemlib.ccstae.data.sample_patterns` and
returns the training's ``setup`` (pattern shape, direct beam's centre and radius, intensity
scale, noise model, angular order, mask schedule) with the mask schedule itself. It refuses, each
with one sentence that names the scan and the fix, the scans that CC-ST-AE cannot map: one of a
single pattern (:func:`check_positions`), noise-free patterns all the same, patterns without
Bragg disks above the noise (:func:`stemlib.angular.angular_order` under
:data:`MIN_ANGULAR_ORDER`), and patterns too small to hold disks beyond the direct beam
(:func:`check_disk_ring`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ..angular import angular_order
from ..bad_pixels import no_disks_remedy
from ..beam import beam_centre, beam_radius
from ..errors import InputError
from ..io.scan_store import scan_label
from ..masks import MaskSchedule
from .config import CCSTAEConfig
from .data import Preprocess

log = logging.getLogger("stemlib.ccstae")

__all__ = [
    "MIN_ANGULAR_ORDER",
    "MIN_DISK_RING_PX",
    "beam_tail",
    "check_disk_ring",
    "check_positions",
    "derived_schedule",
    "disk_window",
    "origin_warnings",
    "survey",
]

#: Least :func:`stemlib.angular.angular_order` of the sampled patterns for a scan to hold Bragg
#: disks. Background alone scores 0 to 2; multislice WS2 at w = 0.5 (single patterns show no
#: lattice) 19; crystals hundreds (256 patterns of 128 px, measured).
MIN_ANGULAR_ORDER = 6.0

#: Least width (px) of the ring between the beam's tail and the mask's last outer radius.
MIN_DISK_RING_PX = 2.0


def disk_window(beam: float) -> int:
    """Half-width (px) of the window about a disk of a base: the direct beam's ``beam`` radius
    (px), 2 px at least."""
    return max(2, int(round(beam)))


def derived_schedule(config: CCSTAEConfig, *, size: int, beam: float) -> MaskSchedule:
    """The mask schedule where the config gives none: from 1.5 beam radii + 1 px (2 px to a
    quarter of the ``size`` px pattern) out to 0.48 of the pattern, shrinking to 0.44 of it."""
    inner = float(np.clip(1.5 * beam + 1.0, 2.0, size / 4))
    return MaskSchedule(
        kind="linear",
        start=(inner, 0.48 * size),
        end=(inner, 0.44 * size),
        epochs=max(config.epochs, 1),
    )


def beam_tail(schedule: MaskSchedule, beam: float) -> float:
    """Radius (px) beyond which CC-ST-AE looks for Bragg disks: the mask's first inner radius
    plus a disk's window (:func:`disk_window`), past the direct beam's tail."""
    return schedule.radii(0)[0] + disk_window(beam)


def check_positions(scan: Any) -> None:
    """Refuse a scan (RX, RY, QX, QY) of one pattern: CC-ST-AE learns from how patterns vary."""
    rx, ry = scan.shape[:2]
    if rx * ry < 2:
        raise InputError(
            f"{scan_label(scan)} holds one pattern; CC-ST-AE learns from a scan's patterns and "
            "needs 2 or more: pass a scan of more positions, or use the py4dstem method."
        )


def check_disk_ring(
    scan: Any, schedule: MaskSchedule, *, beam: float, last_epoch: int, given: bool
) -> None:
    """Refuse patterns too small to hold Bragg disks between the direct beam's tail and the
    mask's outer radius at ``last_epoch`` (on 8 px patterns the vacuum check met an empty ring:
    NumPy's zero-size reduction error). ``given``: the config gave the mask schedule."""
    tail = beam_tail(schedule, beam)
    outer = schedule.radii(last_epoch)[1]
    if outer - tail >= MIN_DISK_RING_PX:
        return
    h, w = scan.shape[-2:]
    fix = (
        "give the mask an outer radius farther out"
        if given
        else "pass patterns of more pixels (bin the detector less), or use the py4dstem method"
    )
    raise InputError(
        f"{scan_label(scan)}'s patterns of {h} x {w} px leave no room for Bragg disks between "
        f"the direct beam's tail at {tail:.1f} px (its radius measured {beam:.1f} px) and "
        f"CC-ST-AE's mask at {outer:.1f} px ({MIN_DISK_RING_PX:g} px at least); {fix}."
    )


def _recorded_centre(scan: Any) -> tuple[float, float]:
    """The direct beam (qx, qy) px that ``scan`` records (``attrs["origin_px"]``), else the
    detector's centre ``(QX // 2, QY // 2)``."""
    origin = (getattr(scan, "attrs", None) or {}).get("origin_px")
    if origin is not None:
        return (float(origin[0]), float(origin[1]))
    h, w = scan.shape[-2:]
    return (float(h // 2), float(w // 2))


def _refuse_identical(scan: Any, linear: np.ndarray) -> None:
    """Refuse sampled patterns (n, QX, QY) that are all one non-constant pattern: their angular
    order has no spread to measure disks against."""
    if np.ptp(linear[0]) > 0 and all(np.array_equal(p, linear[0]) for p in linear[1:]):
        raise InputError(
            f"the {len(linear)} patterns sampled from {scan_label(scan)} are all the same (a "
            "noise-free simulation, or one pattern repeated), and CC-ST-AE tells Bragg disks "
            "from background by how patterns vary; add noise (stemflow noise) or use the "
            "py4dstem method."
        )


def _poisson(
    config: CCSTAEConfig, sample: np.ndarray, ring: np.ndarray, *, dtype: np.dtype
) -> bool:
    """Whether to fit by Poisson likelihood: asked for, or ``"auto"`` with integer counts averaging
    under one count per ring pixel (shot noise dominates)."""
    if config.noise_model != "auto":
        return config.noise_model == "poisson"
    return np.dtype(dtype).kind in "ui" and float(sample[:, ring].mean()) < 1.0


def survey(
    scan: Any, sample: np.ndarray, *, config: CCSTAEConfig
) -> tuple[dict[str, Any], MaskSchedule]:
    """The training's setup from raw ``sample`` patterns (n, QX, QY) of ``scan``, or refusal.

    Returns
    -------
    setup : dict
        JSON values: ``pattern_shape`` [QX, QY], ``center`` [qx, qy] px (the direct beam
        measured in the sample's mean, near the recorded one), ``beam_radius_px``,
        ``intensity_scale`` (99th percentile of the preprocessed mean in the mask's first ring),
        ``noise_model`` ("poisson" or "gaussian"), ``angular_order`` (standard errors) and
        ``mask`` (the schedule's fields).
    schedule : MaskSchedule
        The config's mask, else :func:`derived_schedule`.

    Raises
    ------
    InputError
        Sampled patterns all the same, without Bragg disks above the noise, or too small for
        disks beyond the beam (:func:`check_disk_ring`).
    """
    h, w = sample.shape[-2:]
    linear = Preprocess("linear", 1.0)(sample)
    mean = linear.mean(0)
    center = beam_centre(mean, expected=_recorded_centre(scan))
    beam = beam_radius(mean, center=center)
    schedule = config.mask or derived_schedule(config, size=min(h, w), beam=beam)
    _refuse_identical(scan, linear)
    order = angular_order(linear, center=center, radii=schedule.radii(0))
    del linear
    if order < MIN_ANGULAR_ORDER:
        left, fix = no_disks_remedy(scan.attrs)
        raise InputError(
            f"{scan_label(scan)} shows no Bragg disks above the noise in the {len(sample)} "
            f"patterns sampled (their angular order is {order:.1f} standard errors, a "
            f"crystal's {MIN_ANGULAR_ORDER:g} or more: a vacuum or background-only scan"
            f"{left}); {fix}."
        )
    check_disk_ring(
        scan, schedule, beam=beam, last_epoch=config.last_epoch, given=config.mask is not None
    )
    ring = schedule.mask((h, w), 0)
    poisson = _poisson(config, sample, ring, dtype=scan.dtype)
    mean = Preprocess("linear" if poisson else config.intensity, 1.0)(sample).mean(0)
    scale = float(np.percentile(mean[ring], 99)) or 1.0
    setup = {
        "pattern_shape": [h, w],
        "center": list(center),
        "beam_radius_px": beam,
        "intensity_scale": scale,
        "noise_model": "poisson" if poisson else "gaussian",
        "angular_order": order,
        "mask": json.loads(schedule.model_dump_json()),
    }
    return setup, schedule


def origin_warnings(scan: Any, setup: dict[str, Any]) -> list[str]:
    """A sentence where the scan's recorded direct beam lies outside the beam the training
    measured in its patterns (a stale or wrong calibration), else none."""
    origin = (getattr(scan, "attrs", None) or {}).get("origin_px")
    if origin is None:
        return []
    (cx, cy), radius = setup["center"], setup["beam_radius_px"]
    off = float(np.hypot(origin[0] - cx, origin[1] - cy))
    if off <= radius:
        return []
    warning = (
        f"the scan records its direct beam (origin_px) at ({origin[0]:g}, {origin[1]:g}) px, "
        f"{off:.1f} px from the beam in its patterns, at "
        f"({cx:.1f}, {cy:.1f}) px; the maps use the measured beam, but the scan's q coordinates "
        "are off: ingest it again with --origin QX,QY (or --bin-q for a binned detector)."
    )
    log.warning(warning)
    return [warning]
