"""Elliptic distortion of the detector: measure it on the reference lattice, take it out.

Projector lenses often map a circle of scattering angles onto a slightly elliptic ring on the
camera: a point ``u`` from the direct beam lands at ``E u`` with

``E = Q diag(1 + e/2, 1 - e/2) Q^T``,

``e`` the ellipticity and ``Q`` the rotation by the long axis' angle from ``+qx`` towards
``+qy``. ``E`` is fixed in the detector frame, so it does not cancel against the reference:
a grain turned by ``phi`` from the reference shows a spurious strain of about ``e phi``
(``e = 3 %`` at 10 deg: 5e-3). Reciprocal vectors move as ``g_det = E g``; a deformation
gradient measured on the detector is ``F_det = E^-1 F E``, so ``F = E F_det E^-1``.

A square or hexagonal lattice's first star of reflections (``g`` and its images under the
n-fold rotation) has an isotropic second moment, ``sum g g^T = c I``; on the detector it is
``c E^2``. The reference region's lattice is unstrained by definition, so its measured star
gives ``E`` (up to a scale that no strain depends on). A 2-fold lattice's star is anisotropic
on its own: its ellipse must be given (from a calibration standard).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError
from .strain import reduce_basis, rotation_matrix

log = logging.getLogger("stemlib.ellipse")

__all__ = [
    "DetectorEllipse",
    "ellipse_matrix",
    "first_star",
    "fit_ellipse",
    "detector_distortion",
    "undistort_lattice",
    "undistort",
]


class DetectorEllipse(BaseModel):
    """The detector's elliptic distortion, removed before the strain: measured or given.

    Examples
    --------
    >>> DetectorEllipse(ellipticity=0.02, angle_deg=30.0).ellipticity
    0.02
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ellipticity: float | Literal["auto"] = Field(
        "auto",
        description="'auto': measured on the reference region's lattice, which is taken to be "
        "unstrained, so that its anisotropy is the detector's (square and hexagonal lattices; a "
        "2-fold lattice is left as it is). A number: given, e.g. from a calibration standard; 0 "
        "removes nothing.",
    )
    angle_deg: float = Field(
        0.0,
        ge=-180,
        le=180,
        description="Long axis of a given ellipse, deg from +qx towards +qy (unused for 'auto').",
    )
    least: float = Field(
        0.005,
        ge=0,
        description="A measured ellipticity below this is not removed: on ideal (multislice) "
        "detectors the measurement reads 0.1-0.2 %, and removing that error from grains turned "
        "by tens of degrees would add strain of about its size.",
    )


def ellipse_matrix(ellipticity: float, angle_deg: float) -> np.ndarray:
    """Detector distortion ``E`` of shape (2, 2): a point ``u`` from the beam lands at ``E u``.

    Parameters
    ----------
    ellipticity
        ``e``: the long axis is scaled by ``1 + e/2``, the short one by ``1 - e/2`` (unitless).
    angle_deg
        Angle of the long axis, deg from ``+qx`` towards ``+qy``.

    Examples
    --------
    >>> np.round(ellipse_matrix(0.02, 90.0), 12) + 0.0
    array([[0.99, 0.  ],
           [0.  , 1.01]])
    """
    q = rotation_matrix(np.radians(angle_deg))
    return q @ np.diag([1 + ellipticity / 2, 1 - ellipticity / 2]) @ q.T


def first_star(basis: np.ndarray, symmetry: int) -> np.ndarray:
    """The first star of a square (n = 4) or hexagonal (n = 6) lattice, one of each ``+-g`` pair.

    Parameters
    ----------
    basis
        (2, 2), columns ``g1, g2`` spanning the lattice (any unit).
    symmetry
        4 or 6.

    Returns
    -------
    ndarray of shape (n / 2, 2)
        The shortest vectors: two at 90 deg (n = 4), three at 60 deg (n = 6).

    Examples
    --------
    >>> first_star(np.array([[10.0, 30.0], [0.0, 10.0]]), 4)
    array([[10.,  0.],
           [ 0., 10.]])
    >>> first_star(np.array([[2.0, 1.0], [0.0, 3**0.5]]), 6).round(6)
    array([[ 1.      ,  1.732051],
           [-1.      ,  1.732051],
           [-2.      ,  0.      ]])
    """
    if symmetry not in (4, 6):
        raise InputError(
            f"a {symmetry}-fold lattice does not show the detector's ellipse on its own; "
            "give the ellipse (ellipticity and angle) from a calibration standard."
        )
    a, b = reduce_basis(np.asarray(basis, np.float64)).T
    if symmetry == 4:
        return np.stack([a, b])
    c = b - a if np.linalg.norm(b - a) < np.linalg.norm(b + a) else b + a
    return np.stack([a, b, c])


