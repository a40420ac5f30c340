"""NumPy ``.npy`` files and raw binary frame files, read lazily by byte ranges."""

from __future__ import annotations

import numpy as np

from ...calibration import Calibration
from ...errors import InputError
from ..storage import Location, redact, storage_errors
from .base import ByteRangeArray, ReadOptions, SourceScan, lazy_scan, resolve_scan_shape

__all__ = ["read_npy", "read_raw", "check_raw_layout"]


def _check_size(frames: ByteRangeArray, actual: int, source: str) -> None:
    expected = frames.expected_file_bytes
    if actual < expected:
        raise InputError(
            f"{source} is truncated: it has {actual} bytes but its shape needs {expected}; "
            "check that the file was copied completely."
        )


def read_npy(location: Location, options: ReadOptions) -> SourceScan:
    """Open a ``.npy`` file lazily: the header is parsed, frames are read by byte ranges.

    Accepts a 4D array (rx, ry, qx, qy) or, with ``scan_shape``, a 3D stack (N, qx, qy).
    """
    source = redact(location.url)
    with storage_errors(location.url), location.fs.open(location.path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError:
            raise InputError(
                f"{source} is not a NumPy .npy file (its header is not NumPy's); "
                "pass --format to name its real format."
            ) from None
        header_bytes = f.tell()
        size = location.fs.size(location.path)
    if dtype.hasobject:
        raise InputError(f"{source} holds Python objects, not numbers; save it as a numeric array.")
    if fortran and len(shape) > 1:
        raise InputError(
            f"{source} is stored in Fortran order; "
            "re-save it with np.save(path, np.ascontiguousarray(a))."
        )
    shape = tuple(int(n) for n in shape)
    scan_shape, frame_shape = resolve_scan_shape(shape, options.scan_shape, source)
    frames = ByteRangeArray(
        location.url,
        scan_shape=scan_shape,
        frame_shape=frame_shape,
        dtype=dtype,
        header_bytes=header_bytes,
    )
    _check_size(frames, size, source)
    return SourceScan(
        data=lazy_scan(frames, chunks=options.chunks),
        calibration=Calibration(),
        reader="npy",
        source=source,
        details={"stored_shape": list(shape), "dtype": dtype.str},
    )


#: What a raw binary file lacks without its layout (after the file's name, or ``--format raw``).
_NO_LAYOUT = (
    "a raw binary file needs its layout; pass --dtype (e.g. uint16) and --frame-shape QX,QY, "
    "and --scan-shape RX,RY."
)


def _raw_dtype(name: str) -> np.dtype:
    """The NumPy dtype ``--dtype`` names: integer or float counts, as a scan store holds."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise InputError(
            f"--dtype {name!r} is not a NumPy dtype; use e.g. uint16 or <f4."
        ) from None
    if dtype.kind not in "uif":
        raise InputError(
            f"--dtype {name!r} is {dtype}, not integer or float counts; use e.g. uint16 or <f4."
        )
    return dtype


def check_raw_layout(options: ReadOptions) -> None:
    """Refuse, before any file is read, a raw layout that no raw file could be read with: no
    ``dtype``, ``frame_shape`` or ``scan_shape``, or a ``dtype`` that is not NumPy's (for a
    run over many files, which would each fail with the same sentence).

    >>> check_raw_layout(ReadOptions(dtype="uint16", frame_shape=(8, 8), scan_shape=(4, 4)))
    >>> check_raw_layout(ReadOptions(dtype="uint16"))  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    stemlib.errors.InputError: --format raw: a raw binary file needs its layout; pass --dtype
    (e.g. uint16) and --frame-shape QX,QY, and --scan-shape RX,RY.
    """
    if options.dtype is None or options.frame_shape is None or options.scan_shape is None:
        raise InputError(f"--format raw: {_NO_LAYOUT}")
    _raw_dtype(options.dtype)


def read_raw(location: Location, options: ReadOptions) -> SourceScan:
    """Open a raw binary file of frames, given its layout in ``options``.

    ``dtype``, ``frame_shape`` and ``scan_shape`` are required. ``header_bytes`` precede the
    first frame; ``frame_header_bytes`` and ``frame_footer_bytes`` surround every frame (e.g. 0
    and 1024 for an EMPAD raw file).
    """
    source = redact(location.url)
    if options.dtype is None or options.frame_shape is None:
        raise InputError(f"{source}: {_NO_LAYOUT}")
    dtype = _raw_dtype(options.dtype)
    with storage_errors(location.url):
        size = int(location.fs.size(location.path))
    frame_shape = options.frame_shape
    stride = (
        options.frame_header_bytes
        + int(np.prod(frame_shape)) * dtype.itemsize
        + options.frame_footer_bytes
    )
    body = size - options.header_bytes
    if options.scan_shape is None:
        n = body // stride if stride else 0
        raise InputError(
            f"{source} holds {n} frames of {frame_shape[0]}x{frame_shape[1]} with no scan shape; "
            "pass --scan-shape RX,RY."
        )
    n_frames = options.scan_shape[0] * options.scan_shape[1]
    shape = (n_frames,) + tuple(frame_shape)
    scan_shape, frame_shape = resolve_scan_shape(shape, options.scan_shape, source)
    frames = ByteRangeArray(
        location.url,
        scan_shape=scan_shape,
        frame_shape=frame_shape,
        dtype=dtype,
        header_bytes=options.header_bytes,
        frame_header_bytes=options.frame_header_bytes,
        frame_footer_bytes=options.frame_footer_bytes,
    )
    _check_size(frames, size, source)
    extra = size - frames.expected_file_bytes
    if extra:
        per_frame = (
            f" ({extra // n_frames} per frame: a frame header or footer?)"
            if extra % n_frames == 0
            else ""
        )
        raise InputError(
            f"{source} has {extra} bytes more than {n_frames} frames of this layout{per_frame}; "
            "check --header-bytes, --frame-header-bytes, --frame-footer-bytes, --dtype and "
            "--scan-shape."
        )
    return SourceScan(
        data=lazy_scan(frames, chunks=options.chunks),
        calibration=Calibration(),
        reader="raw",
        source=source,
        details={
            "dtype": dtype.str,
            "header_bytes": options.header_bytes,
            "frame_header_bytes": options.frame_header_bytes,
            "frame_footer_bytes": options.frame_footer_bytes,
        },
    )
