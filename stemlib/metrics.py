"""Errors of a strain result against ground truth."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError
from .strain import fold_rotation
from .truth import as_truth

__all__ = ["rotation_difference", "strain_errors", "reference_spread", "SPREAD_MIN_POSITIONS"]

#: Fewest valid positions of the reference region whose spread is reported (NaN below).
SPREAD_MIN_POSITIONS = 5


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
        If ``result`` still holds several methods, if ``truth`` holds no truth or maps of other
        positions (bin it with :func:`stemlib.binning.binned_truth` for a binned scan's maps),
        or if no symmetry is given or recorded in the truth.

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
    _check_same_positions(result, truth)
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


def _check_same_positions(result: xr.Dataset, truth: xr.Dataset) -> None:
    """Refuse maps and a truth of different positions (a scan binned or cropped in a notebook,
    scored against the unbinned truth), naming the truth that fits."""
    maps, known = tuple(result["exx"].shape), tuple(truth["exx"].shape)
    if maps == known:
        return
    factor = known[0] // maps[0] if maps[0] else 0
    if factor > 1 and all(k // factor == m for m, k in zip(maps, known, strict=True)):
        fix = (
            f"stemlib.binned_truth(truth, {factor}) bins it as "
            f"stemlib.binned_scan(scan, scan={factor}) binned the scan"
        )
    else:
        fix = "crop or bin it as the scan was"
    raise InputError(
        f"the maps cover {maps[0]} x {maps[1]} positions and the truth {known[0]} x {known[1]}; "
        f"score them against the truth of the same positions: {fix}."
    )


def reference_spread(result: xr.Dataset) -> dict[str, float]:
    """How much one method's maps scatter inside its reference region: its precision, measured
    on the scan itself, where no truth is known.

    The reference region is the method's unstrained, unrotated lattice: every position there
    should read zero, and what it reads instead is the method's random error at this dose (plus
    any real strain the region holds). The spread is robust to the odd failed fit: 1.4826 times
    the median absolute deviation from the median, a standard deviation for normal scatter. It
    leaves out the error that is the same across a grain (a bias that differs from grain to
    grain), so it is a floor of the error elsewhere: on simulated grains, py4DSTEM's spread was
    1.34 / 1.33 / 1.04e-3 (exx, eyy, exy) against a root-mean-square error of 1.43 / 1.39 /
    0.99e-3 in the other grains at 2e4 electrons per pattern, and 0.43-0.96 of it on 12 x 12
    scans of both lattices at 50 % background.

    Parameters
    ----------
    result
        A strain dataset of one method (``exx, eyy, exy, theta, valid`` and
        ``reference_region``, dims (rx, ry); select the method first).

    Returns
    -------
    dict
        ``exx, eyy, exy`` ("1"), ``theta`` (rad): the spread over the region's valid positions,
        NaN with fewer than :data:`SPREAD_MIN_POSITIONS` of them; ``positions``, their number.

    Examples
    --------
    >>> from stemlib.results import strain_dataset
    >>> rng = np.random.default_rng(0)
    >>> maps = {c: rng.normal(0, 1e-3, (40, 40)) for c in ("exx", "eyy", "exy", "theta")}
    >>> region = np.zeros((40, 40), bool)
    >>> region[:20] = True
    >>> ds = strain_dataset("a", **maps, extras={"reference_region": (region, {"units": "1"})})
    >>> spread = reference_spread(ds.isel({"method": 0}))
    >>> round(spread["exx"] * 1e3, 1), spread["positions"]
    (1.0, 800)
    """
    if "method" in result.dims:
        result = result.isel({"method": 0})
    region = np.asarray(result["reference_region"].values, float) > 0
    use = region & np.asarray(result["valid"].values, bool)
    out: dict[str, float] = {"positions": int(use.sum())}
    for name in ("exx", "eyy", "exy", "theta"):
        values = np.asarray(result[name].values, np.float64)[use]
        if values.size < SPREAD_MIN_POSITIONS:
            out[name] = float("nan")
            continue
        out[name] = float(1.4826 * np.median(np.abs(values - np.median(values))))
    return out
