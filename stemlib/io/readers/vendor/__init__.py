"""Vendor formats, read lazily: Merlin .mib, NanoMegas .blo, EMPAD, Dectris ARINA, FEI TIA,
Gatan DM3/DM4, TVIPS, MRC, ThermoFisher Velox and Berkeley EMD.

How each format is read (the ``reader`` recorded in a store's provenance):

=====================  ===========================  ==============================================
``--format``           header and metadata          frames
=====================  ===========================  ==============================================
mib, blo, dm, mrc      rosettasciio                 rosettasciio's lazy array (a memory map per
                                                    block), asked for whole-pattern blocks
empad                  rosettasciio (the .xml)      byte ranges of the .raw (``ByteRangeArray``)
velox, emd-berkeley    rosettasciio                 HDF5 slices of whole scan rows
arina, tia, tvips      this package                 HDF5 slices (arina), byte ranges (tia, tvips)
=====================  ===========================  ==============================================

Where the frames are not read through rosettasciio's lazy array, that array would hold far more
than a block in memory: its automatic blocks split the patterns (EMPAD, which takes no block
shape), it has one dask task per frame (Velox: 5x slower), its blocks span whole scans (Berkeley
EMD 0.2 stores arrays with reversed axes), it reads every frame at open (TIA), dask hashes the
whole memory map to name it (TVIPS), or it has no lazy mode (ARINA). Those readers follow
rosettasciio's (and openNCEM's) layouts and orientation conventions.

Every reader checks the file at open (signature, size against its header, companion files),
so that a wrong, truncated or incomplete file is refused with one sentence before anything is
written, and translates rosettasciio's exceptions into :class:`~stemlib.errors.InputError`.
Readers open local files: a vendor file on object storage is copied first, with the companion
files its format's ``companions`` names, into a temporary folder
(:class:`~stemlib.io.local_copy.LocalCopy`). Byte orders are converted to the machine's.
Calibration comes from the file where it states it, with its units; anything the file does not
state unambiguously stays unknown.
"""

from __future__ import annotations

from ..base import Format
from ._common import no_companions
from .arina import arina_companions, is_arina, read_arina
from .blo import read_blo
from .dm import read_dm
from .emd import is_emd_berkeley, is_velox, read_emd_berkeley, read_velox
from .empad import empad_companions, read_empad
from .mib import mib_companions, read_mib
from .mrc import mrc_companions, read_mrc
from .tia import read_tia, tia_companions
from .tvips import read_tvips, tvips_companions

__all__ = ["VENDOR_FORMATS"]

#: The vendor formats, tried before the core formats for a shared extension (.h5, .emd).
VENDOR_FORMATS: list[Format] = [
    Format(
        "mib",
        "Quantum Detectors Merlin .mib frames (scan shape from the .hdr or --scan-shape)",
        (".mib",),
        read_mib,
        companions=mib_companions,
    ),
    Format("blo", "NanoMegas ASTAR blockfile", (".blo",), read_blo, companions=no_companions),
    Format(
        "empad",
        "EMPAD .xml with its .raw frames",
        (".xml",),
        read_empad,
        companions=empad_companions,
    ),
    Format(
        "arina",
        "Dectris ARINA master file and its data files",
        ("_master.h5",),
        read_arina,
        sniff=is_arina,
        companions=arina_companions,
    ),
    Format(
        "tia",
        "FEI TIA series (.ser, or the .emi beside it)",
        (".emi", ".ser"),
        read_tia,
        companions=tia_companions,
    ),
    Format(
        "dm", "Gatan DigitalMicrograph DM3/DM4", (".dm3", ".dm4"), read_dm, companions=no_companions
    ),
    Format(
        "tvips",
        "TVIPS recording (NAME_000.tvips)",
        (".tvips",),
        read_tvips,
        companions=tvips_companions,
    ),
    Format(
        "mrc",
        "MRC stack of frames (--scan-shape, or a Direct Electron *_info.txt)",
        (".mrc",),
        read_mrc,
        companions=mrc_companions,
    ),
    Format(
        "velox",
        "ThermoFisher Velox EMD (stack of frames, --scan-shape)",
        (".emd",),
        read_velox,
        sniff=is_velox,
        companions=no_companions,
    ),
    Format(
        "emd-berkeley",
        "Berkeley (NCEM) EMD 0.x",
        (".emd",),
        read_emd_berkeley,
        sniff=is_emd_berkeley,
        companions=no_companions,
    ),
]
