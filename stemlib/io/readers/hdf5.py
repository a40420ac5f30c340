"""HDF5 scans: a named dataset, py4DSTEM/EMD 1.0 files, the CC-ST-AE paper's ``output4D``
layout (.mat v7.3 / .h5), or the one 4D dataset of a file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - registers bitshuffle/LZ4 and other filters with h5py
import numpy as np

from ...calibration import Calibration
from ...errors import InputError
from ..storage import Location, locate, redact, storage_errors
from .base import ReadOptions, SourceScan, lazy_scan, probe_block, resolve_scan_shape

__all__ = ["read_hdf5", "HDF5_MAGIC"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Smallest pattern side (px) that makes a 4D dataset a candidate scan when guessing.
_MIN_PATTERN_PX = 8
#: h5py axis order of MATLAB's output4D (ry, rx, qy, qx) -> (rx, ry, qx, qy).
_OUTPUT4D_AXES = (1, 0, 3, 2)


@contextlib.contextmanager
def _open(url: str) -> Iterator[h5py.File]:
    location = locate(url)
    with storage_errors(url):
        if location.is_local:
            with h5py.File(location.path, "r") as f:
                yield f
        else:
            with location.fs.open(location.path, "rb") as raw, h5py.File(raw, "r") as f:
                yield f


class H5Array:
    """A picklable, lazily opened view of one HDF5 dataset, optionally with permuted axes.

    ``shape`` is the permuted shape; slicing reads the matching block of the stored dataset.
    For a stack of frames with a scan shape, the view is 4D over the stored 3D dataset.
    """

    def __init__(
        self,
        url: str,
        dataset: str,
        stored_shape: tuple[int, ...],
        dtype: Any,
        *,
        axes: tuple[int, ...] | None = None,
        scan_shape: tuple[int, int] | None = None,
    ) -> None:
        self.url, self.dataset = url, dataset
        self.stored_shape = tuple(stored_shape)
        self.dtype = np.dtype(dtype)
        self.axes = axes
        permuted = tuple(self.stored_shape[a] for a in axes) if axes else self.stored_shape
        self.scan_shape = scan_shape
        self.shape = (tuple(scan_shape) + permuted[-2:]) if scan_shape else permuted
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        with _open(self.url) as f:
            ds = f[self.dataset]
            if self.scan_shape is not None:
                return self._frames(ds, key)
            if self.axes is None:
                return ds[key]
            # Stored axis a is result axis argsort(axes)[a]; dask passes one slice per axis.
            stored_key = tuple(key[i] for i in np.argsort(self.axes))
            return np.transpose(ds[stored_key], self.axes)

    def _frames(self, ds: h5py.Dataset, key: tuple[Any, ...]) -> np.ndarray:
        """Rows of a flat frame stack viewed as (RX, RY, QX, QY)."""
        ry = self.scan_shape[1]
        rows = range(*key[0].indices(self.shape[0]))
        cols = key[1].indices(ry)
        out = [ds[r * ry + cols[0] : r * ry + cols[1]] for r in rows]
        block = np.stack(out) if out else np.empty((0, 0) + self.shape[2:], self.dtype)
        return block[(slice(None), slice(None)) + key[2:]]


def _py4dstem_calibration(group: h5py.Group) -> Calibration:
    """Calibration from a py4DSTEM (emdfile) ``metadatabundle/calibration`` group, if any."""
    cal = group.get("metadatabundle/calibration")
    if cal is None:
        return Calibration()

    def value(name: str) -> Any:
        if name not in cal:
            return None
        v = cal[name][()]
        v = v.decode() if isinstance(v, bytes) else v
        return None if isinstance(v, float) and not np.isfinite(v) else v

    fields: dict[str, Any] = {}
    r_size, r_units = value("R_pixel_size"), value("R_pixel_units")
    to_nm = {"nm": 1.0, "A": 0.1, "Å": 0.1, "pm": 1e-3, "um": 1e3}
    if r_size and r_units in to_nm and not (float(r_size) == 1.0 and r_units == "pixels"):
        fields["probe_step_nm"] = float(r_size) * to_nm[r_units]
    q_size, q_units = value("Q_pixel_size"), value("Q_pixel_units")
    units = {"A^-1": "1/A", "1/A": "1/A", "mrad": "mrad"}.get(str(q_units))
    if q_size and units:
        fields["q_pixel_size"] = float(q_size)
        fields["q_pixel_units"] = units
    qx0, qy0 = value("qx0_mean"), value("qy0_mean")
    if qx0 is not None and qy0 is not None:
        fields["origin_px"] = (float(qx0), float(qy0))
    rotation = value("QR_rotation_degrees")
    if rotation is not None:
        fields["qr_rotation_deg"] = float(rotation)
    flip = value("QR_flip")
    if flip is not None:
        fields["qr_flip"] = bool(flip)
    energy = value("beam_energy") or value("E0")
    if energy:
        fields["beam_energy_keV"] = float(energy) / 1e3 if float(energy) > 1e3 else float(energy)
    return Calibration(**fields)


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(
        lambda name, obj: found.append(("/" + name, obj)) if isinstance(obj, h5py.Dataset) else None
    )
    return found


def _emd_arrays(f: h5py.File) -> list[str]:
    """Paths of 4D ``data`` arrays in EMD 1.0 ``array`` groups (py4DSTEM DataCubes)."""
    paths: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and obj.attrs.get("emd_group_type") == "array":
            data = obj.get("data")
            if isinstance(data, h5py.Dataset) and data.ndim == 4:
                paths.append("/" + name + "/data")

    f.visititems(visit)
    return paths


def _choose_dataset(
    f: h5py.File, source: str, scan_shape: tuple[int, int] | None
) -> tuple[str, str]:
    """Find the scan in a file: returns ``(dataset path, layout)``; layout is
    ``"emd1"``, ``"output4D"`` or ``"plain"``."""
    if f.attrs.get("emd_group_type") == "file":
        emd = _emd_arrays(f)
        if len(emd) == 1:
            return emd[0], "emd1"
        if len(emd) > 1:
            raise InputError(
                f"{source} holds several py4DSTEM datacubes ({', '.join(emd)}); "
                "pass --dataset with one of them."
            )
    if isinstance(f.get("output4D"), h5py.Dataset):
        return "/output4D", "output4D"
    datasets = _datasets(f)
    wanted = 4 if scan_shape is None else 3
    candidates = [
        path
        for path, ds in datasets
        if ds.ndim in (wanted, 4)
        and min(ds.shape[-2:]) >= _MIN_PATTERN_PX
        and ds.dtype.kind in "uif"
    ]
    four = [p for p in candidates if f[p].ndim == 4]
    candidates = four if four and scan_shape is None else candidates
    if len(candidates) == 1:
        return candidates[0], "plain"
    if not candidates:
        listing = ", ".join(f"{p} {tuple(ds.shape)}" for p, ds in datasets[:10]) or "no datasets"
        raise InputError(
            f"{source} has no 4D dataset of diffraction patterns ({listing}); "
            "pass --dataset PATH (and --scan-shape RX,RY for a stack of frames)."
        )
    listing = ", ".join(f"{p} {tuple(f[p].shape)}" for p in candidates)
    raise InputError(
        f"{source} holds several candidate scans ({listing}); pass --dataset with one of them."
    )


def _scan_shape_of(
    stored_shape: tuple[int, ...], layout: str, scan_shape: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(RX, RY) of the scan a dataset holds, without validating it (None if unknown)."""
    if scan_shape is not None:
        return tuple(scan_shape)  # type: ignore[return-value]
    if len(stored_shape) != 4:
        return None
    return (
        (stored_shape[1], stored_shape[0])
        if layout == "output4D"
        else (stored_shape[0], stored_shape[1])
    )


