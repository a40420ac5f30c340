"""Gatan DigitalMicrograph .dm3 / .dm4 files, read through rosettasciio, lazily."""

from __future__ import annotations

import os
import struct

import numpy as np

from ....errors import InputError
from ...storage import Location, redact
from ..base import ReadOptions, SourceScan, default_chunks, resolve_scan_shape
from ._common import (
    axes_calibration,
    choose_signal,
    finish,
    first_bytes,
    positive,
    truncated,
    vendor_errors,
)

__all__ = ["read_dm"]


def read_dm(location: Location, options: ReadOptions) -> SourceScan:
    """Gatan DM3/DM4 4D scan (or stack of frames) through rosettasciio, lazily.

    Calibration: the dimensions' scales (scan in nm, detector in 1/nm or mrad),
    ``Microscope Info.Voltage`` (V) and, where recorded, the EELS convergence semi-angle.
    """
    source = redact(location.url)
    path = location.path
    head = first_bytes(path, 4)
    if len(head) < 4 or struct.unpack(">l", head)[0] not in (3, 4):
        raise InputError(
            f"{source} is not a Gatan DigitalMicrograph file (its header is not DM3 or DM4); "
            "check the file, or pass --format with its real format."
        )
    from rsciio.digitalmicrograph import file_reader

    with vendor_errors(source, "Gatan DM"):
        signals = file_reader(path, lazy=True)
        index = choose_signal(signals, source, "save the scan to ingest in a file of its own")
    # Read again with whole-pattern blocks (rosettasciio's automatic blocks split the patterns):
    # a block of scan positions, or of one scan row of frames for a stack.
    found = signals[index]["data"]
    if found.ndim == 3:
        (_, ry), _ = resolve_scan_shape(found.shape, options.scan_shape, source)
        blocks = {0: ry}
    else:
        crx, cry = options.chunks or default_chunks(found.shape, found.dtype.itemsize)
        blocks = {0: crx, 1: cry}
    with vendor_errors(source, "Gatan DM"):
        signal = file_reader(path, lazy=True, chunks=blocks)[index]
        image = signal["original_metadata"]["ImageList"]["TagGroup0"]
        stored = image["ImageData"]["Data"]
        tags = image.get("ImageTags", {})
    data = signal["data"]
    size, needed = os.path.getsize(path), int(stored["offset"]) + int(stored["size_bytes"])
    if size < needed:
        raise truncated(source, size, needed, "its image data")
    if stored.get("endian") == "big" and data.dtype.itemsize > 1:
        # rosettasciio maps the pixels in the machine's byte order: swap big-endian files back.
        data = data.map_blocks(np.ndarray.byteswap, dtype=data.dtype)
    calibration = axes_calibration(signal["axes"], data.ndim)
    calibration["beam_energy_keV"] = positive(tags.get("Microscope Info", {}).get("Voltage"), 1e-3)
    eels = tags.get("EELS", {}).get("Experimental Conditions", {})
    calibration["convergence_semiangle_mrad"] = positive(eels.get("Convergence semi-angle (mrad)"))
    return finish(
        data,
        source=source,
        scan_shape=options.scan_shape,
        options=options,
        calibration=calibration,
        reader="rsciio:DigitalMicrograph",
        details={
            "format": f"Gatan DigitalMicrograph {struct.unpack('>l', head)[0]}",
            "image": signal["metadata"]["General"].get("title"),
            "stored_shape": list(data.shape),
            "byte_order": stored.get("endian"),
        },
    )
