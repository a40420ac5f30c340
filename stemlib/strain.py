"""Lattice -> strain, shear and rotation in the stemflow convention (CONVENTIONS.md section 2).

All matrices are 2x2 in the detector frame ``(qx, qy)``: ``qx`` along pattern rows (array
axis 2 of a datacube), ``qy`` along pattern columns (axis 3).

- The deformation gradient ``F`` maps reference real-space lattice vectors to local ones,
  ``a' = F a``; reciprocal vectors, and so Bragg disk positions, move as ``g' = F^-T g``.
- Left polar decomposition ``F = V R``; strain ``e = V - I``: ``exx`` along ``qx``, ``eyy`` along
  ``qy``, ``exy`` the tensor shear (engineering shear is ``2 exy``); positive is tensile in real
  space (disks move towards the direct beam).
- ``theta`` is the angle of ``R`` in radians, positive from ``+qx`` towards ``+qy``, wrapped into
  ``(-pi/n, pi/n]`` for an n-fold lattice. ``V`` does not depend on that branch: a symmetry
  rotation ``S`` of the reference lattice gives the same lattice for ``F`` and ``F S``, and
  ``F S = V (R S)``.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import InputError

__all__ = [
    "rotation_matrix",
    "deformation_from_lattice",
    "lattice_from_deformation",
    "polar_decompose",
    "strain_from_deformation",
    "fold_rotation",
    "detect_symmetry",
    "reduce_basis",
    "reference_lattice",
    "strain_from_lattice",
    "rotate_strain",
    "strain_in_scan_frame",
]


def rotation_matrix(theta: np.ndarray | float) -> np.ndarray:
    """Rotation by ``theta`` (rad) from ``+qx`` towards ``+qy``, shape ``theta.shape + (2, 2)``.

    Examples
    --------
    >>> np.round(rotation_matrix(np.pi / 2) @ [1.0, 0.0], 12)
    array([0., 1.])
    """
    theta = np.asarray(theta, dtype=np.float64)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def deformation_from_lattice(g_local: np.ndarray, g_ref: np.ndarray) -> np.ndarray:
    """Deformation gradient ``F`` from local and reference reciprocal bases.

    Parameters
    ----------
    g_local
        Array of shape (..., 2, 2) whose columns are the local reciprocal vectors ``g1, g2`` as
        ``(qx, qy)`` components (px or 1/A, the same unit as ``g_ref``).
    g_ref
        Array of shape (2, 2) (or broadcastable): the reference basis, columns ``g1, g2``.

    Returns
    -------
    ndarray of shape (..., 2, 2)
        ``F`` with ``g_local = F^-T g_ref``, i.e. ``F = g_local^-T g_ref^T``. Unitless.

    Examples
    --------
    >>> g = np.array([[20.0, 0.0], [0.0, 20.0]])
    >>> np.round(deformation_from_lattice(g / 1.01, g), 12)  # disks move in: 1 % tensile
    array([[1.01, 0.  ],
           [0.  , 1.01]])
    """
    g_local = np.asarray(g_local, dtype=np.float64)
    g_ref = np.asarray(g_ref, dtype=np.float64)
    return np.swapaxes(np.linalg.inv(g_local), -1, -2) @ np.swapaxes(g_ref, -1, -2)


def lattice_from_deformation(F: np.ndarray, g_ref: np.ndarray) -> np.ndarray:
    """Local reciprocal basis ``F^-T g_ref`` (columns ``g1, g2``), the inverse of
    :func:`deformation_from_lattice`."""
    return np.swapaxes(np.linalg.inv(np.asarray(F, dtype=np.float64)), -1, -2) @ np.asarray(
        g_ref, np.float64
    )


def polar_decompose(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left polar decomposition ``F = V R`` of 2x2 matrices with positive determinant.

    Parameters
    ----------
    F
        Array of shape (..., 2, 2).

    Returns
    -------
    V : ndarray of shape (..., 2, 2)
        Symmetric positive-definite stretch.
    theta : ndarray of shape (...)
        Angle of ``R`` in rad, in ``(-pi, pi]``, positive from ``+qx`` towards ``+qy``.

    Notes
    -----
    In 2D the rotation of the polar decomposition has the closed form
    ``theta = atan2(F10 - F01, F00 + F11)``; then ``V = F R^T``.
    """
    F = np.asarray(F, dtype=np.float64)
    theta = np.arctan2(F[..., 1, 0] - F[..., 0, 1], F[..., 0, 0] + F[..., 1, 1])
    V = F @ np.swapaxes(rotation_matrix(theta), -1, -2)
    V = 0.5 * (V + np.swapaxes(V, -1, -2))  # remove rounding asymmetry
    return V, theta