def fit_ellipse(basis: np.ndarray, symmetry: int) -> tuple[float, float]:
    """Ellipticity and long-axis angle of the detector from a measured unstrained lattice.

    Parameters
    ----------
    basis
        (2, 2), columns ``g1, g2``: the reference lattice as measured on the detector.
    symmetry
        The lattice's n-fold symmetry: 4 or 6 (a 2-fold lattice raises
        :class:`~stemlib.errors.InputError`).

    Returns
    -------
    ellipticity : float
        ``e >= 0`` (unitless) of :func:`ellipse_matrix`.
    angle_deg : float
        The long axis, deg from ``+qx`` towards ``+qy``, in ``(-90, 90]``.

    Examples
    --------
    >>> g = ellipse_matrix(0.03, 25.0) @ rotation_matrix(0.3) @ np.diag([20.0, 20.0])
    >>> [round(v, 9) for v in fit_ellipse(g, 4)]
    [0.03, 25.0]
    """
    star = first_star(basis, symmetry)
    moment = star.T @ star
    values, vectors = np.linalg.eigh(moment)
    small, large = np.sqrt(values)
    ellipticity = float(2 * (large - small) / (large + small))
    angle = float(np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1])))
    angle = angle - 180.0 if angle > 90.0 else angle + 180.0 if angle <= -90.0 else angle
    return ellipticity, angle


def detector_distortion(
    setting: DetectorEllipse, symmetry: int, measure: Callable[[], np.ndarray]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The distortion ``E`` to remove, and a record of it for a result's attributes.

    Parameters
    ----------
    setting
        Given or ``"auto"`` (:class:`DetectorEllipse`).
    symmetry
        The lattice's n-fold symmetry; ``"auto"`` measures only a 4- or 6-fold lattice.
    measure
        Returns the reference lattice as measured on the detector, (2, 2) columns ``g1, g2``;
        called only for ``"auto"``. An :class:`~stemlib.errors.InputError` it raises (no
        lattice to measure) leaves the detector as it is, with the reason in the record.

    Returns
    -------
    distortion : ndarray of shape (2, 2)
        ``E`` (:func:`ellipse_matrix`), the identity when nothing is removed.
    record : dict
        ``ellipticity``, ``angle_deg``, ``removed`` (bool) and ``how`` (a sentence).

    Examples
    --------
    >>> E, record = detector_distortion(DetectorEllipse(), 2, lambda: np.eye(2))
    >>> record["how"]
    'not measured: a 2-fold lattice does not show the ellipse; give it in the config'
    """
    if setting.ellipticity != "auto":
        e, angle = float(setting.ellipticity), setting.angle_deg
        how = "given"
        removed = e != 0
    elif symmetry not in (4, 6):
        e, angle, removed = 0.0, 0.0, False
        how = (
            f"not measured: a {symmetry}-fold lattice does not show the ellipse; "
            "give it in the config"
        )
    else:
        try:
            e, angle = fit_ellipse(measure(), symmetry)
        except InputError as exc:  # the strain is still worth having; the record says why
            log.warning("the detector's ellipse was not measured: %s", exc)
            e, angle, removed, how = 0.0, 0.0, False, f"not measured: {exc}"
        else:
            removed = e >= setting.least
            how = "measured on the reference lattice" + (
                "" if removed else f", below least={setting.least:g}: not removed"
            )
    record = {"ellipticity": e, "angle_deg": angle, "removed": removed, "how": how}
    return (ellipse_matrix(e, angle) if removed else np.eye(2)), record


def undistort_lattice(g: np.ndarray, distortion: np.ndarray) -> np.ndarray:
    """Reciprocal vectors (columns, shape (..., 2, N)) as they would be without ``E``:
    ``E^-1 g``."""
    return np.linalg.inv(np.asarray(distortion, np.float64)) @ np.asarray(g, np.float64)


def undistort(F: np.ndarray, distortion: np.ndarray) -> np.ndarray:
    """Deformation gradients measured on the detector, (..., 2, 2), without ``E``:
    ``E F E^-1``.

    Examples
    --------
    >>> E = ellipse_matrix(0.03, 25.0)
    >>> F = rotation_matrix(np.radians(40.0))
    >>> seen = np.linalg.inv(E) @ F @ E  # a turned, unstrained grain on an elliptic detector
    >>> bool(np.allclose(undistort(seen, E), F))
    True
    """
    E = np.asarray(distortion, np.float64)
    return E @ np.asarray(F, np.float64) @ np.linalg.inv(E)
