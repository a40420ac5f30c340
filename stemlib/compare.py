"""Compare strain methods with each other and with ground truth.

The two methods of a strain dataset are compared position by position (difference maps and
agreement statistics), and each is scored against the truth when the scan carries one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .metrics import reference_spread, rotation_difference, strain_errors
from .truth import as_truth
from .types import SCAN_DIMS

__all__ = [
    "COMPONENTS",
    "compare_methods",
    "lattice_symmetry",
    "reference_disagreement",
    "statistics_caption",
    "statistics_table",
    "symmetry_disagreement",
]

COMPONENTS = ("exx", "eyy", "exy", "theta")


def lattice_symmetry(ds: xr.Dataset, truth: xr.Dataset | None = None) -> int:
    """The n-fold symmetry by which the rotations of a strain dataset are compared: the one
    ``truth`` records (its attribute ``symmetry``, or ``truth_symmetry`` as a simulated scan
    has it), else the largest one that the methods of ``ds`` record
    (``methods.<name>.symmetry``), else 1.

    >>> from stemlib.results import strain_dataset
    >>> z = np.zeros((2, 2))
    >>> ds = strain_dataset("py4dstem", exx=z, eyy=z, exy=z, theta=z, attrs={"symmetry": 4})
    >>> lattice_symmetry(ds), lattice_symmetry(ds, xr.Dataset(attrs={"symmetry": 6}))
    (4, 6)
    """
    recorded = (
        None if truth is None else truth.attrs.get("symmetry") or truth.attrs.get("truth_symmetry")
    )
    if recorded:
        return int(recorded)
    fallback = ds.attrs.get("symmetry") or 1
    records = (ds.attrs.get("methods") or {}).values()
    return max((int(r.get("symmetry") or fallback) for r in records), default=int(fallback))


def reference_disagreement(ds: xr.Dataset) -> str | None:
    """A warning sentence when the first two methods of a strain dataset measured their strain
    against reference regions that share less than half of the smaller one; None otherwise
    (also where a method records no ``reference_region``).

    Each method finds ``--reference auto`` on its own lattice maps: on noisy patterns they can
    settle on different grains. Their maps then differ by the strain between the two
    references, and neither the difference maps nor the agreement statistics compare the
    methods.

    Examples
    --------
    >>> from stemlib.results import combine_methods, strain_dataset
    >>> z = np.zeros((4, 4))
    >>> def method(name, rows):
    ...     region = np.zeros((4, 4), bool)
    ...     region[rows] = True
    ...     extras = {"reference_region": (region, {"units": "1", "long_name": "reference"})}
    ...     return strain_dataset(name, exx=z, eyy=z, exy=z, theta=z, extras=extras)
    >>> reference_disagreement(combine_methods([method("a", slice(0, 2)), method("b", 0)]))
    >>> reference_disagreement(combine_methods([method("a", slice(0, 2)), method("b", 3)]))[:88]
    'the two methods measured their strain against different reference regions (a 8 positions'
    """
    methods = [str(m) for m in ds["method"].values][:2]
    if len(methods) < 2 or "reference_region" not in ds:
        return None
    a, b = (np.asarray(ds["reference_region"].sel({"method": m}).values, bool) for m in methods)
    shared, smaller = int((a & b).sum()), int(min(a.sum(), b.sum()))
    if smaller == 0 or shared >= smaller / 2:
        return None
    return (
        "the two methods measured their strain against different reference regions "
        f"({methods[0]} {int(a.sum())} positions, {methods[1]} {int(b.sum())}, "
        f"{shared} in common), so their maps differ by the strain between those regions and "
        "cannot be compared; pass one --reference region known to be unstrained (each "
        "method's is the result's reference_region)."
    )


def symmetry_disagreement(ds: xr.Dataset) -> str | None:
    """A warning sentence when the first two methods of a strain dataset took the lattice for
    different n-fold symmetries (``methods.<name>.symmetry``); None otherwise.

    With ``--symmetry auto`` each method reads the symmetry off its reference lattice. A
    strained reference of a square crystal can read as 2-fold to one and 4-fold to the other;
    their rotations are then folded differently and only the 4-fold one measures a detector
    ellipse, so their maps differ (multislice Si at 1,000 electrons per pattern: by 2e-2,
    correlation near 0).

    >>> from stemlib.results import combine_methods, strain_dataset
    >>> z = np.zeros((2, 2))
    >>> a, b = (strain_dataset(m, exx=z, eyy=z, exy=z, theta=z, method_attrs={"symmetry": n})
    ...         for m, n in (("a", 4), ("b", 2)))
    >>> symmetry_disagreement(combine_methods([a, b]))[:87]
    'the two methods took the lattice for different symmetries (a 4-fold, b 2-fold), so they'
    """
    methods = [str(m) for m in ds["method"].values][:2]
    records = ds.attrs.get("methods") or {}
    folds = [(records.get(m) or {}).get("symmetry") for m in methods]
    if len(methods) < 2 or None in folds or folds[0] == folds[1]:
        return None
    return (
        f"the two methods took the lattice for different symmetries ({methods[0]} "
        f"{folds[0]}-fold, {methods[1]} {folds[1]}-fold), so they fold rotations and measure "
        "the detector's ellipse differently and their maps cannot be compared; pass --symmetry "
        "(and a --reference region known to be unstrained, whose lattice gives it)."
    )


def compare_methods(
    ds: xr.Dataset, *, truth: xr.Dataset | None = None, symmetry: int | None = None
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Difference maps and statistics of the methods of a strain dataset.

    Parameters
    ----------
    ds
        A strain dataset (dims (method, rx, ry)) with one or more methods.
    truth
        Ground truth with ``exx, eyy, exy, theta`` of dims (rx, ry) (e.g.
        :func:`stemlib.truth.open_truth`), or with ``truth_exx, ...`` (the dataset
        :func:`stemlib.simulate.simulate` returns), or None.
    symmetry
        The lattice's n-fold symmetry, for rotation differences and errors; None takes
        :func:`lattice_symmetry` (the truth's, else the methods').

    Returns
    -------
    dataset : xarray.Dataset
        ``ds`` plus, for two methods A and B (in ``ds.method`` order), ``diff_<c>`` = A - B of
        dims (rx, ry) for each component (rotation wrapped by the symmetry), and the truth as
        ``truth_<c>`` when given.
    statistics : dict
        ``coverage`` per method; ``spread`` per method per component, its scatter in its
        reference region (:func:`stemlib.metrics.reference_spread`: its precision, without a
        truth), where ``ds`` holds ``reference_region``; for two methods, ``agreement`` per
        component (mean absolute
        difference, Pearson correlation, positions compared) and ``warnings`` (sentences where
        their reference regions or symmetries differ, :func:`reference_disagreement`,
        :func:`symmetry_disagreement`); ``mae`` per method per
        component against the truth (strain "1", theta rad), when a truth is given.

    Examples
    --------
    CC-ST-AE reads exx 1e-3 higher than py4DSTEM everywhere:

    >>> from stemlib.results import combine_methods, strain_dataset
    >>> zero, high = np.zeros((2, 2)), np.full((2, 2), 1e-3)
    >>> both = combine_methods(
    ...     [
    ...         strain_dataset("ccstae", exx=high, eyy=zero, exy=zero, theta=zero),
    ...         strain_dataset("py4dstem", exx=zero, eyy=zero, exy=zero, theta=zero),
    ...     ]
    ... )
    >>> out, stats = compare_methods(both)
    >>> float(out["diff_exx"].mean()), stats["agreement"]["exx"]["mean_abs_difference"]
    (0.001, 0.001)
    """
    truth = None if truth is None else as_truth(truth)
    n = int(symmetry or lattice_symmetry(ds, truth))
    methods = [str(m) for m in ds["method"].values]
    out = ds.copy()
    stats: dict[str, Any] = {
        "methods": methods,
        "coverage": {m: float(ds["valid"].sel({"method": m}).mean()) for m in methods},
    }
    if "reference_region" in ds:
        stats["spread"] = {m: reference_spread(ds.sel({"method": m})) for m in methods}
    if len(methods) >= 2:
        a, b = (ds.sel({"method": m}) for m in methods[:2])
        both = (a["valid"] & b["valid"]).values
        agreement: dict[str, dict[str, float]] = {}
        for c in COMPONENTS:
            if c == "theta":
                diff = (
                    rotation_difference(a[c].values, b[c].values, n)
                    if n > 1
                    else a[c].values - b[c].values
                )
            else:
                diff = a[c].values - b[c].values
            diff = np.where(both, diff, np.nan)
            units = ds[c].attrs.get("units", "1")
            out[f"diff_{c}"] = (
                SCAN_DIMS,
                diff,
                {"units": units, "long_name": f"{c}: {methods[0]} - {methods[1]}"},
            )
            x, y = a[c].values[both], b[c].values[both]
            corr = (
                float(np.corrcoef(x, y)[0, 1])
                if x.size > 2 and x.std() > 0 and y.std() > 0
                else float("nan")
            )
            agreement[c] = {
                "mean_abs_difference": float(np.nanmean(np.abs(diff)))
                if both.any()
                else float("nan"),
                "correlation": corr,
                "positions": int(both.sum()),
            }
        stats["agreement"] = agreement
        found = (reference_disagreement(ds), symmetry_disagreement(ds))
        stats["warnings"] = [sentence for sentence in found if sentence]
    if truth is not None:
        for c in COMPONENTS:
            out[f"truth_{c}"] = (
                SCAN_DIMS,
                np.asarray(truth[c].values, np.float64),
                dict(truth[c].attrs),
            )
        stats["mae"] = {m: strain_errors(ds.sel({"method": m}), truth, symmetry=n) for m in methods}
    return out, stats


