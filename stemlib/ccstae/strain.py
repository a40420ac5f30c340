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

from collections.abc import Callable
from typing import Any

import numpy as np

from ..ellipse import DetectorEllipse, detector_distortion, ellipse_matrix, fit_ellipse
from ..errors import InputError
from ..reference import auto_reference
from ..strain import fold_rotation, polar_decompose, rotation_matrix, strain_from_deformation

__all__ = [
    "base_lattice_from_reference",
    "remove_ellipse",
    "deformation_from_affine",
    "fold_deformation",
    "strain_from_affine",
    "strain_from_warps",
    "symmetric_correction",
    "refine_correction",
]


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


def symmetric_correction(
    lattice: np.ndarray | None, symmetry: int, *, most: float = 0.02
) -> np.ndarray:
    """The distortion ``B`` of a base's reciprocal basis from the nearest n-fold lattice.

    Parameters
    ----------
    lattice
        Reciprocal basis of the base, columns ``g1, g2`` (px), shape (2, 2); or None.
    symmetry
        n: 4 (square) or 6 (hexagonal) are corrected; any other n (and None) gives ``I``.
    most
        Largest anisotropy of ``B`` believed: the largest ``|s - 1|`` over the principal
        stretches ``s`` of ``B`` (polar decomposition, scaled to unit determinant), so that the
        rotation ``B`` carries when ``g1`` is not along the ideal's does not count. A base is
        learned from one lattice and is within about 1.5 % of its symmetry (measured: 1 % on Si,
        1.4 % on the demo's scan, where its 0.6 deg skew made an element of ``B - I`` 2.2 %); a
        larger distortion is a misfit of its disks, and correcting by it would put that error
        on every grain on another branch: ``I`` then. Disks can misfit by less (1.9 % on
        multislice WS2, whose wide disks carry dynamical gradients and whose base the reference
        shows square within 0.1 %): :func:`strain_from_warps` measures the reference's base on
        the reference's lattice instead, and finds the reference with and without ``B``.

    Returns
    -------
    ndarray of shape (2, 2)
        ``B`` with ``lattice = B @ ideal``, where ``ideal`` keeps ``g1``'s direction, has both
        vectors of the mean length, and ``g2`` at 90 deg (n = 4) or the nearest of +-60,
        +-120 deg (n = 6) from ``g1``, on ``g2``'s side.

    Examples
    --------
    >>> B = symmetric_correction(np.array([[10.0, 0.0], [0.0, 10.3]]), 4)
    >>> np.round(B, 4) + 0.0
    array([[0.9852, 0.    ],
           [0.    , 1.0148]])
    >>> symmetric_correction(np.array([[10.0, 0.0], [0.0, 11.0]]), 4)  # 5 %: a misfit
    array([[1., 0.],
           [0., 1.]])
    """
    if lattice is None or symmetry not in (4, 6):
        return np.eye(2)
    g1, g2 = np.asarray(lattice, np.float64).T
    length = 0.5 * (np.linalg.norm(g1) + np.linalg.norm(g2))
    measured = np.arctan2(g1[0] * g2[1] - g1[1] * g2[0], g1 @ g2)
    steps = np.radians([90.0, -90.0] if symmetry == 4 else [60.0, -60.0, 120.0, -120.0])
    angle = steps[np.argmin(np.abs(np.angle(np.exp(1j * (steps - measured)))))]
    c1 = g1 / np.linalg.norm(g1) * length
    c2 = rotation_matrix(np.array(angle)) @ c1
    ideal = np.stack([c1, c2], axis=1)
    distortion = np.asarray(lattice, np.float64) @ np.linalg.inv(ideal)
    stretches = np.linalg.svd(distortion, compute_uv=False)
    anisotropy = np.abs(stretches / np.sqrt(np.prod(stretches)) - 1).max()
    return distortion if anisotropy <= most else np.eye(2)


