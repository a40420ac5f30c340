"""The CC-ST-AE paper's noise model (CONVENTIONS.md section 3) and a pure dose model.

For a pattern ``P`` normalised to sum 1, background weight ``w`` in [0, 1] ("w x 100 %
background noise") and dose ``N`` electrons per pattern:

- ``B(q) = 1 / (1 + |q|^2 / q0^2)`` with ``q`` per axis from ``fftshift(fftfreq(n))`` in
  cycles/pixel and ``q0 = 0.01``, normalised to sum 1: a Lorentzian on the pattern's centre;
- ``I = (1 - w) P + w B`` and ``counts ~ Poisson(N I)``; ``w = 0`` is the clean pattern with no
  Poisson step (the paper's "0 %");
- the paper then multiplies by ``1/N * 1e5/4``; here counts are stored as integers and that
  factor as the attribute ``paper_scale``.

The pure dose model (``model="dose"``) is ``counts ~ Poisson(N P)``, shot noise alone.

Random numbers come from one generator per pattern, seeded by ``(seed, rx, ry)``: the chunk
index of one-pattern chunks. The bytes therefore depend on the seed alone, not on the number of
workers, the order the chunks run in, or the chunking itself.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop (noise levels 0-70 %, N = 1e5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from .calibration import Calibration
from .errors import InputError
from .ingest import IngestOptions, keyed_source, refuse_transforms
from .io.readers import SourceScan
from .io.scan_store import WriteResult, finished_scan, open_scan, write_scan
from .io.storage import Location, locate, redact, storage_errors
from .provenance import software_versions, utc_now
from .scan import as_scan
from .types import SCAN_DIMS, NoiseModel

__all__ = [
    "Q0",
    "PAPER_COUNTS",
    "background_pattern",
    "count_dtype",
    "paper_scale",
    "add_noise",
    "noise_recipe",
    "noise_store",
]

#: Width of the Lorentzian background in cycles/pixel.
Q0 = 0.01
#: The paper's dose, electrons per pattern.
PAPER_COUNTS = 1e5
#: Standard deviations above the dose that a count dtype must hold (see :func:`count_dtype`).
_SIGMAS = 20.0
_MODELS = ("background", "dose")
#: A scan as a user holds it; :func:`add_noise` returns the same kind.
_Patterns = TypeVar("_Patterns", da.Array, np.ndarray, xr.DataArray)


def background_pattern(shape: tuple[int, int], *, q0: float = Q0) -> np.ndarray:
    """The Lorentzian background ``B`` of CONVENTIONS.md section 3, summing to 1.

    Parameters
    ----------
    shape
        (QX, QY) of the pattern (``qx`` = rows).
    q0
        Half width in cycles/pixel.

    Returns
    -------
    ndarray of shape (QX, QY), float64
        ``1 / (1 + (qx^2 + qy^2) / q0^2)`` normalised to sum 1, with ``qx, qy`` from
        ``fftshift(fftfreq(n))``: the peak at pixel ``(QX // 2, QY // 2)``.

    Examples
    --------
    >>> b = background_pattern((200, 200))
    >>> round(float(b.sum()), 12), [int(i) for i in np.unravel_index(b.argmax(), b.shape)]
    (1.0, [100, 100])
    """
    qx = np.fft.fftshift(np.fft.fftfreq(shape[0]))
    qy = np.fft.fftshift(np.fft.fftfreq(shape[1]))
    b = 1.0 / (1.0 + (qx[:, None] ** 2 + qy[None, :] ** 2) / q0**2)
    return b / b.sum()


def count_dtype(counts: float) -> np.dtype:
    """The smallest unsigned integer type that cannot overflow at ``counts`` per pattern.

    A pixel never holds more than its pattern's total, which is ``Poisson(counts)``; the type
    holds ``counts + 20 sqrt(counts) + 20``, a total that a Poisson draw exceeds with probability
    below 1e-80. (uint16 would overflow at the paper's 1e5 counts when the direct beam is
    concentrated in a few pixels.)

    Examples
    --------
    >>> count_dtype(1e3), count_dtype(1e5)
    (dtype('uint16'), dtype('uint32'))
    """
    bound = counts + _SIGMAS * math.sqrt(counts) + _SIGMAS
    for dtype in (np.uint16, np.uint32, np.uint64):
        if bound <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(
        f"counts={counts:g} per pattern is more than a uint64 can hold; pass a smaller --counts."
    )


def paper_scale(counts: float) -> float:
    """The paper's factor ``1/N * 1e5/4`` that turns stored counts into its intensities.

    Examples
    --------
    >>> paper_scale(1e5)
    0.25
    """
    return 1.0 / counts * 1e5 / 4


def _check(background: float, counts: float, model: str, seed: int) -> None:
    if model not in _MODELS:
        raise InputError(
            f"model={model!r} is not a noise model; use --model background or --model dose."
        )
    try:
        w, n = float(background), float(counts)
    except (TypeError, ValueError):
        raise InputError(
            f"background={background!r} and counts={counts!r} must be numbers; pass "
            "--background W --counts N."
        ) from None
    if not 0.0 <= w <= 1.0:
        raise InputError(
            f"background={background!r} is outside [0, 1]; pass --background W with 0 <= W <= 1 "
            "(0.5 is the paper's 50 % background)."
        )
    if model == "dose" and w != 0:
        raise InputError(
            f"the dose model has no background, got background={background}; pass --background 0 "
            "with --model dose, or use --model background."
        )
    if not (math.isfinite(n) and n > 0):
        raise InputError(
            f"counts={counts!r} is not a positive dose; pass --counts N > 0 (the paper uses 1e5)."
        )
    count_dtype(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed={seed!r} is not an integer >= 0; pass --seed S with S >= 0.")


def _noisy_block(
    block: np.ndarray,
    *,
    weight: float,
    counts: float,
    seed: int,
    background: np.ndarray | None,
    out_dtype: np.dtype,
    block_info: Any = None,
) -> np.ndarray:
    """Counts for a block of patterns (crx, cry, QX, QY), one generator per pattern."""
    (r0, _), (c0, _) = block_info[0]["array-location"][:2]
    block = block.astype(np.float64)
    if not (np.isfinite(block).all() and block.min(initial=0.0) >= 0):
        bad = ~np.isfinite(block) | (block < 0)
        i, j = (int(v[0]) for v in np.nonzero(bad.any(axis=(2, 3))))
        raise InputError(
            f"the pattern at (rx, ry) = ({r0 + i}, {c0 + j}) holds negative or non-finite values; "
            "noise needs intensities >= 0: clean or re-ingest the scan."
        )
    # lam = N ((1 - w) P / sum(P) + w B), built in place.
    totals = block.sum(axis=(2, 3), keepdims=True)
    block *= counts * (1.0 - weight) / np.where(totals > 0, totals, 1.0)
    if background is not None:
        block += counts * weight * background
    # The rates sum to N per pattern, so no count exceeds out_dtype (see count_dtype).
    out = np.empty(block.shape, dtype=out_dtype)
    for i in range(block.shape[0]):
        for j in range(block.shape[1]):
            out[i, j] = np.random.default_rng([seed, r0 + i, c0 + j]).poisson(block[i, j])
    return out


def _noisy(patterns: da.Array, *, weight: float, counts: float, seed: int, model: str) -> da.Array:
    """Lazy counts of a lazy scan of shape (RX, RY, QX, QY) (see :func:`add_noise`)."""
    dtype = count_dtype(counts)
    patterns = patterns.rechunk({2: -1, 3: -1})
    return da.map_blocks(
        _noisy_block,
        patterns,
        weight=weight,
        counts=float(counts),
        seed=int(seed),
        background=background_pattern(patterns.shape[2:]) if weight else None,
        out_dtype=dtype,
        dtype=dtype,
        name=f"stemflow-noise-{model}-" + tokenize(patterns, weight, counts, seed),
    )


def _labelled_counts(patterns: xr.DataArray, counts: da.Array) -> xr.DataArray:
    """``counts`` in the place of ``patterns``'s values, with its dims, coordinates and
    calibration; in memory where ``patterns`` was."""
    in_memory = not isinstance(patterns.data, da.Array)
    noisy = patterns.copy(data=counts.compute() if in_memory else counts)
    noisy.attrs.update(units="counts", long_name="electron counts")
    return noisy


def add_noise(
    patterns: _Patterns,
    *,
    background: float,
    counts: float = PAPER_COUNTS,
    seed: int,
    model: NoiseModel = "background",
) -> _Patterns:
    """Noisy counts of a scan under the paper's background model or the pure dose model.

    Parameters
    ----------
    patterns
        Array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2) of intensities >= 0: a
        dask array, a NumPy array, or an xarray DataArray with dims (rx, ry, qx, qy) (such as
        ``stemlib.simulate(...)["data"]``). Each pattern is divided by its sum first (the
        model's ``P``; a no-op for the simulator's patterns, which sum to 1).
    background
        ``w`` in [0, 1], the background weight; must be 0 for ``model="dose"``.
    counts
        ``N``, electrons per pattern (> 0).
    seed
        Seed; the pattern at (rx, ry) draws from a generator seeded by ``(seed, rx, ry)``.
    model
        ``"background"``: ``Poisson(N ((1 - w) P + w B))``, and ``w = 0`` returns ``patterns``
        unchanged (the clean pattern, no Poisson step). ``"dose"``: ``Poisson(N P)``.

    Returns
    -------
    Array of shape (RX, RY, QX, QY), of the kind of ``patterns``
        Counts (unit "counts") in :func:`count_dtype` ``(counts)``; multiply by
        :func:`paper_scale` for the paper's intensities. A dask array (or a DataArray of one)
        stays lazy; a NumPy array (or a DataArray of one) is computed. A DataArray keeps its
        dims, coordinates and attributes, with ``units = "counts"``. ``patterns`` itself for
        ``w = 0``.

    Raises
    ------
    InputError
        For ``w`` outside [0, 1], a non-positive dose, an unknown model, a non-4D array or a
        DataArray of other dims (at once); for negative or non-finite intensities (when the
        block is computed).

    Examples
    --------
    >>> p = da.ones((2, 2, 16, 16), chunks=(1, 2, 16, 16))
    >>> noisy = add_noise(p, background=0.5, counts=1e4, seed=0)
    >>> noisy.dtype, int(noisy[0, 0].sum().compute()) > 9000
    (dtype('uint16'), True)
    >>> scan = xr.DataArray(np.ones((2, 2, 16, 16)), dims=("rx", "ry", "qx", "qy"))
    >>> counts = add_noise(scan, background=0.5, counts=1e4, seed=0)
    >>> counts.dims, counts.attrs["units"], type(counts.data).__name__
    (('rx', 'ry', 'qx', 'qy'), 'counts', 'ndarray')
    """
    _check(background, counts, model, seed)
    scan = None if isinstance(patterns, da.Array) else as_scan(patterns, name="patterns")
    lazy = patterns if scan is None else da.asarray(scan.data)
    if lazy.ndim != 4:
        raise InputError(
            f"patterns has shape {lazy.shape}; add_noise needs 4 dims (rx, ry, qx, qy)."
        )
    weight = float(background)
    if model == "background" and weight == 0.0:
        return patterns
    noisy = _noisy(lazy, weight=weight, counts=float(counts), seed=int(seed), model=model)
    if scan is None:
        return noisy
    labelled = _labelled_counts(scan, noisy)
    return labelled if isinstance(patterns, xr.DataArray) else labelled.data


def noise_recipe(
    source_content_sha256: str | None,
    *,
    background: float,
    counts: float = PAPER_COUNTS,
    seed: int = 0,
    model: NoiseModel = "background",
    source_key: str | None = None,
) -> dict[str, Any]:
    """What determines a noisy copy's values: the source's content hash (a scan store) or its
    key (a raw scan: :func:`stemlib.ingest.source_key`) and the noise parameters
    (:func:`stemlib.io.scan_store.finished_scan` finds a copy made from them)."""
    return {
        "made_by": "stemlib.noise",
        "source_content_sha256": source_content_sha256,
        **({"source_key": source_key} if source_key is not None else {}),
        "model": model,
        "background": float(background),
        "counts": float(counts),
        "seed": int(seed),
        "software": software_versions(("stemflow",)),
    }


@dataclass(frozen=True)
class _Clean:
    """The scan to add noise to, from a scan store or a raw file: its patterns (RX, RY, QX, QY),
    calibration, per-position maps to carry (the truth) and the attributes the noisy copy
    keeps."""

    data: da.Array
    calibration: Calibration
    extras: xr.Dataset | None
    attrs: dict[str, Any]


#: Attributes of a scan store that its noisy copy keeps.
_KEPT = ("truth_symmetry", "simulation", "reciprocal_basis_px", "ellipse_matrix", "disk_radius_px")


def _from_store(src: Location, scan: xr.DataArray) -> _Clean:
    """The scan store at ``src``, whose ``scan`` :func:`open_scan` opened."""
    with storage_errors(src.url):
        stored = xr.open_zarr(src.url, storage_options=src.storage_options or None)
    return _Clean(
        data=scan.data,
        calibration=Calibration.from_attrs(scan.attrs),
        extras=stored[[name for name, var in stored.data_vars.items() if var.dims == SCAN_DIMS]],
        attrs={
            **{key: scan.attrs[key] for key in _KEPT if key in scan.attrs},
            "source_content_sha256": scan.attrs.get("content_sha256"),
        },
    )


def _from_raw(raw: SourceScan, key: str, options: IngestOptions) -> _Clean:
    truth = raw.truth
    return _Clean(
        data=raw.data,
        calibration=raw.calibration,  # merged with the options' by KeyedSource.open
        extras=truth,
        attrs={
            **({"truth_symmetry": truth.attrs.get("truth_symmetry")} if truth is not None else {}),
            "source_key": key,
            "reader": raw.reader,
            "reader_details": raw.details,
            "ingest_options": options.identity(),
        },
    )


def noise_store(
    source: str,
    dest: str,
    *,
    background: float,
    counts: float = PAPER_COUNTS,
    seed: int = 0,
    model: NoiseModel = "background",
    read: IngestOptions | None = None,
) -> WriteResult:
    """Read a scan, add noise chunk by chunk, and publish the noisy scan store atomically.

    Parameters
    ----------
    source
        Scan store (path or URL) with ``data`` of dims (rx, ry, qx, qy), or a raw scan file in
        any supported format, read block by block as ``stemflow ingest`` reads it (no clean
        store is written).
    dest
        Scan store to write (path or URL); must differ from ``source``.
    background, counts, seed, model
        As :func:`add_noise`.
    read
        How to read a raw ``source`` (format, HDF5 dataset, raw layout, calibration overrides,
        cropping and binning); ignored for a scan store, which it may not crop or bin.

    Returns
    -------
    WriteResult
        What was published, or what ``dest`` already held from the same source and parameters
        (status ``"skipped"``: nothing is computed again). The store carries the source's
        calibration, its per-position variables (the ``truth_*`` maps, ``grain_id``, ...) and
        ``truth_symmetry``, and the provenance attributes ``noise_model``,
        ``noise_background`` (w), ``noise_counts`` (N), ``noise_seed``, ``noise_q0``,
        ``noise_seeding``, ``paper_scale`` (1 for the clean ``w = 0`` copy), ``source`` and
        the source's fingerprint: ``source_content_sha256`` of a scan store, ``source_key`` of
        a raw file.

    Raises
    ------
    InputError
        For bad parameters, a missing source, a store without the dims of CONVENTIONS.md, a raw
        file its reader refuses, a scan store with ``read`` cropping or binning it, or ``dest``
        equal to ``source``; nothing is published.
    """
    _check(background, counts, model, seed)
    src, out = locate(source), locate(dest)
    if src.fs.protocol == out.fs.protocol and src.path.rstrip("/") == out.path.rstrip("/"):
        raise InputError(f"DEST {redact(dest)} is the SOURCE; choose another destination.")
    try:
        with storage_errors(src.url):
            info = src.fs.info(src.path)  # one request: whether it exists, is a file, its key
    except FileNotFoundError:
        info = None
    if info is None:
        raise InputError(
            f"{redact(src.url)} does not exist; check the path (a scan store, or a raw scan in "
            "any supported format)."
        )
    params = {"background": background, "counts": counts, "seed": seed, "model": model}
    if info.get("type") != "file":  # a scan store, or a folder that open_scan explains
        scan = open_scan(src)
        refuse_transforms(source, read)
        recipe = noise_recipe(scan.attrs.get("content_sha256"), **params)
        done = finished_scan(out, recipe)
        if done is not None:
            return done
        return _write_noisy(_from_store(src, scan), recipe, source, out, **params)
    options = read or IngestOptions()
    keyed = keyed_source(src, options, info=info)  # companions listed once, for key and copy
    recipe = noise_recipe(None, source_key=keyed.key, **params)
    done = finished_scan(out, recipe)  # before a vendor file on object storage is copied
    if done is not None:
        return done
    with keyed.open() as raw:
        return _write_noisy(_from_raw(raw, keyed.key, options), recipe, source, out, **params)


def _write_noisy(
    clean: _Clean,
    recipe: dict[str, Any],
    source: str,
    out: Location,
    *,
    background: float,
    counts: float,
    seed: int,
    model: NoiseModel,
) -> WriteResult:
    """Publish the noisy copy of ``clean``, made by ``recipe``, at ``out`` (:func:`noise_store`)."""
    noisy = add_noise(clean.data, background=background, counts=counts, seed=seed, model=model)
    no_poisson = noisy is clean.data
    attrs = {
        **clean.attrs,
        "source": redact(source),
        "noise_model": model,
        "noise_background": float(background),
        "noise_counts": float(counts),
        "noise_seed": int(seed),
        "noise_q0": Q0,
        "noise_poisson": not no_poisson,
        "noise_seeding": "one numpy Generator per pattern, default_rng([seed, rx, ry])",
        "paper_scale": 1.0 if no_poisson else paper_scale(counts),
        "software": software_versions(),
        "created": utc_now(),
    }
    return write_scan(
        noisy,
        out,
        calibration=clean.calibration,
        attrs=attrs,
        extras=clean.extras,
        recipe=recipe,
    )
