"""NanoMegas ASTAR .blo blockfiles, read through rosettasciio, lazily."""

from __future__ import annotations

import os

from ....errors import InputError
from ...storage import Location, redact
from ..base import ReadOptions, SourceScan, default_chunks
from ._common import (
    axes_calibration,
    finish,
    first_bytes,
    positive,
    truncated,
    vendor_errors,
)

__all__ = ["read_blo"]


def read_blo(location: Location, options: ReadOptions) -> SourceScan:
    """NanoMegas ASTAR blockfile (uint8 patterns, scan NY x NX) through rosettasciio, lazily.

    Calibration: the probe step (header SX, SY in nm) and the beam energy (header, V). The
    detector scale is stored in cm on the camera screen, which is no unit of q: left unknown.
    """
    source = redact(location.url)
    path = location.path
    if not first_bytes(path, 6) == b"IMGBLO":
        raise InputError(
            f"{source} is not a NanoMegas blockfile (it does not start with IMGBLO); check the "
            "file, or pass --format with its real format."
        )
    from rsciio.blockfile import file_reader

    with vendor_errors(source, "NanoMegas .blo"):
        header = file_reader(path, lazy=True)[0]["original_metadata"]["blockfile_header"]
        nx, ny, side, offset = (int(header[k]) for k in ("NX", "NY", "DP_SZ", "Data_offset_2"))
    size = os.path.getsize(path)
    needed = offset + nx * ny * (6 + side * side)
    if size < needed:
        raise truncated(
            source, size, needed, f"its header's {ny}x{nx} scan of {side}x{side} patterns"
        )
    # Read again with whole-pattern blocks: rosettasciio's automatic blocks split the patterns.
    crx, cry = options.chunks or default_chunks((ny, nx, side, side), 1)
    with vendor_errors(source, "NanoMegas .blo"):
        signal = file_reader(path, lazy=True, chunks=(crx, cry, side, side))[0]
    calibration = axes_calibration(signal["axes"], signal["data"].ndim)  # detector axes are in cm
    calibration["beam_energy_keV"] = positive(header.get("Beam_energy"), 1e-3)
    return finish(
        signal["data"],
        source=source,
        scan_shape=None,
        options=options,
        calibration=calibration,
        reader="rsciio:Blockfile",
        details={
            "format": "NanoMegas ASTAR blockfile",
            "scan": [ny, nx],
            "pattern_side": side,
            "scan_rotation_deg": float(header.get("Scan_rotation", 0)) / 100,
            "camera_length_raw": header.get("Camera_length"),
            "note": str(header.get("Note", ""))[:200],
        },
    )
