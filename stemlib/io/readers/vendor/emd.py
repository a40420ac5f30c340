"""ThermoFisher Velox .emd and Berkeley (NCEM) .emd: metadata parsed by rosettasciio, frames
read by HDF5 slices."""

from __future__ import annotations

import json
import os
from typing import Any

import dask.array as da
import h5py

from ....errors import InputError
from ...storage import Location, redact
from ..base import ReadOptions, SourceScan, lazy_scan, resolve_scan_shape
from ..hdf5 import H5Array
from ._common import (
    axes_calibration,
    choose_signal,
    finish,
    h5_sniff,
    positive,
    vendor_errors,
)
from ._frames import HDF5Frames

__all__ = ["is_emd_berkeley", "is_velox", "read_emd_berkeley", "read_velox"]


def is_velox(location: Location) -> bool:
    def check(f: h5py.File) -> bool:
        version = f.get("Version")
        return isinstance(version, h5py.Dataset) and json.loads(version[0].decode())["format"] in (
            "Velox",
            "DevelopersKit",
        )

    return h5_sniff(location, check)


def is_emd_berkeley(location: Location) -> bool:
    def versioned(group: h5py.Group) -> bool:
        return "version_major" in group.attrs and "version_minor" in group.attrs

    def check(f: h5py.File) -> bool:
        if f.attrs.get("emd_group_type") in ("file", b"file"):  # EMD 1.0: the core reader's
            return False
        return versioned(f) or any(isinstance(g, h5py.Group) and versioned(g) for g in f.values())

    return h5_sniff(location, check)


def read_velox(location: Location, options: ReadOptions) -> SourceScan:
    """ThermoFisher Velox EMD: the file's stack of diffraction frames, its metadata parsed by
    rosettasciio; the scan shape is ``--scan-shape``.

    Velox keeps one HDF5 chunk per frame and rosettasciio's lazy array one dask task per frame
    (5x slower to convert), so the frames are read here by HDF5 slices of whole scan rows.
    Calibration: the frames' pixel size (1/m) and ``Optics.AccelerationVoltage`` (V). Velox's
    ``Optics.BeamConvergence`` is not documented as a semi- or full angle, so it is recorded in
    the details only.
    """
    source = redact(location.url)
    path = location.path
    if not is_velox(location):
        raise InputError(
            f"{source} is not a ThermoFisher Velox EMD file (it has no Velox version record); "
            "check the file, or pass --format auto or its real format."
        )
    from rsciio.emd import file_reader

    with vendor_errors(source, "Velox EMD"):
        signals = file_reader(path, lazy=True, select_type="images")
        signal = signals[
            choose_signal(signals, source, "save the scan to ingest in a file of its own")
        ]
        optics = signal["original_metadata"].get("Optics", {})
        frames, rows, cols = (int(n) for n in signal["data"].shape)
        with h5py.File(path, "r") as f:
            images = f["Data/Image"]
            dataset = next(
                f"/Data/Image/{key}/Data"
                for key in images
                if images[key]["Data"].shape == (rows, cols, frames)
            )
            dtype = f[dataset].dtype
    scan, frame = resolve_scan_shape((frames, rows, cols), options.scan_shape, source)
    view = HDF5Frames(
        [(path, dataset, frames)], frames_last=True, scan_shape=scan, frame_shape=frame, dtype=dtype
    )
    calibration = axes_calibration(signal["axes"], signal["data"].ndim)
    calibration["beam_energy_keV"] = positive(optics.get("AccelerationVoltage"), 1e-3)
    return finish(
        lazy_scan(view, chunks=options.chunks),
        source=source,
        scan_shape=None,
        options=options,
        calibration=calibration,
        reader="rsciio:EMD",
        details={
            "format": "ThermoFisher Velox EMD",
            "read_by": "HDF5 slices",
            "image": signal["metadata"]["General"].get("title"),
            "dataset": dataset,
            "beam_convergence_rad": optics.get("BeamConvergence"),
            "camera_length_m": optics.get("CameraLength"),
        },
    )


#: Names of the datasets that rosettasciio reads from a Berkeley EMD file (in its order).
_EMD_DATA_NAMES = (
    "data",
    "counted_datacube",
    "datacube",
    "diffractionslice",
    "realslice",
    "pointlistarray",
    "pointlist",
)


def _emd_datasets(f: h5py.File) -> list[str]:
    """Paths of the EMD datasets in a file, in the order rosettasciio returns their signals."""
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if (
            isinstance(obj, h5py.Dataset)
            and os.path.basename(name).startswith(_EMD_DATA_NAMES)
            and obj.parent.attrs.get("emd_group_type", False)
        ):
            found.append("/" + name)

    f.visititems(visit)
    return found


def read_emd_berkeley(location: Location, options: ReadOptions) -> SourceScan:
    """Berkeley (NCEM) EMD 0.x: the file's scan (or ``--dataset PATH``), its metadata parsed by
    rosettasciio; calibration from its ``dim`` vectors (scan nm, detector 1/nm or mrad).

    EMD 0.2 stores arrays with reversed axes, (QY, QX, RY, RX): rosettasciio's dask array, one
    block per HDF5 chunk, needs whole chunks that span the scan for every block of probe
    positions (a conversion held 2.5x the scan in memory), so the frames are read here by HDF5
    slices of the blocks of probe positions instead.
    """
    source = redact(location.url)
    path = location.path
    if not is_emd_berkeley(location):
        raise InputError(
            f"{source} is not a Berkeley EMD 0.x file (it has no EMD version attributes, or it is "
            "an EMD 1.0 file, which --format hdf5 reads); check the file, or pass --format auto "
            "or its real format."
        )
    with h5py.File(path, "r") as f:
        if options.dataset is not None and not isinstance(f.get(options.dataset), h5py.Dataset):
            raise InputError(
                f"{source} has no dataset {options.dataset}; pass --dataset with the path of the "
                "scan's data."
            )
        paths = [options.dataset] if options.dataset is not None else _emd_datasets(f)
    from rsciio.emd import file_reader

    with vendor_errors(source, "Berkeley EMD"):
        signals = file_reader(path, lazy=True, dataset_path=options.dataset, stack_group=False)
        index = choose_signal(signals, source, "pass --dataset with the path of one of them")
        signal, dataset = signals[index], paths[index]
        with h5py.File(path, "r") as f:
            stored = tuple(int(n) for n in f[dataset].shape)
            dtype = f[dataset].dtype
            # rosettasciio's rule: arrays whose dims count from dim1 (EMD < 0.5) are reversed.
            reversed_axes = (
                os.path.basename(dataset) != "datacube"
                and f"{os.path.dirname(dataset)}/dim0" not in f
            )
    view = H5Array(
        path,
        dataset,
        stored,
        dtype,
        axes=tuple(range(len(stored)))[::-1] if reversed_axes else None,
    )
    scan, _ = resolve_scan_shape(view.shape, options.scan_shape, source)
    if view.ndim == 3:  # frames: a block per scan row, reshaped into the scan by finish
        data = da.from_array(view, chunks=(scan[1],) + view.shape[1:], asarray=False, fancy=False)
    else:
        data = lazy_scan(view, chunks=options.chunks)
    return finish(
        data,
        source=source,
        scan_shape=scan,
        options=options,
        calibration=axes_calibration(signal["axes"], signal["data"].ndim),
        reader="rsciio:EMD",
        details={
            "format": f"Berkeley EMD {signal['original_metadata'].get('EMD_version')}",
            "read_by": "HDF5 slices",
            "dataset": dataset,
            "title": signal["metadata"]["General"].get("title"),
            "stored_shape": list(stored),
        },
    )