def fold_rotation(theta: np.ndarray | float, symmetry: int) -> np.ndarray:
    """Wrap ``theta`` (rad) into ``(-pi/n, pi/n]`` for an n-fold lattice.

    Examples
    --------
    >>> round(float(np.degrees(fold_rotation(np.radians(100.0), 4))), 9)
    10.0
    >>> round(float(np.degrees(fold_rotation(np.radians(-45.0), 4))), 9)
    45.0
    """
    if symmetry not in (1, 2, 3, 4, 6):
        raise InputError(f"symmetry={symmetry!r} is not a 2D lattice symmetry; use 2, 4 or 6.")
    period = 2 * np.pi / symmetry
    half = period / 2
    return half - np.mod(half - np.asarray(theta, dtype=np.float64), period)


def strain_from_deformation(F: np.ndarray, *, symmetry: int = 1) -> dict[str, np.ndarray]:
    """Strain, shear and rotation of deformation gradients ``F`` (CONVENTIONS.md section 2).

    Parameters
    ----------
    F
        Array of shape (..., 2, 2) in the detector frame; NaN entries give NaN outputs.
    symmetry
        n of the lattice's n-fold symmetry in projection; ``theta`` is wrapped into
        ``(-pi/n, pi/n]``. 1 leaves it in ``(-pi, pi]``.

    Returns
    -------
    dict
        ``exx, eyy, exy`` (unit "1", tensor shear) and ``theta`` (rad), each of shape (...).

    Examples
    --------
    >>> F = rotation_matrix(np.radians(10.0)) @ np.diag([1.02, 0.99])
    >>> out = strain_from_deformation(F)
    >>> [round(float(out[k]), 6) for k in ("exx", "eyy", "exy")]
    [0.019095, -0.009095, 0.00513]
    >>> round(float(np.degrees(out["theta"])), 6)
    10.0
    """
    V, theta = polar_decompose(F)
    return {
        "exx": V[..., 0, 0] - 1.0,
        "eyy": V[..., 1, 1] - 1.0,
        "exy": V[..., 0, 1],
        "theta": fold_rotation(theta, symmetry) if symmetry > 1 else theta,
    }


def reduce_basis(basis: np.ndarray) -> np.ndarray:
    """Lagrange-Gauss reduction: the two shortest independent vectors of a 2D lattice.

    Parameters
    ----------
    basis
        (2, 2), columns ``g1, g2`` (independent).

    Returns
    -------
    ndarray of shape (2, 2)
        Columns ``a, b`` spanning the same lattice with ``|a| <= |b|`` and ``|a . b| <= |a|^2 / 2``,
        with ``det [a b] > 0`` (``b`` negated where needed).

    Examples
    --------
    >>> reduce_basis(np.array([[10.0, 30.0], [0.0, 10.0]]))
    array([[10.,  0.],
           [ 0., 10.]])
    """
    a, b = np.array(basis[:, 0], float), np.array(basis[:, 1], float)
    if a @ a > b @ b:
        a, b = b, a
    for _ in range(64):
        mu = round(float(a @ b) / float(a @ a))
        b = b - mu * a
        if b @ b >= a @ a:
            break
        a, b = b, a
    out = np.column_stack([a, b])
    if np.linalg.det(out) < 0:
        out[:, 1] *= -1
    return out


def detect_symmetry(
    g_ref: np.ndarray, *, length_tol: float = 0.03, angle_tol_deg: float = 3.0
) -> Literal[2, 4, 6]:
    """Rotational symmetry (2, 4 or 6) of a 2D lattice from its reciprocal basis.

    ``|g1| = |g2|`` and 90 deg between them -> 4; equal lengths and 60 or 120 deg -> 6; else 2.

    Examples
    --------
    >>> detect_symmetry(np.array([[20.0, 0.0], [0.0, 20.0]]))
    4
    >>> detect_symmetry(np.array([[20.0, 10.0], [0.0, 17.3205]]))
    6
    >>> detect_symmetry(np.array([[20.0, 0.0], [0.0, 25.0]]))
    2
    """
    g1, g2 = np.asarray(g_ref, np.float64)[:, 0], np.asarray(g_ref, np.float64)[:, 1]
    n1, n2 = np.linalg.norm(g1), np.linalg.norm(g2)
    if abs(n1 - n2) > length_tol * max(n1, n2):
        return 2
    angle = np.degrees(np.arccos(np.clip(g1 @ g2 / (n1 * n2), -1.0, 1.0)))
    if abs(angle - 90.0) < angle_tol_deg:
        return 4
    if min(abs(angle - 60.0), abs(angle - 120.0)) < angle_tol_deg:
        return 6
    return 2


