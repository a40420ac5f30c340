"""Detector masks: rings, disks and sets of disks, and ring schedules for training.

Masks are boolean arrays of shape (H, W) over a diffraction pattern, ``qx`` = pattern rows
(axis 0 of a pattern, axis 2 of a datacube) and ``qy`` = columns. A pixel belongs to a mask when
the distance from its centre (integer row, column) to the mask's centre satisfies the radius
condition; centres are (qx, qy) in pixels and may be fractional. ``center=None`` is the direct
beam at ``(H // 2, W // 2)``, the zero of ``fftshift(fftfreq(n))``.

A :class:`MaskSchedule` is a ring whose radii shrink over training epochs, stored as data (a
pydantic model) so that a training run records it in its configuration.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop (ring masks on the loss).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InputError

__all__ = ["ring_mask", "disk_mask", "multi_disk_mask", "MaskSchedule"]

#: Disks handled per vectorised step of :func:`multi_disk_mask` (bounds its memory).
_DISKS_PER_STEP = 16


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise InputError(
            f"shape={shape!r} is not two integers; pass (H, W), e.g. (128, 128)."
        ) from None
    if h < 1 or w < 1 or (h, w) != tuple(shape):
        raise InputError(
            f"shape={tuple(shape)!r} must be two positive integers (H, W), e.g. (128, 128)."
        )
    return h, w


def _check_center(
    center: tuple[float, float] | None, shape: tuple[int, int]
) -> tuple[float, float]:
    if center is None:
        return float(shape[0] // 2), float(shape[1] // 2)
    c = np.asarray(center, dtype=np.float64)
    if c.shape != (2,) or not np.all(np.isfinite(c)):
        raise InputError(
            f"center={center!r} must be two finite numbers (qx, qy) in pixels, or None for the "
            "direct beam."
        )
    return float(c[0]), float(c[1])


def _check_radius(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name}={value!r} must be a finite radius >= 0 in pixels.")
    return float(value)


def _squared_distance(shape: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    rows = (np.arange(shape[0], dtype=np.float64) - center[0]) ** 2
    cols = (np.arange(shape[1], dtype=np.float64) - center[1]) ** 2
    return rows[:, None] + cols[None, :]


def ring_mask(
    shape: tuple[int, int], *, inner: float, outer: float, center: tuple[float, float] | None = None
) -> np.ndarray:
    """Pixels whose distance ``r`` from ``center`` satisfies ``inner <= r <= outer``.

    Parameters
    ----------
    shape
        (H, W) of the pattern; ``qx`` = rows (axis 0), ``qy`` = columns.
    inner, outer
        Radii in px, ``0 <= inner <= outer``.
    center
        (qx, qy) in px, sub-pixel allowed; None is ``(H // 2, W // 2)``.

    Returns
    -------
    ndarray of shape (H, W), bool

    Raises
    ------
    InputError
        For a negative or non-finite radius, ``inner > outer``, or a bad shape or centre.

    Examples
    --------
    >>> ring_mask((5, 5), inner=1, outer=1).astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 0, 1, 0, 0],
           [0, 1, 0, 1, 0],
           [0, 0, 1, 0, 0],
           [0, 0, 0, 0, 0]])
    """
    shape = _check_shape(shape)
    inner, outer = _check_radius("inner", inner), _check_radius("outer", outer)
    if inner > outer:
        raise InputError(f"inner={inner} is larger than outer={outer}; pass inner <= outer.")
    d2 = _squared_distance(shape, _check_center(center, shape))
    return (d2 >= inner * inner) & (d2 <= outer * outer)


def disk_mask(
    shape: tuple[int, int], *, radius: float, center: tuple[float, float] | None = None
) -> np.ndarray:
    """Pixels within ``radius`` px of ``center`` (``r <= radius``).

    Parameters
    ----------
    shape
        (H, W) of the pattern; ``qx`` = rows (axis 0), ``qy`` = columns.
    radius
        Radius in px, >= 0.
    center
        (qx, qy) in px, sub-pixel allowed; None is ``(H // 2, W // 2)``.

    Returns
    -------
    ndarray of shape (H, W), bool

    Examples
    --------
    >>> int(disk_mask((9, 9), radius=1).sum())
    5
    >>> disk_mask((4, 4), radius=0.75, center=(0.5, 0.5)).astype(int)[:2, :2]
    array([[1, 1],
           [1, 1]])
    """
    shape = _check_shape(shape)
    radius = _check_radius("radius", radius)
    return _squared_distance(shape, _check_center(center, shape)) <= radius * radius


def multi_disk_mask(shape: tuple[int, int], *, centers: np.ndarray, radius: float) -> np.ndarray:
    """The union of disks of one ``radius`` around each of ``centers``.

    Parameters
    ----------
    shape
        (H, W) of the pattern; ``qx`` = rows (axis 0), ``qy`` = columns.
    centers
        Array of shape (K, 2): disk centres (qx, qy) in px, sub-pixel allowed; centres outside
        the pattern contribute the part of their disk that falls inside. K may be 0.
    radius
        Radius in px, >= 0.

    Returns
    -------
    ndarray of shape (H, W), bool

    Notes
    -----
    Vectorised over disks in steps of 16, so memory stays at about 16 x H x W bytes whatever K.

    Examples
    --------
    >>> m = multi_disk_mask((8, 8), centers=np.array([[2.0, 2.0], [5.0, 5.0]]), radius=1)
    >>> int(m.sum()), bool(m[2, 3]), bool(m[5, 4]), bool(m[3, 3])
    (10, True, True, False)
    """
    shape = _check_shape(shape)
    radius = _check_radius("radius", radius)
    c = np.asarray(centers, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or not np.all(np.isfinite(c)):
        raise InputError(
            f"centers has shape {c.shape}; pass a finite array of shape (K, 2) of (qx, qy) px."
        )
    rows = np.arange(shape[0], dtype=np.float64)
    cols = np.arange(shape[1], dtype=np.float64)
    out = np.zeros(shape, dtype=bool)
    r2 = radius * radius
    for start in range(0, c.shape[0], _DISKS_PER_STEP):
        step = c[start : start + _DISKS_PER_STEP]
        dr = (rows[None, :] - step[:, :1]) ** 2  # (k, H)
        dc = (cols[None, :] - step[:, 1:]) ** 2  # (k, W)
        out |= np.any(dr[:, :, None] + dc[:, None, :] <= r2, axis=0)
    return out


class MaskSchedule(BaseModel):
    """A ring mask whose radii go from ``start`` to ``end`` over training epochs.

    Epoch 0 has the ``start`` radii, epoch ``epochs - 1`` (the last) the ``end`` radii, and later
    epochs keep them. In between:

    - ``"constant"``: always ``start`` (``end`` is not used);
    - ``"linear"``: ``start + (end - start) t`` with ``t = epoch / (epochs - 1)``;
    - ``"cosine"``: ``start + (end - start) (1 - cos(pi t)) / 2``, slow at both ends;
    - ``"step"``: the radii hold for ``step_every`` epochs at a time, in equal steps from
      ``start`` (first block) to ``end`` (block that holds the last epoch).

    With ``epochs == 1`` the single epoch is the last one and has the ``end`` radii.

    ``recenter`` asks the trainer to centre the ring on the centre of mass of the learned
    base's disks (:meth:`center_from`) instead of the nominal direct beam.

    Examples
    --------
    >>> s = MaskSchedule(kind="linear", start=(10, 60), end=(5, 40), epochs=5)
    >>> [s.radii(e) for e in (0, 2, 4, 9)]
    [(10.0, 60.0), (7.5, 50.0), (5.0, 40.0), (5.0, 40.0)]
    >>> MaskSchedule.model_validate_json(s.model_dump_json()) == s
    True
    >>> int(s.mask((128, 128), 4).sum()) > 0
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["constant", "linear", "cosine", "step"] = Field(
        "linear", description="How the radii go from start to end."
    )
    start: tuple[float, float] = Field(description="(inner, outer) ring radii in px at epoch 0.")
    end: tuple[float, float] = Field(
        description="(inner, outer) ring radii in px at the last epoch."
    )
    epochs: int = Field(ge=1, description="Epochs over which the radii go from start to end.")
    step_every: int = Field(1, ge=1, description='Epochs per step for kind="step".')
    recenter: bool = Field(
        False, description="Centre the ring on the centre of mass of the learned base's disks."
    )

    @field_validator("start", "end")
    @classmethod
    def _inner_below_outer(cls, radii: tuple[float, float]) -> tuple[float, float]:
        inner, outer = radii
        if not (math.isfinite(inner) and math.isfinite(outer)) or inner < 0 or inner > outer:
            raise ValueError(f"radii {radii} must be (inner, outer) in px with 0 <= inner <= outer")
        return float(inner), float(outer)

    def _fraction(self, epoch: int) -> float:
        last = self.epochs - 1
        if self.kind == "constant":
            return 0.0
        if last == 0:
            return 1.0
        if self.kind == "step":
            blocks = max(1, last // self.step_every)
            return min(1.0, (epoch // self.step_every) / blocks)
        t = min(epoch, last) / last
        return t if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))

    def radii(self, epoch: int) -> tuple[float, float]:
        """(inner, outer) ring radii in px at ``epoch`` (0-based).

        Raises
        ------
        InputError
            For a negative epoch.
        """
        if epoch < 0:
            raise InputError(f"epoch={epoch} is negative; epochs count from 0.")
        t = self._fraction(int(epoch))
        return (
            self.start[0] + (self.end[0] - self.start[0]) * t,
            self.start[1] + (self.end[1] - self.start[1]) * t,
        )

    def mask(
        self, shape: tuple[int, int], epoch: int, center: tuple[float, float] | None = None
    ) -> np.ndarray:
        """The ring at ``epoch`` as a bool array of shape (H, W) (see :func:`ring_mask`)."""
        inner, outer = self.radii(epoch)
        return ring_mask(shape, inner=inner, outer=outer, center=center)

    def center_from(
        self, base: np.ndarray, *, threshold: float = 2.0, radius: float | None = None
    ) -> tuple[float, float] | None:
        """Where to centre the ring for a learned ``base``: None unless ``recenter`` is set.

        Parameters
        ----------
        base
            Array of shape (H, W), the learned base pattern (``qx`` = rows).
        threshold
            Pixels brighter than ``threshold`` x the base's mean are the disks.
        radius
            Only disks within this many px of the pattern centre count (None: all).

        Returns
        -------
        tuple of float or None
            (qx, qy) in px: the intensity-weighted centre of mass of the disk pixels; None when
            ``recenter`` is False or no pixel passes the threshold (keep the nominal centre).
        """
        if not self.recenter:
            return None
        base = np.asarray(base, dtype=np.float64)
        if base.ndim != 2:
            raise InputError(f"base has shape {base.shape}; pass one pattern of shape (H, W).")
        keep = base > threshold * base.mean()
        if radius is not None:
            keep &= disk_mask(base.shape, radius=radius)  # type: ignore[arg-type]
        weights = np.where(keep, base, 0.0)
        total = weights.sum()
        if not total > 0:
            return None
        rows, cols = np.indices(base.shape, dtype=np.float64)
        return float((weights * rows).sum() / total), float((weights * cols).sum() / total)
