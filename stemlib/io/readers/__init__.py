"""Readers: any supported raw scan -> a lazy (rx, ry, qx, qy) dask array plus calibration.

:func:`open_source` picks the reader from ``format`` or, with ``"auto"``, from the file's
extension and signature. Formats that rosettasciio reads are read through it, lazily. A vendor
file on object storage is read from a local copy (:mod:`stemlib.io.local_copy`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ...errors import InputError
from ..local_copy import LocalCopy, companion_files
from ..storage import Location, locate, redact, storage_errors
from .base import Format, ReadOptions, SourceScan, as_scan_4d, default_chunks
from .hdf5 import HDF5_MAGIC, read_hdf5
from .numpy_raw import read_npy, read_raw
from .vendor import VENDOR_FORMATS

__all__ = [
    "FORMATS",
    "Format",
    "format_named",
    "ReadOptions",
    "SourceScan",
    "open_source",
    "needs_local_copy",
    "source_companions",
    "supported_formats",
    "as_scan_4d",
    "default_chunks",
]


def _is_hdf5(location: Location) -> bool:
    with storage_errors(location.url), location.fs.open(location.path, "rb") as f:
        return f.read(len(HDF5_MAGIC)) == HDF5_MAGIC


_CORE_FORMATS = [
    Format("npy", "NumPy .npy array (4D, or 3D frames with --scan-shape)", (".npy",), read_npy),
    Format(
        "raw",
        "raw binary frames (--dtype, --frame-shape, --scan-shape, header/footer bytes)",
        (".raw", ".bin", ".dat"),
        read_raw,
    ),
    Format(
        "hdf5",
        (
            "HDF5: --dataset PATH, py4DSTEM/EMD 1.0, the CC-ST-AE output4D .mat/.h5, "
            "or the one 4D dataset"
        ),
        (".h5", ".hdf5", ".hdf", ".mat", ".emd", ".hspy"),
        read_hdf5,
        sniff=_is_hdf5,
    ),
]

#: Every supported format by name, in the order auto-detection tries them per extension.
FORMATS: dict[str, Format] = {f.name: f for f in [*VENDOR_FORMATS, *_CORE_FORMATS]}


def supported_formats() -> str:
    """One line per format: its name, extensions and what it reads."""
    return "\n".join(
        f"  {f.name:<13} {' '.join(f.extensions):<28} {f.description}" for f in FORMATS.values()
    )


def _detect(location: Location) -> Format:
    name = location.name.lower()
    matches = [f for f in FORMATS.values() if any(name.endswith(ext) for ext in f.extensions)]
    for fmt in matches:
        if fmt.sniff is None or fmt.sniff(location):
            return fmt
    if matches:
        # Every format claiming this extension refused the file: it is not what it claims to be.
        names = ", ".join(f.name for f in matches)
        raise InputError(
            f"{redact(location.url)} is not a valid {names} file (its contents do not match its "
            "extension); check the file, or pass --format with its real format."
        )
    names = ", ".join(FORMATS)
    raise InputError(
        f"{redact(location.url)}: unknown format {os.path.splitext(name)[1] or '(no extension)'}; "
        f"pass --format with one of: {names}."
    )


def format_named(format: str) -> Format:
    """The format called ``format`` (a key of :data:`FORMATS`), or one sentence naming them."""
    if format in FORMATS:
        return FORMATS[format]
    raise InputError(
        f"--format {format!r} is not supported; use auto or one of: {', '.join(FORMATS)}."
    )


def _format(location: Location, format: str) -> Format:
    """The format named ``format``, or the file's own with ``"auto"``."""
    return _detect(location) if format == "auto" else format_named(format)


def _source_file(url: str, info: Mapping[str, Any] | None = None) -> Location:
    """The location of the source file ``url``; raises if it is missing or a folder. ``info``
    is its fsspec info where the caller has it: then it exists, and its ``type`` says whether it
    is a folder, without asking the filesystem again."""
    location = locate(url)
    if info is None:
        if not location.exists():
            raise InputError(f"{redact(location.url)} does not exist; check the path.")
        folder = location.fs.isdir(location.path)
    else:
        folder = info.get("type") == "directory"
    if folder and not location.name.endswith(".zarr"):
        raise InputError(f"{redact(location.url)} is a folder; pass the scan file inside it.")
    return location


