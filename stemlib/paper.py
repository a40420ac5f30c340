"""The CC-ST-AE paper's accuracy figures, to set our measurements beside.

The paper compares CC-ST-AE with py4DSTEM on one simulated scan of Voronoi grains and its noisy
copies (Figure 3): the mean absolute error of ``exx``, ``eyy`` and ``exy`` against the truth at
each background level ``w`` of the noise model of CONVENTIONS.md section 3 (0-50 % in steps of
5 %, then 60 and 70 %, at N = 1e5 electrons per pattern). The benchmark script
(``benchmarks/accuracy.py``) and the ``noise_sweep`` flow print these figures beside ours.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop, Figure 3.
"""

from __future__ import annotations

import math

__all__ = ["PAPER", "PAPER_COMPONENTS", "PAPER_LEVELS", "paper_mae", "paper_percent", "paper_ratio"]

#: Strain components of the paper's table, in its column order.
PAPER_COMPONENTS: tuple[str, str, str] = ("exx", "eyy", "exy")

#: The paper's Figure 3, MAE in 1e-3 (strain "1"): background level in percent ->
#: (exx py4DSTEM, exx CC-ST-AE, eyy py4DSTEM, eyy CC-ST-AE, exy py4DSTEM, exy CC-ST-AE).
PAPER: dict[int, tuple[float, float, float, float, float, float]] = {
    0: (2.0, 1.5, 2.0, 1.8, 0.9, 0.7),
    5: (2.3, 1.5, 2.4, 1.6, 1.2, 1.2),
    10: (2.3, 1.5, 2.4, 1.6, 1.3, 1.0),
    15: (2.3, 1.6, 2.4, 1.7, 1.3, 0.9),
    20: (2.4, 1.7, 2.5, 1.7, 1.4, 1.0),
    25: (2.5, 1.6, 2.5, 1.9, 1.4, 1.1),
    30: (2.5, 1.6, 2.6, 1.7, 1.4, 1.2),
    35: (2.6, 1.8, 2.7, 1.8, 1.5, 1.1),
    40: (2.7, 1.7, 2.7, 1.8, 1.6, 1.4),
    45: (2.8, 1.8, 2.9, 2.0, 1.7, 1.2),
    50: (3.2, 1.8, 3.2, 1.9, 1.9, 1.5),
    60: (3.9, 2.1, 4.0, 2.4, 2.5, 1.6),
    70: (5.4, 2.2, 5.5, 2.6, 3.6, 2.1),
}

#: The paper's background weights w (fractions, not percent): 0, 0.05, ..., 0.5, 0.6, 0.7.
PAPER_LEVELS: tuple[float, ...] = tuple(percent / 100 for percent in PAPER)


def paper_percent(background: float) -> int | None:
    """The row of :data:`PAPER` for background weight ``w`` (a fraction), or None if the paper
    has no row for it.

    Examples
    --------
    >>> paper_percent(0.05), paper_percent(0.7), paper_percent(0.125), paper_percent(0.8)
    (5, 70, None, None)
    """
    percent = background * 100
    if not math.isclose(percent, round(percent), abs_tol=1e-9):
        return None
    return round(percent) if round(percent) in PAPER else None


def paper_mae(percent: int) -> dict[str, dict[str, float]]:
    """The paper's MAE (strain "1", not 1e-3) per method and component at ``percent`` %.

    Examples
    --------
    >>> round(paper_mae(70)["ccstae"]["exy"], 9)
    0.0021
    """
    row = PAPER[percent]
    return {
        method: {c: row[2 * i + j] / 1e3 for i, c in enumerate(PAPER_COMPONENTS)}
        for j, method in enumerate(("py4dstem", "ccstae"))
    }


def paper_ratio(percent: int) -> dict[str, float]:
    """The paper's CC-ST-AE / py4DSTEM MAE ratio per component at ``percent`` %.

    Examples
    --------
    >>> {c: round(r, 3) for c, r in paper_ratio(0).items()}
    {'exx': 0.75, 'eyy': 0.9, 'exy': 0.778}
    """
    row = PAPER[percent]
    return {c: row[2 * i + 1] / row[2 * i] for i, c in enumerate(PAPER_COMPONENTS)}
