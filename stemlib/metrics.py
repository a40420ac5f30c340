"""Errors of a strain result against ground truth."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError
from .strain import fold_rotation
from .truth import as_truth

__all__ = ["rotation_difference", "strain_errors"]


def rotation_difference(estimate: np.ndarray, truth: np.ndarray, symmetry: int) -> np.ndarray:
    """``estimate - truth`` in rad, wrapped into ``(-pi/n, pi/n]`` (rotations are only defined
    modulo the lattice's n-fold symmetry).

    Examples
    --------
    >>> round(float(np.degrees(rotation_difference(np.radians(44.0), np.radians(-45.0), 4))), 9)
    -1.0
    """
    return fold_rotation(np.asarray(estimate, np.float64) - np.asarray(truth, np.float64), symmetry)


def strain_errors(
    result: xr.Dataset,
    truth: xr.Dataset,
    *,
    symmetry: int | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean absolute errors of one method's maps against the truth.

    Parameters
    ----------
    result
        A strain dataset of one method: ``exx, eyy, exy, theta, valid`` with dims (rx, ry) (select
        the method first, e.g. ``ds.sel({"method": "ccstae"})``: ``ds.sel(method=...)`` would
        pass the string as xarray's matching method, not as a label).
    truth
        Truth with ``exx, eyy, exy, theta`` (:func:`stemlib.truth.open_truth`), or with
        ``truth_exx, ...`` (the dataset :func:`stemlib.simulate.simulate` returns); see
        :func:`stemlib.truth.as_truth`.
    symmetry
        The lattice's n-fold symmetry, for the rotation error; None takes the truth's
        (its attribute ``symmetry`` or ``truth_symmetry``).
    mask
        Positions to score (all by default). Positions without a finite truth (the vacuum of a
        simulated scan) are never scored.

    Returns
    -------
    dict
        ``exx, eyy, exy`` ("1"), ``theta`` (rad) MAE over positions valid in the result, and
        ``coverage``, the fraction of scored positions that are valid.

    Raises
    ------
    InputError
        If ``result`` still holds several methods, if ``truth`` holds no truth, or if no
        symmetry is given or recorded in the truth.

    Examples
    --------
    >>> from stemlib.results import strain_dataset
    >>> from stemlib.simulate import SimulationConfig, simulate
    >>> sim = simulate(SimulationConfig(scan=(4, 4), pattern=32, grains=2))
    >>> parts = {c: sim[f"truth_{c}"].values for c in ("exx", "eyy", "exy", "theta")}
    >>> off = strain_dataset("py4dstem", **{**parts, "exx": parts["exx"] + 1e-3})
    >>> round(strain_errors(off, sim)["exx"], 9), strain_errors(off, sim)["coverage"]
    (0.001, 1.0)
    """
    truth = as_truth(truth)
    symmetry = symmetry if symmetry is not None else truth.attrs.get("symmetry")
    if symmetry is None:
        raise InputError(
            "the truth records no lattice symmetry; pass symmetry=n (2, 4 or 6) to strain_errors."
        )
    if result.sizes.get("method", 1) > 1:
        raise InputError(
            f"strain_errors scores one method; the result holds {result.sizes['method']}: select "
            'one first, e.g. ds.sel({"method": "ccstae"}).'
        )
    if "method" in result.dims:
        result = result.isel({"method": 0})
    valid = np.asarray(result["valid"].values, bool)
    scored = np.ones_like(valid) if mask is None else np.asarray(mask, bool)
    scored = scored & np.isfinite(np.asarray(truth["exx"].values, np.float64))
    use = valid & scored
    out: dict[str, float] = {"coverage": float(use.sum() / max(scored.sum(), 1))}
    for name in ("exx", "eyy", "exy"):
        err = np.abs(result[name].values - truth[name].values)[use]
        out[name] = float(err.mean()) if err.size else float("nan")
    dtheta = np.abs(
        rotation_difference(result["theta"].values, truth["theta"].values, int(symmetry))
    )[use]
    out["theta"] = float(dtheta.mean()) if dtheta.size else float("nan")
    return out