def needs_local_copy(url: str, *, format: str = "auto") -> bool:
    """Whether :func:`open_source` copies ``url`` to a local folder to read it: a file on object
    storage in a format whose reader opens local files (the vendor formats).

    Raises
    ------
    InputError
        As :func:`open_source` does for a missing file, a folder or an unknown format.
    """
    location = _source_file(url)
    return not location.is_local and _format(location, format).companions is not None


def source_companions(location: Location, *, format: str = "auto") -> dict[str, dict[str, Any]]:
    """The companion files that the reader of the file at ``location`` reads beside it, listed
    without reading them (:func:`~stemlib.io.local_copy.companion_files`).

    Parameters
    ----------
    location
        The source file, local or on object storage.
    format
        A name of :data:`FORMATS`, or ``"auto"`` to choose by extension and file signature.

    Returns
    -------
    dict
        Path on ``location``'s filesystem -> fsspec info (``size`` in bytes, ``mtime`` or
        ``LastModified``, ...), sorted by path; empty for a format read from one file.

    Raises
    ------
    InputError
        As :func:`open_source` does for an unknown format or a file that is not what it claims.
    StorageError
        An object store that cannot be reached or refuses access.
    """
    fmt = _format(location, format)
    return {} if fmt.companions is None else companion_files(location, fmt.companions)


def _read(fmt: Format, location: Location, options: ReadOptions) -> SourceScan:
    """``fmt``'s reading of ``location``, checked to be a non-empty scan of counts."""
    scan = fmt.read(location, options)
    data = as_scan_4d(scan.data, source=scan.source, scan_shape=None)
    if data.dtype.kind not in "uif":
        raise InputError(
            f"{scan.source} holds {data.dtype} values, not counts; save its intensities as "
            "integers or floats (np.abs(wave)**2 of a complex wave)."
        )
    if data.size == 0:
        raise InputError(
            f"{scan.source} holds an empty scan of shape {data.shape}; pass a file with data."
        )
    return scan


def open_source(
    url: str,
    *,
    format: str = "auto",
    options: ReadOptions | None = None,
    companions: Mapping[str, Mapping[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
) -> SourceScan:
    """Open a raw scan lazily.

    Parameters
    ----------
    url
        Local path or fsspec URL of the file (for EMPAD, the ``.xml``; for ARINA, the master file).
    format
        A name of :data:`FORMATS`, or ``"auto"`` to choose by extension and file signature.
    options
        Dataset path, scan shape, raw layout, block size (:class:`ReadOptions`).
    companions
        The companion files as :func:`source_companions` listed them for ``url`` and
        ``format`` (path -> fsspec info with ``size`` in bytes): a local copy holds those, not
        listed again (on object storage, requests per file). None lists them.
    info
        The fsspec info of the file at ``url`` (``type``, ``size`` in bytes) as the caller found
        it (:func:`stemlib.ingest.keyed_source`): the file is not asked again whether it exists,
        whether it is a folder, or its size for a local copy (on object storage, a request
        each). None asks.

    Returns
    -------
    SourceScan
        ``data`` of shape (RX, RY, QX, QY) in the detector's dtype, ``qx`` = pattern rows
        (axis 2); calibration from the file where it has one; ``source`` is ``url`` without
        credentials.

    Raises
    ------
    InputError
        Missing file, unknown format, a file that is not what it claims, a shape that is not a scan.
    StorageError
        An object store that cannot be reached or refuses access.
    ResourceError
        Too little free space in ``TMPDIR`` for the local copy of a vendor file on object storage.

    Notes
    -----
    A vendor file on object storage is first copied, with the companion files its reader uses,
    into a temporary folder (see :func:`needs_local_copy`); ``data`` reads that copy until the
    scan is closed: use ``with open_source(url) as scan:`` or call ``scan.close()``.
    """
    options = options or ReadOptions()
    location = _source_file(url, info)
    fmt = _format(location, format)
    if fmt.companions is None or location.is_local:
        return _read(fmt, location, options)
    size = None if info is None else info.get("size")
    copy = LocalCopy(location, fmt.companions, listed=companions, size=size)
    try:
        return dataclasses.replace(_read(fmt, copy.location, options), local_copy=copy)
    except BaseException:
        copy.close()
        raise