def statistics_caption(stats: dict[str, Any]) -> str:
    """What :func:`statistics_table` shows of :func:`compare_methods` statistics, in words.

    >>> statistics_caption({"methods": ["py4dstem"]})
    'Coverage of py4dstem'
    >>> statistics_caption({"methods": ["ccstae"], "mae": {}})
    'Coverage of ccstae and its error against the truth'
    >>> statistics_caption({"methods": ["ccstae", "py4dstem"], "agreement": {}, "mae": {}})
    'Coverage of ccstae and py4dstem, their agreement, and their error against the truth'
    >>> statistics_caption({"methods": ["ccstae"], "spread": {}})
    'Coverage of ccstae and its spread in the reference'
    """
    held = [f"Coverage of {' and '.join(stats['methods'])}"]
    if "spread" in stats:
        held.append(f"{'their' if len(stats['methods']) > 1 else 'its'} spread in the reference")
    if "agreement" in stats:
        held.append("their agreement")
    if "mae" in stats:
        held.append(f"{'their' if len(stats['methods']) > 1 else 'its'} error against the truth")
    if len(held) == 1:
        return held[0]
    return ", ".join(held[:-1]) + ("," if len(held) > 2 else "") + " and " + held[-1]


def statistics_table(stats: dict[str, Any]) -> str:
    """A markdown table of :func:`compare_methods` statistics (strain x 1e-3, theta in deg):
    coverage, the error against the truth, the spread in the reference region (robust standard
    deviation), and the two methods' agreement. The statistics may be those a dataset records
    (JSON: None for NaN)."""

    def value(v: float | None, scale: float = 1.0) -> float:
        return float("nan") if v is None else v * scale

    methods = stats["methods"]
    lines = ["| quantity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines.append(
        "| coverage | " + " | ".join(f"{value(stats['coverage'][m]):.1%}" for m in methods) + " |"
    )
    for key, row in (("mae", "MAE {c} vs truth"), ("spread", "{c} spread in the reference")):
        for c in COMPONENTS if key in stats else ():
            scale, unit = (np.degrees(1.0), "deg") if c == "theta" else (1e3, "1e-3")
            values = " | ".join(f"{value(stats[key][m][c], scale):.3f}" for m in methods)
            lines.append(f"| {row.format(c=c)} ({unit}) | {values} |")
    if "agreement" in stats:
        lines.append("")
        lines.append(
            f"| component | mean abs difference {methods[0]} - {methods[1]} "
            "| correlation | positions |"
        )
        lines.append("|---|---|---|---|")
        for c, a in stats["agreement"].items():
            scale, unit = (np.degrees(1.0), "deg") if c == "theta" else (1e3, "1e-3")
            lines.append(
                f"| {c} | {value(a['mean_abs_difference'], scale):.3f} {unit} "
                f"| {value(a['correlation']):.3f} | {a['positions']} |"
            )
    return "\n".join(lines)
