"""Pictures of what the CC-ST-AE learned: its base patterns."""

from __future__ import annotations

import numpy as np

__all__ = ["bases_figure", "save_bases_png"]


def bases_figure(
    bases: np.ndarray, *, mask: np.ndarray | None = None
):  # -> matplotlib.figure.Figure
    """One panel per learned base (square-root intensity), with the last ring mask outlined.

    Parameters
    ----------
    bases
        Array of shape (K, H, W) (``qx`` = rows, drawn downwards; ``qy`` = columns).
    mask
        Boolean array of shape (H, W): the ring the loss used, drawn as a contour.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    bases = np.asarray(bases, np.float64)
    k = bases.shape[0]
    fig = Figure(figsize=(3.2 * k, 3.4), layout="constrained")
    axes = fig.subplots(1, k, squeeze=False)[0]
    for i, (ax, base) in enumerate(zip(axes, bases, strict=True)):
        ax.imshow(np.sqrt(np.clip(base, 0, None)), cmap="magma", origin="upper")
        if mask is not None:
            ax.contour(np.asarray(mask, float), levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"base {i}")
        ax.set_xlabel("qy (px)")
        ax.set_ylabel("qx (px)")
    fig.suptitle("CC-ST-AE learned bases")
    return fig


def save_bases_png(bases: np.ndarray, url: str, *, mask: np.ndarray | None = None) -> str:
    """Save :func:`bases_figure` as a PNG at ``url`` (local path or fsspec URL); returns it."""
    from ..plots import save_png

    return save_png(bases_figure(bases, mask=mask), url)