def _scan_alignment(
    stored_chunks: tuple[int, ...] | None, axes: tuple[int, ...] | None, scan: tuple[int, int]
) -> tuple[int, int]:
    """Probe positions (rows, columns) of one HDF5 chunk, so read blocks never split a chunk."""
    if stored_chunks is None:
        return (1, 1)
    if len(stored_chunks) == 4:
        chunks = tuple(stored_chunks[a] for a in axes) if axes else stored_chunks
        return chunks[0], chunks[1]
    frames = stored_chunks[0]  # a frame stack: chunks of consecutive frames
    return (frames // scan[1], scan[1]) if frames >= scan[1] else (1, frames)


def read_hdf5(location: Location, options: ReadOptions) -> SourceScan:
    """Open a scan inside an HDF5 file lazily (see the module docstring for the layouts)."""
    source = redact(location.url)
    try:
        with _open(location.url) as f:
            if options.dataset is not None:
                path = options.dataset if options.dataset.startswith("/") else "/" + options.dataset
                obj = f.get(path)
                if not isinstance(obj, h5py.Dataset):
                    names = ", ".join(p for p, _ in _datasets(f)[:12])
                    raise InputError(
                        f"{source} has no dataset {path}; pass --dataset with one of: {names}."
                    )
                layout = "output4D" if path == "/output4D" else "plain"
            else:
                path, layout = _choose_dataset(f, source, options.scan_shape)
            ds = f[path]
            stored_shape, dtype = tuple(int(n) for n in ds.shape), ds.dtype
            stored_chunks = tuple(int(n) for n in ds.chunks) if ds.chunks else None
            truth_group = f.get("truth")
            truth_shape = _scan_shape_of(stored_shape, layout, options.scan_shape)
            # imported here: stemlib.truth imports the io package, which imports this reader
            from ...truth import read_truth_group

            truth = (
                read_truth_group(truth_group, truth_shape)
                if isinstance(truth_group, h5py.Group) and truth_shape is not None
                else None
            )
            calibration = (
                _py4dstem_calibration(f[path].parent.parent) if layout == "emd1" else Calibration()
            )
    except OSError as exc:
        if (
            "truncated" in str(exc)
            or "file signature" in str(exc)
            or "unable to open" in str(exc).lower()
        ):
            raise InputError(
                f"{source} is not a readable HDF5 file (it is truncated or another format); "
                "check the file or pass --format."
            ) from None
        raise
    if dtype.kind not in "uif":
        raise InputError(
            f"{source}:{path} holds {dtype} values, not numbers; pass --dataset with the scan."
        )
    axes = _OUTPUT4D_AXES if layout == "output4D" and len(stored_shape) == 4 else None
    shape = tuple(stored_shape[a] for a in axes) if axes else stored_shape
    scan, frame = resolve_scan_shape(shape, options.scan_shape, f"{source}:{path}")
    if len(shape) == 4 and scan != shape[:2]:
        raise InputError(
            f"{source}:{path} is already a {shape[0]}x{shape[1]} scan; drop --scan-shape or pass "
            f"--scan-shape {shape[0]},{shape[1]}."
        )
    view = H5Array(
        location.url,
        path,
        stored_shape,
        dtype,
        axes=axes,
        scan_shape=scan if len(shape) == 3 else None,
    )
    chunks = options.chunks or probe_block(
        view.shape, dtype.itemsize, align=_scan_alignment(stored_chunks, axes, scan)
    )
    return SourceScan(
        data=lazy_scan(view, chunks=chunks),
        calibration=calibration,
        reader=f"hdf5:{layout}",
        source=source,
        details={"dataset": path, "stored_shape": list(stored_shape), "layout": layout},
        truth=truth,
    )
