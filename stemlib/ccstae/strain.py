"""From the learned warps to strain in the stemflow convention (CONVENTIONS.md section 2).

Each pattern's warp ``A`` maps its base onto it: a base disk at ``g`` sits at ``A g`` in the
pattern (:mod:`stemlib.ccstae.affine`), so relative to the base ``F_b^-T = A``, i.e.
``F_b = A^-T``. Against the reference region, whose median is ``F_ref``, the local deformation is
``F = F_b F_ref^-1`` (reference lattice ``g_ref = F_ref^-T g_base``, local ``g = F_b^-T g_base``
``= (F_b F_ref^-1)^-T g_ref``). ``F = V R`` then gives ``e = V - I`` and ``theta``
(:func:`stemlib.strain.strain_from_deformation`).

Rotations are only defined modulo the lattice's n-fold symmetry: before the median, each
``F_b = V_b R(theta_b)`` is re-expressed with ``theta_b`` in the branch nearest the reference
region's mean rotation (``V_b`` does not change), so a reference grain that straddles a branch
boundary still has a meaningful median.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..strain import fold_rotation, polar_decompose, rotation_matrix, strain_from_deformation

__all__ = ["deformation_from_affine", "fold_deformation", "strain_from_affine"]


def deformation_from_affine(matrix: np.ndarray) -> np.ndarray:
    """``F_b = A^-T`` for warps ``A`` of shape (..., 2, 2) (NaN where ``A`` is NaN or singular).

    Examples
    --------
    >>> A = np.diag([1 / 1.02, 1.0])  # base disks at g/1.02 along qx: 2 % tensile along qx
    >>> np.round(deformation_from_affine(A), 6)
    array([[1.02, 0.  ],
           [0.  , 1.  ]])
    """
    matrix = np.asarray(matrix, np.float64)
    ok = np.all(np.isfinite(matrix), axis=(-1, -2))
    safe = np.where(ok[..., None, None], matrix, np.eye(2))
    det = np.linalg.det(safe)
    ok &= np.abs(det) > 1e-12
    safe = np.where(ok[..., None, None], safe, np.eye(2))
    out = np.swapaxes(np.linalg.inv(safe), -1, -2)
    return np.where(ok[..., None, None], out, np.nan)


def fold_deformation(F: np.ndarray, symmetry: int, *, around: float = 0.0) -> np.ndarray:
    """Re-express ``F = V R(theta)`` with ``theta`` in ``around + (-pi/n, pi/n]``.

    ``V`` is unchanged: for an n-fold lattice ``F`` and ``F R(2 pi k / n)`` describe the same
    deformed lattice. Shape (..., 2, 2) in and out.
    """
    V, theta = polar_decompose(F)
    folded = around + fold_rotation(theta - around, symmetry) if symmetry > 1 else theta
    return V @ rotation_matrix(folded)


def _circular_mean(theta: np.ndarray, symmetry: int) -> float:
    n = max(symmetry, 1)
    z = np.exp(1j * n * theta)
    return float(np.angle(z.mean()) / n)


def strain_from_affine(
    matrix: np.ndarray, *, reference: np.ndarray, symmetry: int, valid: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Strain maps from per-position warps ``A`` against a reference region.

    Parameters
    ----------
    matrix
        Array of shape (RX, RY, 2, 2): ``A`` per position (base -> pattern, (qx, qy) frame).
    reference
        Boolean array of shape (RX, RY): the reference region.
    symmetry
        n of the lattice's n-fold symmetry (2, 4 or 6); ``theta`` is wrapped into
        ``(-pi/n, pi/n]``.
    valid
        Boolean array of shape (RX, RY); positions outside are NaN.

    Returns
    -------
    strain : dict
        ``exx, eyy, exy`` ("1", detector frame, tensor shear) and ``theta`` (rad), (RX, RY).
    F : ndarray of shape (RX, RY, 2, 2)
        The deformation gradient against the reference.

    Raises
    ------
    InputError
        If the reference region holds no valid position.
    """
    F_b = deformation_from_affine(matrix)
    ok = np.all(np.isfinite(F_b), axis=(-1, -2))
    if valid is not None:
        ok &= np.asarray(valid, bool)
    reference = np.asarray(reference, bool) & ok
    if not reference.any():
        raise InputError(
            "the reference region holds no position with a valid CC-ST-AE answer; choose "
            "another region."
        )
    safe = np.where(ok[..., None, None], F_b, np.eye(2))
    _, theta_b = polar_decompose(safe)
    around = _circular_mean(theta_b[reference], symmetry)
    folded = fold_deformation(safe, symmetry, around=around)
    F_ref = np.median(folded[reference], axis=0)
    F = folded @ np.linalg.inv(F_ref)
    strain = strain_from_deformation(F, symmetry=symmetry)
    strain = {k: np.where(ok, v, np.nan) for k, v in strain.items()}
    return strain, np.where(ok[..., None, None], F, np.nan)