def refine_correction(
    matrix: np.ndarray,
    correction: np.ndarray,
    valid: np.ndarray,
    *,
    symmetry: int,
    tolerance: float = 5e-3,
    turn: float = 0.01,
    most: float = 0.02,
) -> np.ndarray:
    """Refine a base's distortion ``B`` so that one lattice has one stretch on every branch.

    ``B`` measured from the base's disks is good to a few 0.1 %; positions of one grain that
    the network put on different branches then still differ in stretch by that much. The
    stretch ``V`` of ``(A B)^-T`` is the same on every branch only for the right ``B``, so this
    minimises ``sum min(|V_p - V_q|, tolerance)`` (Frobenius) over neighbouring valid positions
    on *different* branches, over ``B = B0 (I + D)`` with ``D`` symmetric and traceless (a
    rotation or scale in ``B`` changes no stretch difference). The cap leaves grain boundaries
    out: there the stretches differ by the grains' strain, and pulling them together would
    distort every grain.

    Parameters
    ----------
    matrix
        Warps ``A`` of the positions of one base, shape (RX, RY, 2, 2).
    correction
        The measured ``B0`` (:func:`symmetric_correction`), shape (2, 2).
    valid
        (RX, RY) bool: the positions to use (those of this base with an answer).
    symmetry
        n of the base's n-fold lattice: branches are rotations by multiples of 2 pi / n.
    tolerance
        Stretch difference (Frobenius, "1") above which a pair counts as a grain boundary.
    turn
        Difference of rotation (rad, modulo the branches) above which a pair counts as a grain
        boundary: one grain on two branches is one lattice turned by 2 pi / n. Without it, two
        grains turned by tens of degrees whose noisy stretches came within ``tolerance`` at
        their boundary pulled ``B`` by 0.6 % (1e-2 errors on every grain of the other branch).
    most
        Largest refinement ``|D|`` (any entry) taken for the base's own distortion. Beyond it
        the stretches differ between branches for another reason, which no ``B`` explains: an
        elliptic detector distortion left on the warps (:mod:`stemlib.ellipse` removes it
        first), fixed in the detector frame, stretches each grain differently by its rotation
        (3 % of it gave ``|D|`` = 8 % and grain errors of 4-19 %).

    Returns
    -------
    ndarray of shape (2, 2)
        The refined ``B``; ``B0`` when fewer than 8 neighbouring pairs on different branches
        agree within ``tolerance`` (every grain on one branch: nothing to refine), or when the
        refinement exceeds ``most``.
    """
    from scipy.optimize import minimize

    matrix = np.asarray(matrix, np.float64)
    correction = np.asarray(correction, np.float64)
    valid = np.asarray(valid, bool) & np.all(np.isfinite(matrix), axis=(-1, -2))
    safe = np.where(valid[..., None, None], matrix, np.eye(2))

    def stretch(B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return polar_decompose(deformation_from_affine(safe @ B))

    V0, theta = stretch(correction)
    branch = np.round(theta * symmetry / (2 * np.pi)).astype(int) % symmetry
    pairs = []
    for head, tail in (
        ((slice(1, None),), (slice(None, -1),)),
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
    ):
        both = valid[head] & valid[tail] & (branch[head] != branch[tail])
        both &= np.linalg.norm(V0[head] - V0[tail], axis=(-1, -2)) < tolerance
        both &= np.abs(fold_rotation(theta[head] - theta[tail], symmetry)) < turn
        pairs.append((both, head, tail))
    if sum(int(both.sum()) for both, *_ in pairs) < 8:
        return correction

    def distortion(p: np.ndarray) -> np.ndarray:
        return correction @ (np.eye(2) + np.array([[p[0], p[1]], [p[1], -p[0]]]))

    def cost(p: np.ndarray) -> float:
        V, _ = stretch(distortion(p))
        total = 0.0
        for both, head, tail in pairs:
            diff = np.linalg.norm(V[head] - V[tail], axis=(-1, -2))
            total += float(np.minimum(diff[both], tolerance).sum())
        return total

    best = minimize(cost, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    return correction if np.abs(best.x).max() > most else distortion(best.x)


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


def base_lattice_from_reference(
    matrix: np.ndarray, where: np.ndarray, lattice: np.ndarray, symmetry: int
) -> np.ndarray:
    """A base's reciprocal basis from the reference region's measured lattice and its warps.

    A pattern's disks sit at ``A g`` for the base's ``g``, so the base's lattice is
    ``A_ref^-1 g_ref``, with ``A_ref^-1`` the reference region's median inverse warp, taken on
    one branch. The network puts the reference's patterns on any of the n branches: with a base
    distortion ``D``, ``A^-1 = D R_k^-1`` on branch k, whose left stretch (that of ``D``) is the
    same on every branch, so ``A^-1 = V R`` is folded about the region's circular mean rotation
    (the stretch of ``F_b = A^-T`` is ``D``'s turned by ``R_k``: its median mixed the branches
    and, on the demo's scan, reversed the base's 1.4 % distortion). The reference lattice,
    measured on the mean of its patterns, is far more precise than the disks of the learned
    base picture, which are blurred and whose centres lock to whole pixels.

    Parameters
    ----------
    matrix
        Warps ``A`` of shape (RX, RY, 2, 2) (base -> pattern).
    where
        (RX, RY) bool: the reference positions of this base.
    lattice
        (2, 2) the reference lattice in the frame of ``matrix``, columns ``g1, g2`` (px).
    symmetry
        n of the lattice's n-fold symmetry.

    Returns
    -------
    ndarray of shape (2, 2)
        The base's basis, columns ``g1, g2`` (px).

    Examples
    --------
    >>> A = np.broadcast_to(rotation_matrix(0.3) * 1.01, (2, 2, 2, 2))
    >>> g = np.array([[16.0, 0.0], [0.0, 16.0]])
    >>> np.round(base_lattice_from_reference(A, np.ones((2, 2), bool), A[0, 0] @ g, 4), 6) + 0.0
    array([[16.,  0.],
           [ 0., 16.]])
    """
    F_b = deformation_from_affine(np.asarray(matrix, np.float64)[np.asarray(where, bool)])
    inverse = np.swapaxes(F_b[np.all(np.isfinite(F_b), axis=(-1, -2))], -1, -2)  # A^-1 = F_b^T
    _, theta = polar_decompose(inverse)
    folded = fold_deformation(inverse, symmetry, around=_circular_mean(theta, symmetry))
    return np.median(folded, 0) @ np.asarray(lattice, np.float64)


def remove_ellipse(
    matrix: np.ndarray,
    lattices: list[np.ndarray | None],
    classes: np.ndarray,
    where: np.ndarray,
    distortion: np.ndarray,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Warps and base lattices without the detector's elliptic distortion ``E``.

    A pattern is seen through ``E``: ``P = E P'``. A base is a detector picture too, but turned
    by the rotation ``R_c`` of its warps (it is learned from patterns warped back onto it), so
    it is seen through ``E_c = R_c^-1 E R_c``: ``base = E_c base'``. From ``P = A base``,
    ``P' = (E^-1 A E_c) base'``. (With ``E`` on both sides instead, the base of a grain turned
    by 40 deg keeps about ``e`` of shear, which only a branch correction beyond its bounds
    could take out: 1e-2 errors on the grains of the other branches.)

    Parameters
    ----------
    matrix
        Warps ``A`` (base -> pattern), shape (RX, RY, 2, 2); NaN where unknown.
    lattices
        Each base's reciprocal basis (2, 2) on the detector's pixel grid, or None.
    classes
        (RX, RY) int: each position's base.
    where
        (RX, RY) bool: the positions whose warps give a base's rotation (the reference region;
        a base without one there uses all of its positions).
    distortion
        ``E``, shape (2, 2) (:func:`stemlib.ellipse.ellipse_matrix`).

    Returns
    -------
    matrix : ndarray of shape (RX, RY, 2, 2)
        ``E^-1 A E_c``.
    lattices : list
        ``E_c^-1 g`` for each base.

    Examples
    --------
    >>> from stemlib.ellipse import ellipse_matrix
    >>> E, R = ellipse_matrix(0.03, 25.0), rotation_matrix(np.radians(40.0))
    >>> base = np.linalg.inv(R) @ E @ np.diag([16.0, 16.0])  # an unstrained pattern, turned
    >>> A = np.broadcast_to(R, (1, 1, 2, 2))
    >>> m, (g,) = remove_ellipse(A, [base], np.zeros((1, 1), int), np.ones((1, 1), bool), E)
    >>> bool(np.allclose(m[0, 0], R)), bool(np.allclose(g, np.linalg.inv(R) @ np.diag([16.0] * 2)))
    (True, True)
    """
    matrix = np.asarray(matrix, np.float64)
    E = np.asarray(distortion, np.float64)
    inverse = np.linalg.inv(E)
    out = np.full_like(matrix, np.nan)
    turned: list[np.ndarray | None] = []
    known = np.all(np.isfinite(matrix), axis=(-1, -2))
    for c, lattice in enumerate(lattices):
        mine = (classes == c) & known
        pick = mine & where if (mine & where).any() else mine
        if not pick.any():
            turned.append(lattice)
            continue
        _, theta = polar_decompose(matrix[pick])
        R = rotation_matrix(_circular_mean(theta, 1))
        E_c = R.T @ E @ R
        out[mine] = inverse @ matrix[mine] @ E_c
        turned.append(None if lattice is None else np.linalg.inv(E_c) @ lattice)
    return out, turned


def strain_from_affine(
    matrix: np.ndarray,
    *,
    reference: np.ndarray,
    symmetry: int,
    valid: np.ndarray | None = None,
    correction: np.ndarray | None = None,
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
    correction
        Each position's base distortion ``B`` (:func:`symmetric_correction`), shape (2, 2) or
        (RX, RY, 2, 2); identity if None.

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
    if correction is not None:
        matrix = np.asarray(matrix, np.float64) @ np.asarray(correction, np.float64)
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


def _base_corrections(
    matrix: np.ndarray,
    lattices: list[np.ndarray | None],
    classes: np.ndarray,
    valid: np.ndarray,
    *,
    symmetry: int,
) -> np.ndarray:
    """Each position's base distortion ``B`` (2, 2): measured on its base's lattice
    (:func:`symmetric_correction`) and, for a 4- or 6-fold lattice, refined so that one
    lattice has one stretch on every branch (:func:`refine_correction`). Shape (RX, RY, 2, 2)."""
    per_base = np.stack([symmetric_correction(g, symmetry) for g in lattices])
    if symmetry in (4, 6):
        per_base = np.stack(
            [
                refine_correction(matrix, b, valid & (classes == c), symmetry=symmetry)
                for c, b in enumerate(per_base)
            ]
        )
    return per_base[classes]


def _largest_reference(
    matrix: np.ndarray,
    lattices: list[np.ndarray | None],
    classes: np.ndarray,
    valid: np.ndarray,
    *,
    symmetry: int,
) -> np.ndarray:
    """The largest region of one lattice (:func:`stemlib.reference.auto_reference`) among the
    warps, each folded onto one branch, corrected by their bases' distortions as the bases'
    disks measure them, or not corrected, whichever finds the larger region.

    One grain put on several branches is one region only under its base's true distortion
    (the demo's base is 1.4 % off square: uncorrected, its unstrained grain fell apart and a
    strained one was taken); a base whose disks misfit (1.9 % on multislice WS2, whose base
    is square within 0.1 %) would split it under the measured one instead.
    """
    regions, failures = [], []
    measured = _base_corrections(matrix, lattices, classes, valid, symmetry=symmetry)
    for correction in (measured, np.eye(2)):
        warps = np.where(valid[..., None, None], matrix @ correction, np.nan)
        try:
            regions.append(
                auto_reference(fold_deformation(deformation_from_affine(warps), symmetry), valid)
            )
        except InputError as exc:
            failures.append(exc)
    if not regions:
        raise failures[0]
    return max(regions, key=np.sum)


def strain_from_warps(
    matrix: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    lattices: list[np.ndarray | None],
    *,
    symmetry: int,
    reference: np.ndarray | None,
    measure: Callable[[np.ndarray], np.ndarray],
    ellipse: DetectorEllipse,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Strain maps from the network's inferred warps: the whole step after inference.

    1. The reference region: given, or the largest region of one lattice
       (:func:`_largest_reference`).
    2. The reference lattice, measured on the mean of its patterns (``measure``), gives the
       detector's ellipse (:func:`stemlib.ellipse.detector_distortion`), removed from the warps
       and bases (:func:`remove_ellipse`), and, its ideal form being exact, the reference's
       base lattice (:func:`base_lattice_from_reference`).
    3. Each base's distortion (:func:`symmetric_correction`, :func:`refine_correction`) and the
       strain against the reference (:func:`strain_from_affine`).

    Parameters
    ----------
    matrix
        Warps ``A`` (base -> pattern), shape (RX, RY, 2, 2); NaN where unknown.
    classes
        (RX, RY) int: each position's base.
    valid
        (RX, RY) bool: the positions with an answer.
    lattices
        Each base's reciprocal basis (2, 2), columns ``g1, g2`` (px), measured on its disks
        (:func:`stemlib.ccstae.pipeline.base_lattice`), or None.
    symmetry
        n of the lattice's n-fold symmetry.
    reference
        (RX, RY) bool reference region, or None to find it.
    measure
        The lattice (2, 2) of a region's mean pattern, given the region's (RX, RY) mask; an
        :class:`~stemlib.errors.InputError` it raises leaves the ellipse unmeasured and the
        bases' lattices as measured on their disks.
    ellipse
        The detector-ellipse setting (:class:`stemlib.ellipse.DetectorEllipse`).

    Returns
    -------
    strain : dict
        ``exx, eyy, exy`` ("1") and ``theta`` (rad), each (RX, RY), NaN where not valid.
    reference : ndarray of shape (RX, RY), bool
        The reference region used.
    ellipse : dict
        The record of :func:`stemlib.ellipse.detector_distortion`.

    Raises
    ------
    InputError
        If no reference region is found, or the reference holds no valid position.
    """
    lattices = list(lattices)
    if reference is None:
        reference = _largest_reference(matrix, lattices, classes, valid, symmetry=symmetry)
    on_reference = reference & valid
    try:
        measured: np.ndarray | None = measure(on_reference)
    except InputError as exc:
        measured, unmeasured = None, exc

    def reference_lattice() -> np.ndarray:
        if measured is None:
            raise unmeasured
        return measured

    distortion, record = detector_distortion(ellipse, symmetry, reference_lattice)
    if record["removed"]:
        matrix, lattices = remove_ellipse(matrix, lattices, classes, on_reference, distortion)
    if measured is not None and symmetry in (4, 6):
        # The reference is unstrained, so its lattice is square or hexagonal: what anisotropy
        # its measurement keeps below `least` is the measurement's (0.1-0.2 % on multislice
        # scans), and B taken from it cost 0.6e-3 of exy on WS2.
        ideal = np.linalg.inv(ellipse_matrix(*fit_ellipse(measured, symmetry))) @ measured
        main = int(np.bincount(classes[on_reference], minlength=len(lattices)).argmax())
        lattices[main] = base_lattice_from_reference(
            matrix, on_reference & (classes == main), ideal, symmetry
        )
    correction = _base_corrections(matrix, lattices, classes, valid, symmetry=symmetry)
    strain, _ = strain_from_affine(
        matrix, reference=reference, symmetry=symmetry, valid=valid, correction=correction
    )
    return strain, reference, record
