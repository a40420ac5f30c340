"""Index the Bragg disks of one pattern and fit its reciprocal lattice, whatever its rotation.

py4DSTEM's strain workflow indexes every pattern against one basis chosen on the Bragg-vector
map of the whole scan, which fails on grains rotated by tens of degrees. Here each pattern finds
its own basis among its own disks, refines it by least squares on every disk it indexes, and a
separate step (:func:`align_bases`) expresses all bases on the branch of the reference lattice.

Vectors are ``(qx, qy)`` in detector pixels, ``qx`` = pattern rows (axis 2 of a datacube);
a basis is a (2, 2) array whose columns are ``g1, g2``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from ..strain import deformation_from_lattice, polar_decompose, reduce_basis

__all__ = [
    "LatticeFit",
    "basis_metric",
    "find_basis",
    "fit_lattice",
    "index_pattern",
    "align_bases",
]

#: Unimodular integer matrices with entries in {-1, 0, 1} and determinant +1: every change of
#: basis that maps a reduced basis onto an equivalent one of the same handedness (the lattice's
#: rotations by multiples of 60 or 90 degrees, and the sign flip).
_BRANCHES = np.array(
    [
        m
        for m in (np.array(v, float).reshape(2, 2) for v in itertools.product((-1, 0, 1), repeat=4))
        if round(np.linalg.det(m)) == 1
    ]
)


#: Strain-norm margin within which two changes of basis count as the same lattice branch.
_BRANCH_TIE = 0.02


@dataclass(frozen=True)
class LatticeFit:
    """The lattice of one pattern.

    Attributes
    ----------
    basis
        (2, 2), columns ``g1, g2`` in px, reduced (shortest vectors) with ``det > 0``.
    origin
        (2,), the fitted lattice origin (direct beam) in px.
    n_disks
        Bragg disks indexed and used in the fit (the direct beam not counted).
    residual
        Intensity-weighted RMS distance (px) of the indexed disks from the fitted lattice.
    indexed_fraction
        Fraction of the pattern's summed peak intensity that the lattice indexes (a real
        lattice explains most of it; a chance alignment of noise peaks does not).
    """

    basis: np.ndarray
    origin: np.ndarray
    n_disks: int
    residual: float
    indexed_fraction: float = 1.0


def basis_metric(basis: np.ndarray) -> np.ndarray:
    """Rotation-invariant shape of a lattice: ``(|a|, |b|, angle)`` of its reduced basis.

    Lengths in the basis' unit, the angle between ``a`` and ``b`` in degrees, folded into
    [60, 90] (the reduced cell's angle or its supplement).
    """
    r = reduce_basis(basis)
    na, nb = np.linalg.norm(r, axis=0)
    angle = np.degrees(np.arccos(np.clip(abs(r[:, 0] @ r[:, 1]) / (na * nb), 0.0, 1.0)))
    return np.array([na, nb, angle])


def _reduce_many(bases: np.ndarray) -> np.ndarray:
    """:func:`reduce_basis` of (P, 2, 2) bases at once (a few vectorised Gauss steps)."""
    a, b = bases[:, :, 0].copy(), bases[:, :, 1].copy()
    for _ in range(12):
        swap = (a * a).sum(1) > (b * b).sum(1)
        a, b = np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)
        mu = np.rint((a * b).sum(1) / (a * a).sum(1))
        b = b - mu[:, None] * a
    swap = (a * a).sum(1) > (b * b).sum(1)
    a, b = np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)
    flip = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] < 0
    b = np.where(flip[:, None], -b, b)
    return np.stack([a, b], -1)


def find_basis(
    vectors: np.ndarray,
    weights: np.ndarray,
    *,
    tolerance: float = 0.15,
    prior: np.ndarray | None = None,
    prior_tolerance: float = 0.12,
    candidates: int = 10,
) -> np.ndarray | None:
    """The basis that indexes most of a pattern's Bragg disks.

    Every pair of the ``candidates`` shortest disk vectors is tried as a basis; a pair scores the
    summed weight of the disks it indexes within ``tolerance`` of its shortest vector, ties going
    to the smaller cell. Without a ``prior`` shape both vectors of a pair must have their Friedel
    mate (``-g``) among the disks; with one, the pair's reduced cell must match it (see
    :func:`basis_metric`) within ``prior_tolerance``.

    Parameters
    ----------
    vectors
        (K, 2) disk positions relative to the direct beam, px, direct beam excluded.
    weights
        (K,) disk intensities (correlation peak heights), positive.
    tolerance
        Largest distance from a lattice point, as a fraction of the shortest basis vector, for a
        disk to count as indexed.
    prior
        Expected ``(|a|, |b|, angle)`` of the reduced basis, or None.
    prior_tolerance
        Relative tolerance on the lengths (the angle's is the same in radians).
    candidates
        How many of the shortest vectors are tried.

    Returns
    -------
    ndarray of shape (2, 2) or None
        The reduced basis (``det > 0``), or None if no pair indexes at least three disks.
    """
    if len(vectors) < 2:
        return None
    lengths = np.linalg.norm(vectors, axis=1)
    order = np.argsort(lengths)[:candidates]
    if prior is None:
        mate = np.linalg.norm(vectors[order, None, :] + vectors[None, :, :], axis=2).min(axis=1)
        order = order[mate <= tolerance * lengths[order]]
    if len(order) < 2:
        return None
    i, j = np.array(list(itertools.combinations(order, 2))).T
    pairs = np.stack([vectors[i], vectors[j]], -1)  # (P, 2, 2)
    area = np.abs(np.linalg.det(pairs))
    independent = area >= np.sin(np.radians(20.0)) * lengths[i] * lengths[j]
    bases = _reduce_many(pairs[independent])
    area = area[independent]
    if len(bases) == 0:
        return None
    na, nb = np.linalg.norm(bases[:, :, 0], axis=1), np.linalg.norm(bases[:, :, 1], axis=1)
    if prior is not None:
        cosine = np.abs((bases[:, :, 0] * bases[:, :, 1]).sum(1)) / (na * nb)
        angle = np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))
        keep = (np.abs(na / prior[0] - 1) <= prior_tolerance) & (
            np.abs(nb / prior[1] - 1) <= prior_tolerance
        )
        keep &= np.abs(angle - prior[2]) <= np.degrees(prior_tolerance)
        bases, area, na = bases[keep], area[keep], na[keep]
        if len(bases) == 0:
            return None
    hk = np.linalg.solve(bases[:, None, :, :], vectors[None, :, :, None])[..., 0]  # (P, K, 2)
    index = np.rint(hk)
    off = np.einsum("pij,pkj->pki", bases, hk - index)
    inlier = (np.linalg.norm(off, axis=2) <= tolerance * na[:, None]) & np.any(index != 0, axis=2)
    score = (inlier * weights[None, :]).sum(1)
    count = inlier.sum(1)
    score = np.where(count >= 3, score, -np.inf)
    if not np.isfinite(score).any():
        return None
    best = np.lexsort((area, -score))[0]
    return bases[best]


def _support(
    vectors: np.ndarray, basis: np.ndarray, tol_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (K, 2) of ``vectors`` on a lattice and whether each lies within ``tol_px``."""
    hk = np.linalg.solve(basis, vectors.T).T
    index = np.rint(hk)
    return index, np.linalg.norm((hk - index) @ basis.T, axis=1) <= tol_px


def fit_lattice(
    vectors: np.ndarray,
    weights: np.ndarray,
    basis: np.ndarray,
    *,
    tolerance: float = 0.15,
    iterations: int = 3,
) -> LatticeFit | None:
    """Refine a basis and origin by weighted least squares on every disk it indexes.

    Model: ``v_k = o + h_k g1 + k_k g2`` for the disks within ``tolerance`` (fraction of the
    shortest basis vector) of a lattice point, weights ``w_k``; indexing and fit are repeated
    ``iterations`` times. ``vectors`` are relative to a provisional origin (the direct beam,
    which may or may not be among them as index (0, 0)); the returned origin is relative to the
    same point.

    Returns
    -------
    LatticeFit or None
        None if fewer than two independent directions are indexed.
    """
    fit = None
    for _ in range(iterations):
        tol_px = tolerance * np.linalg.norm(basis, axis=0).min()
        origin = fit.origin if fit is not None else np.zeros(2)
        index, inlier = _support(vectors - origin, basis, tol_px)
        bragg = inlier & np.any(index != 0, axis=1)
        if bragg.sum() < 2 or np.linalg.matrix_rank(index[bragg]) < 2:
            return None
        design = np.column_stack([np.ones(inlier.sum()), index[inlier]])
        w = np.sqrt(weights[inlier])[:, None]
        solution = np.linalg.lstsq(design * w, vectors[inlier] * w, rcond=None)[0]
        basis = solution[1:].T
        residual = vectors[inlier] - design @ solution
        rms = float(np.sqrt((weights[inlier] * (residual**2).sum(1)).sum() / weights[inlier].sum()))
        fit = LatticeFit(
            basis=basis,
            origin=solution[0],
            n_disks=int(bragg.sum()),
            residual=rms,
            indexed_fraction=float(weights[inlier].sum() / weights.sum()),
        )
    assert fit is not None
    reduced = reduce_basis(fit.basis)
    return replace(fit, basis=reduced)


def index_pattern(
    peaks: np.ndarray,
    beam: np.ndarray,
    *,
    exclude_radius: float,
    tolerance: float = 0.15,
    prior: np.ndarray | None = None,
    prior_tolerance: float = 0.12,
) -> LatticeFit | None:
    """Find and fit the lattice of one pattern from its detected Bragg disks.

    Parameters
    ----------
    peaks
        (K, 3) detected Bragg disks: ``qx, qy`` (px) and intensity (NaN rows ignored).
    beam
        (2,) direct-beam position (px), to a fraction of the lattice spacing: the origin of the
        candidate vectors; the fitted origin is free.
    exclude_radius
        Peaks nearer than this (px) to ``beam`` are ignored (the masked direct beam).
    tolerance, prior, prior_tolerance
        See :func:`find_basis`.

    Returns
    -------
    LatticeFit or None
        Origin in absolute detector px; None if no lattice is found.
    """
    peaks = peaks[np.isfinite(peaks).all(axis=1) & (peaks[:, 2] > 0)]
    vectors = peaks[:, :2] - np.asarray(beam, float)
    keep = np.linalg.norm(vectors, axis=1) > exclude_radius
    vectors, weights = vectors[keep], peaks[keep, 2]
    if len(vectors) < 3:
        return None
    basis = find_basis(
        vectors, weights, tolerance=tolerance, prior=prior, prior_tolerance=prior_tolerance
    )
    if basis is None:
        return None
    fit = fit_lattice(vectors, weights, basis, tolerance=tolerance)
    if fit is None:
        return None
    return replace(fit, origin=fit.origin + beam)


def align_bases(bases: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Express every basis on the branch of ``reference``: the change of basis (a lattice
    symmetry) that gives the smallest strain, then the smallest rotation.

    Parameters
    ----------
    bases
        (..., 2, 2) reduced bases with ``det > 0``; NaN where unknown (kept NaN).
    reference
        (2, 2) reference basis with ``det > 0``.

    Returns
    -------
    ndarray of shape (..., 2, 2)
        ``bases @ M`` for the best unimodular ``M`` per position. The lattice (the set of disk
        positions) is unchanged; only which vectors are called ``g1, g2`` changes.
    """
    bases = np.asarray(bases, float)
    ok = np.isfinite(bases).all(axis=(-1, -2))
    safe = np.where(ok[..., None, None], bases, reference)
    trial = safe[..., None, :, :] @ _BRANCHES  # (..., B, 2, 2)
    F = deformation_from_lattice(trial, reference)
    V, theta = polar_decompose(F)
    strain = np.linalg.norm(V - np.eye(2), axis=(-1, -2))
    # Symmetry-equivalent branches give the same V when the reference is exactly symmetric, and
    # nearly the same (within its own strain and noise) otherwise: among them the smallest
    # rotation. Branches that are not lattice symmetries differ by tens of percent.
    close = strain <= strain.min(axis=-1, keepdims=True) + _BRANCH_TIE
    score = np.where(close, np.abs(theta), np.inf)
    best = np.argmin(score, axis=-1)
    chosen = np.take_along_axis(trial, best[..., None, None, None], axis=-3)[..., 0, :, :]
    return np.where(ok[..., None, None], chosen, np.nan)
