"""The boundary between py4DSTEM's conventions and stemflow's (CONVENTIONS.md section 2).

py4DSTEM indexes a diffraction pattern as ``(x, y)`` = (array axis 0, axis 1) of the pattern,
which are stemflow's ``(qx, qy)`` (rows, columns): its disk positions need no axis swap. Its
strain maps (``StrainMap.get_strain``, ``get_strain_from_reference_g1g2``) are the linearised
(infinitesimal) strain of ``beta = G_local G_ref^-1``: ``e_xx = 1 - beta_xx``, ``e_yy = 1 -
beta_yy``, ``e_xy = -(beta_xy + beta_yx) / 2`` (a tensor shear) and ``theta = (beta_xy -
beta_yx) / 2``, which is the rotation with the opposite sign to stemflow's. Everything that
crosses from py4DSTEM into stemflow goes through this module, and so does the step from the
baseline's own per-pattern lattices to stemflow's strain (:func:`strain_from_bases`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..strain import fold_rotation, strain_from_lattice
from .lattice import align_bases

__all__ = ["peaks_from_qpoints", "strain_from_py4dstem", "strain_from_bases"]


def peaks_from_qpoints(qpoints: Any) -> np.ndarray:
    """Disk positions of a py4DSTEM ``QPoints`` (or structured array) as (K, 3) float64:
    ``qx`` (pattern rows, py4DSTEM's ``x``/``qx``), ``qy`` (columns) in px, and intensity."""
    data = getattr(qpoints, "data", qpoints)
    return (
        np.column_stack([data["qx"], data["qy"], data["intensity"]])
        .astype(np.float64)
        .reshape(-1, 3)
    )


def strain_from_py4dstem(
    e_xx: np.ndarray, e_yy: np.ndarray, e_xy: np.ndarray, theta: np.ndarray, *, symmetry: int = 1
) -> dict[str, np.ndarray]:
    """py4DSTEM's strain-map slices in stemflow's convention.

    Parameters
    ----------
    e_xx, e_yy, e_xy, theta
        Arrays of shape (RX, RY): the ``e_xx, e_yy, e_xy, theta`` slices of a py4DSTEM
        ``StrainMap`` (or of ``get_strain_from_reference_g1g2``) computed in the detector frame
        (``coordinate_rotation=0``); ``theta`` in rad.
    symmetry
        n of the lattice's n-fold symmetry; ``theta`` is wrapped into ``(-pi/n, pi/n]``.

    Returns
    -------
    dict
        ``exx`` (along qx), ``eyy`` (along qy), ``exy`` (tensor shear), all "1", and ``theta``
        (rad, positive from +qx towards +qy). They equal :func:`stemlib.strain.strain_from_lattice`
        to first order in the strain and rotation (py4DSTEM linearises; beyond a few degrees of
        rotation its values are not strain at all).

    Examples
    --------
    >>> out = strain_from_py4dstem(np.array(0.01), np.array(-0.02), np.array(0.005), np.array(0.1))
    >>> [round(float(out[k]), 6) for k in ("exx", "eyy", "exy", "theta")]
    [0.01, -0.02, 0.005, -0.1]
    """
    rotation = -np.asarray(theta, np.float64)
    return {
        "exx": np.asarray(e_xx, np.float64),
        "eyy": np.asarray(e_yy, np.float64),
        "exy": np.asarray(e_xy, np.float64),
        "theta": fold_rotation(rotation, symmetry) if symmetry > 1 else rotation,
    }


def strain_from_bases(
    bases: np.ndarray, g_ref: np.ndarray, *, symmetry: int
) -> dict[str, np.ndarray]:
    """Per-position reciprocal bases (as the pattern indexing found them) -> stemflow's strain.

    Each basis is first put on the reference's branch
    (:func:`~stemlib.py4dstem.lattice.align_bases`:
    the change of basis under the lattice's symmetry with the least strain, then the least
    rotation), then :func:`stemlib.strain.strain_from_lattice` gives ``V - I`` in the detector
    frame with the tensor shear and ``theta`` from +qx towards +qy wrapped into
    ``(-pi/n, pi/n]``.

    Parameters
    ----------
    bases
        (..., 2, 2), columns ``g1, g2`` as ``(qx, qy)`` px, ``det > 0``; NaN where unknown.
    g_ref
        (2, 2) reference basis, ``det > 0``.
    symmetry
        n of the lattice's n-fold symmetry.

    Returns
    -------
    dict
        ``exx, eyy, exy`` ("1") and ``theta`` (rad), each of shape (...); NaN where unknown.

    Examples
    --------
    >>> g = np.array([[20.0, 0.0], [0.0, 20.0]])
    >>> turned = np.array([[0.0, -20.0], [20.0, 0.0]]) / 1.01  # 90 deg, 1 % tensile
    >>> out = strain_from_bases(turned, g, symmetry=4)
    >>> [round(float(out[k]), 6) for k in ("exx", "eyy", "exy", "theta")]
    [0.01, 0.01, 0.0, 0.0]
    """
    return strain_from_lattice(align_bases(bases, g_ref), g_ref, symmetry=symmetry)