def reference_lattice(g_local: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The median reciprocal basis over a reference region.

    Parameters
    ----------
    g_local
        Array of shape (RX, RY, 2, 2), columns ``g1, g2``; NaN where a position has no answer.
    mask
        Boolean array of shape (RX, RY), True in the reference region.

    Raises
    ------
    InputError
        If the region is empty or holds no valid lattice.
    """
    mask = np.asarray(mask, bool)
    if mask.shape != g_local.shape[:2]:
        raise InputError(
            f"the reference mask has shape {mask.shape}; "
            f"expected the scan shape {g_local.shape[:2]}."
        )
    region = g_local[mask]
    region = region[np.all(np.isfinite(region), axis=(-1, -2))]
    if region.shape[0] == 0:
        raise InputError(
            "the reference region holds no position with a measured lattice; choose another region."
        )
    return np.median(region, axis=0)


def strain_from_lattice(
    g_local: np.ndarray, g_ref: np.ndarray, *, symmetry: int = 1
) -> dict[str, np.ndarray]:
    """Strain maps from per-position reciprocal bases against a reference basis.

    Parameters
    ----------
    g_local
        Array of shape (..., 2, 2), columns ``g1, g2`` in (qx, qy); NaN where unknown.
    g_ref
        Array of shape (2, 2), the reference basis in the same units.
    symmetry
        Lattice symmetry n for the rotation branch.

    Returns
    -------
    dict
        ``exx, eyy, exy`` ("1"), ``theta`` (rad) of shape (...); NaN where ``g_local`` is NaN or
        singular.
    """
    g_local = np.asarray(g_local, np.float64)
    ok = np.all(np.isfinite(g_local), axis=(-1, -2))
    det = np.where(ok, np.linalg.det(np.where(ok[..., None, None], g_local, np.eye(2))), 0.0)
    ok &= np.abs(det) > 1e-12
    safe = np.where(ok[..., None, None], g_local, np.asarray(g_ref, np.float64))
    out = strain_from_deformation(deformation_from_lattice(safe, g_ref), symmetry=symmetry)
    return {k: np.where(ok, v, np.nan) for k, v in out.items()}


def rotate_strain(
    exx: np.ndarray, eyy: np.ndarray, exy: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Express a strain tensor in axes rotated by ``angle`` (rad) from ``(qx, qy)``.

    With ``Q`` the rotation by ``angle``, the tensor in the new axes is ``Q^T e Q``; use it with
    the scan-to-detector rotation to report ``*_scan`` fields.

    Examples
    --------
    >>> [round(float(v), 12) for v in rotate_strain(0.01, 0.0, 0.0, np.pi / 2)]
    [0.0, 0.01, -0.0]
    """
    e = np.stack([np.stack([exx, exy], -1), np.stack([exy, eyy], -1)], -2)
    Q = rotation_matrix(angle)
    r = np.swapaxes(Q, -1, -2) @ e @ Q
    return r[..., 0, 0], r[..., 1, 1], r[..., 0, 1]


def strain_in_scan_frame(
    exx: np.ndarray,
    eyy: np.ndarray,
    exy: np.ndarray,
    theta: np.ndarray,
    *,
    qr_rotation_deg: float,
    qr_flip: bool = False,
    symmetry: int = 1,
) -> dict[str, np.ndarray]:
    """Strain and rotation of the detector frame expressed in the scan's axes ``(rx, ry)``: the
    ``*_scan`` fields of CONVENTIONS.md section 2.

    A direction ``v = (qx, qy)`` of the detector lies along ``T v`` in the scan's axes, with
    ``T = R P``: ``P`` swaps qx and qy where ``qr_flip``, and ``R`` turns by ``qr_rotation_deg``
    from the first axis towards the second. These are py4DSTEM's ``QR_rotation_degrees`` and
    ``QR_flip`` as its calibrated Bragg vectors apply them. The strain tensor becomes
    ``T e T^T``; the lattice rotation keeps its angle, or changes its sign where the flip
    reverses the handedness (then wrapped again by ``symmetry``, :func:`fold_rotation`).

    Parameters
    ----------
    exx, eyy, exy, theta
        Arrays of one shape: strain ("1", tensor shear) and rotation (rad) in the detector
        frame; NaN stays NaN.
    qr_rotation_deg, qr_flip
        The scan-to-detector rotation (deg) and flip (:class:`stemlib.calibration.Calibration`).
    symmetry
        The lattice's n-fold symmetry.

    Returns
    -------
    dict
        ``exx, eyy, exy`` along ``rx`` and ``ry``, ``theta`` from ``+rx`` towards ``+ry``.

    Examples
    --------
    1 % tension along qx, on a detector turned by 90 deg against the scan, is tension along ry;
    with the flip as well, along rx, and the rotation changes sign:

    >>> def scan_frame(**kwargs):
    ...     out = strain_in_scan_frame(0.01, 0.0, 0.0, 0.1, qr_rotation_deg=90.0, **kwargs)
    ...     return [round(float(out[k]), 12) + 0.0 for k in ("exx", "eyy", "exy", "theta")]
    >>> scan_frame(), scan_frame(qr_flip=True)
    ([0.0, 0.01, 0.0, 0.1], [0.01, 0.0, 0.0, -0.1])
    """
    if qr_flip:  # P e P: the axes swapped
        exx, eyy = eyy, exx
    # R e R^T is e in axes turned the other way (rotate_strain's Q^T e Q with Q = R^T)
    exx, eyy, exy = rotate_strain(exx, eyy, exy, -np.radians(qr_rotation_deg))
    theta = np.asarray(theta, dtype=np.float64)
    return {
        "exx": exx,
        "eyy": eyy,
        "exy": exy,
        "theta": fold_rotation(-theta, symmetry) if qr_flip else theta,
    }
