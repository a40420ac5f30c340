"""Figures of strain results: the four maps of one method, every method beside the truth, and
the scan's virtual images with each method's reference region; saved as PNG beside the store.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state, no window,
whatever the backend); they render with Agg.
"""

from __future__ import annotations

import io

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import InputError
from .io.storage import locate, redact, staged_file, storage_errors

__all__ = ["strain_figure", "comparison_figure", "virtual_figure", "save_png", "png_url"]

#: Panels: variable, title, scale factor to the shown unit, shown unit.
_PANELS = (
    ("exx", "exx (along qx)", 100.0, "%"),
    ("eyy", "eyy (along qy)", 100.0, "%"),
    ("exy", "exy (tensor shear)", 100.0, "%"),
    ("theta", "theta (rotation)", 180.0 / np.pi, "deg"),
)


def _limit(values: np.ndarray) -> float:
    """Symmetric colour limit: the 99th percentile of |values| (1 if nothing is finite)."""
    finite = np.abs(values[np.isfinite(values)])
    return (
        float(np.percentile(finite, 99)) if finite.size and np.percentile(finite, 99) > 0 else 1.0
    )


def strain_figure(ds: xr.Dataset, method: str) -> Figure:
    """The four maps ``exx, eyy, exy`` (%) and ``theta`` (deg) of one method.

    Parameters
    ----------
    ds
        A strain dataset (CONVENTIONS.md section 4) holding ``method``.
    method
        The method to draw, e.g. ``"py4dstem"``.

    Returns
    -------
    matplotlib.figure.Figure
        Four panels, rows ``rx`` and columns ``ry`` as in the scan, a diverging colour scale
        symmetric about 0 per panel, positions without an answer in grey; the title gives the
        method and its coverage.

    Raises
    ------
    InputError
        If ``method`` is not in ``ds``.

    Examples
    --------
    >>> from stemlib.results import strain_dataset
    >>> z = np.zeros((4, 5))
    >>> fig = strain_figure(strain_dataset("py4dstem", exx=z, eyy=z, exy=z, theta=z), "py4dstem")
    >>> [ax.get_title() for ax in fig.axes[::2]]
    ['exx (along qx)', 'eyy (along qy)', 'exy (tensor shear)', 'theta (rotation)']
    """
    methods = [str(m) for m in ds["method"].values]
    if method not in methods:
        raise InputError(
            f"the strain dataset holds methods {methods}, not {method!r}; pick one of them."
        )
    one = ds.isel(method=methods.index(method))
    valid = np.asarray(one["valid"].values, bool)
    fig = Figure(figsize=(10.0, 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (name, title, scale, unit) in enumerate(_PANELS):
        ax = fig.add_subplot(2, 2, k + 1)
        values = np.where(valid, np.asarray(one[name].values, np.float64) * scale, np.nan)
        limit = _limit(values)
        cmap = colormaps["RdBu_r" if name != "theta" else "PuOr_r"].with_extremes(bad="0.6")
        image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("ry (scan column)")
        ax.set_ylabel("rx (scan row)")
        fig.colorbar(image, ax=ax, label=unit, shrink=0.85)
    coverage = float(valid.mean()) if valid.size else 0.0
    fig.suptitle(f"{method}: strain in the detector frame, coverage {100 * coverage:.1f} %")
    return fig


def comparison_figure(ds: xr.Dataset) -> Figure:
    """Every method's maps side by side, with the truth and the difference of the methods.

    Parameters
    ----------
    ds
        A compared strain dataset (:func:`stemlib.compare.compare_methods`): ``exx, eyy, exy,
        theta`` of dims (method, rx, ry), and optionally ``truth_<c>`` and ``diff_<c>``.

    Returns
    -------
    matplotlib.figure.Figure
        One column per component (strain in %, theta in deg), one row per method, then a row
        of the truth and a row of the first two methods' difference where ``ds`` holds them.
        Methods and truth share each column's colour scale, so their maps compare by eye; the
        difference row has its own. Positions without an answer are grey.

    Examples
    --------
    >>> from stemlib.results import combine_methods, strain_dataset
    >>> z = np.zeros((4, 5))
    >>> ds = combine_methods([strain_dataset(m, exx=z, eyy=z, exy=z, theta=z)
    ...                       for m in ("ccstae", "py4dstem")])
    >>> fig = comparison_figure(ds)
    >>> len(fig.axes) // 2, fig.axes[0].get_ylabel()
    (8, 'ccstae')
    """
    methods = [str(m) for m in ds["method"].values]
    rows: list[tuple[str, dict[str, np.ndarray]]] = []
    for m in methods:
        one = ds.sel({"method": m})
        valid = np.asarray(one["valid"].values, bool)
        rows.append(
            (
                m,
                {
                    c: np.where(valid, np.asarray(one[c].values, np.float64), np.nan)
                    for c, *_ in _PANELS
                },
            )
        )
    if all(f"truth_{c}" in ds for c, *_ in _PANELS):
        rows.append(
            ("truth", {c: np.asarray(ds[f"truth_{c}"].values, np.float64) for c, *_ in _PANELS})
        )
    shared = {c: max(_limit(values[c] * scale) for _, values in rows) for c, _, scale, _ in _PANELS}
    if all(f"diff_{c}" in ds for c, *_ in _PANELS):
        rows.append(
            (
                f"{methods[0]} - {methods[1]}",
                {c: np.asarray(ds[f"diff_{c}"].values, np.float64) for c, *_ in _PANELS},
            )
        )
    fig = Figure(figsize=(14.0, 3.0 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (label, values) in enumerate(rows):
        is_diff = " - " in label
        for j, (name, title, scale, unit) in enumerate(_PANELS):
            ax = fig.add_subplot(len(rows), len(_PANELS), i * len(_PANELS) + j + 1)
            shown = values[name] * scale
            limit = _limit(shown) if is_diff else shared[name]
            cmap = colormaps["RdBu_r" if name != "theta" else "PuOr_r"].with_extremes(bad="0.6")
            image = ax.imshow(shown, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
            if i == 0:
                ax.set_title(title)
            if j == 0:
                ax.set_ylabel(label)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image, ax=ax, label=unit, shrink=0.85)
    fig.suptitle("strain in the detector frame: rows rx, columns ry")
    return fig


#: Line styles of the methods' reference outlines: where two methods take the same region,
#: both outlines stay visible.
_OUTLINES = ("solid", "dashed", "dotted")


def _pixel_edges(mask: np.ndarray, fine: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``contour``'s (x, y, z) for a mask (RX, RY) drawn on a grid ``fine`` times finer, so
    that its 0.5 level runs along the pixels' edges, not through their centres."""
    z = np.kron(mask, np.ones((fine, fine)))
    y, x = ((np.arange(n) + 0.5) / fine - 0.5 for n in z.shape)
    return x, y, z


def virtual_figure(ds: xr.Dataset) -> Figure:
    """The scan's virtual bright-field and annular dark-field images, each method's reference
    region outlined on them.

    Parameters
    ----------
    ds
        A strain dataset holding ``virtual_bf`` and ``virtual_adf`` (dims (rx, ry),
        :func:`stemlib.virtual.virtual_images`) and, optionally, ``reference_region`` (dims
        (method, rx, ry)).

    Returns
    -------
    matplotlib.figure.Figure
        Two grey panels, rows ``rx`` and columns ``ry`` as in the scan, each scaled from its 1st
        to 99th percentile; a coloured outline and a legend entry per method's reference region.

    Examples
    --------
    >>> from stemlib.results import strain_dataset
    >>> from stemlib.virtual import virtual_images
    >>> z = np.zeros((4, 5))
    >>> ref = np.zeros((4, 5), bool)
    >>> ref[:2, :2] = True
    >>> ds = strain_dataset("py4dstem", exx=z, eyy=z, exy=z, theta=z,
    ...                     extras={"reference_region": (ref, {"units": "1"})})
    >>> ds = ds.assign(virtual_images(np.random.default_rng(0).random((4, 5, 16, 16))))
    >>> fig = virtual_figure(ds)
    >>> [ax.get_title() for ax in fig.axes[::2]]
    ['virtual bright field', 'virtual annular dark field']
    >>> fig.axes[0].get_legend_handles_labels()[1]
    ['py4dstem reference']
    """
    missing = [name for name in ("virtual_bf", "virtual_adf") if name not in ds]
    if missing:
        raise InputError(
            f"the strain dataset has no {' or '.join(missing)}; add "
            "stemlib.virtual.virtual_images(scan) to it first."
        )
    methods = [str(m) for m in ds["method"].values] if "reference_region" in ds else []
    fig = Figure(figsize=(10.0, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    colours = colormaps["tab10"].colors
    for k, (name, title) in enumerate(
        (("virtual_bf", "virtual bright field"), ("virtual_adf", "virtual annular dark field"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        values = np.asarray(ds[name].values, np.float64)
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        image = ax.imshow(
            values, cmap="gray", vmin=low, vmax=max(high, low + 1e-12), interpolation="nearest"
        )
        outlined = False
        for i, method in enumerate(methods):
            region = np.asarray(ds["reference_region"].sel({"method": method}).values, float)
            if np.nanmax(region, initial=0) > 0:
                colour = colours[i % len(colours)]
                style = {"colors": [colour], "linestyles": _OUTLINES[i % len(_OUTLINES)]}
                ax.contour(*_pixel_edges(np.nan_to_num(region)), levels=[0.5], **style)
                ax.plot([], [], color=colour, ls=style["linestyles"], label=f"{method} reference")
                outlined = True
        if outlined:
            ax.legend(loc="lower right", fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("ry (scan column)")
        ax.set_ylabel("rx (scan row)")
        fig.colorbar(image, ax=ax, label=ds[name].attrs.get("units", ""), shrink=0.85)
    fig.suptitle("where the sample is: the scan's virtual images")
    return fig


def save_png(fig: Figure, url: str) -> str:
    """Render ``fig`` as PNG to a local path or fsspec URL (``s3://...``); returns the URL.

    The file is written whole or not at all: rendered in memory, then a local file under a
    temporary name renamed over ``url`` (:func:`stemlib.io.storage.staged_file`; a full disk
    leaves no cut PNG), an object in one upload.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    location = locate(url)
    if location.is_local:
        with staged_file(location.path) as temp:
            temp.write_bytes(buffer.getvalue())
    else:
        with storage_errors(location.url):
            location.fs.pipe(location.path, buffer.getvalue())
    return url if "://" in url else location.url


def png_url(dest: str, name: str) -> str:
    """The PNG beside a store: its name without ``.zarr``, a dash, ``name``, ``.png``.

    Examples
    --------
    >>> png_url("out/strain.zarr", "py4dstem")
    'out/strain-py4dstem.png'
    >>> png_url("s3://bucket/runs/strain.zarr/", "ccstae")
    's3://bucket/runs/strain-ccstae.png'
    >>> png_url("strain", "py4dstem")
    'strain-py4dstem.png'
    """
    base = str(dest).rstrip("/")
    if not base:
        raise InputError(
            f"{redact(str(dest))!r} names no store; pass DEST such as out/strain.zarr."
        )
    head, _, tail = base.rpartition("/")
    stem = tail[: -len(".zarr")] if tail.endswith(".zarr") else tail
    return f"{head}/{stem}-{name}.png" if head or base.startswith("/") else f"{stem}-{name}.png"
