"""Small vendor-format scans written by the tests themselves (no third-party data is shipped).

Where rosettasciio has a writer (NanoMegas blockfile, TVIPS, Berkeley EMD) it writes the file;
the other formats are generated here from their published layouts, as rosettasciio's readers
(and, for TIA and DM, openNCEM's) read them. Every writer takes a scan of shape
(RX, RY, QX, QY) (``qx`` = pattern rows, axis 2) and stores it so that a correct reader gives
back exactly that array: the tests compare bytes, so an axis swap, a flip or a byte-order slip
fails them.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import h5py
import numpy as np


def make_scan(
    shape: tuple[int, int, int, int] = (3, 4, 16, 24), dtype: str = "uint16"
) -> np.ndarray:
    """A scan whose positions all differ, and whose pixels differ from their mirror images.

    ``value = position * pixels + pixel`` (flat indices); for 8-bit types
    ``(37 * position + 11 * pixel) mod 251``, which keeps positions distinct and no row or
    column equal to its mirror. Swapping scan axes, detector axes, flipping a pattern or
    swapping bytes therefore changes the bytes. Float scans are offset by 0.25.
    """
    rx, ry, qx, qy = shape
    position = np.arange(rx * ry).reshape(rx, ry, 1, 1)
    pixel = np.arange(qx * qy).reshape(1, 1, qx, qy)
    if np.dtype(dtype).itemsize == 1:
        data = (37 * position + 11 * pixel) % 251
    else:
        data = position * (qx * qy) + pixel
    return (data + 0.25).astype(dtype) if np.dtype(dtype).kind == "f" else data.astype(dtype)


# --- Quantum Detectors Merlin (.mib, .hdr) --------------------------------------------------

_MIB_TYPES = {np.dtype("uint8"): "U08", np.dtype("uint16"): "U16", np.dtype("uint32"): "U32"}


def _mib_header(index: int, rows: int, cols: int, kind: str) -> bytes:
    fields = [
        "MQ1",
        f"{index + 1:06d}",
        "00384",
        "01",
        f"{cols:04d}",
        f"{rows:04d}",
        kind,
        "   1x1",
        "01",
        "2024-05-06 07:08:09.000000",
        "0.001000",
        "0",
        "0",
        "0",
        "1.200000E+2",
        "5.110000E+2",
        *["0.000000E+0"] * 6,
        "3RX",
        "175",
        "511",
        *["000"] * 6,
        "125",
        "255",
        *["125"] * 6,
        "3",
        "MQ1A",
        f"2024-05-06T07:08:{9 + index // 100:02d}.{index % 100:02d}0000000Z",
        "1000000ns",
        "12",
    ]
    text = (",".join(fields) + ",").encode("ascii")
    return text + b"\0" * (384 - len(text))


def write_mib(path: Path, scan: np.ndarray, *, frames_per_trigger: int | None = None) -> Path:
    """A Merlin .mib file: per frame an ASCII header of 384 bytes and big-endian pixels.

    Merlin stores pattern rows bottom-up (rosettasciio flips them back), so rows are written
    reversed here. With ``frames_per_trigger`` a .hdr beside it gives the scan's row length.
    """
    rows, cols = scan.shape[-2:]
    kind = _MIB_TYPES[scan.dtype]
    with open(path, "wb") as f:
        for i, frame in enumerate(scan.reshape(-1, rows, cols)):
            f.write(_mib_header(i, rows, cols, kind))
            f.write(
                np.ascontiguousarray(frame[::-1]).astype(scan.dtype.newbyteorder(">")).tobytes()
            )
    if frames_per_trigger is not None:
        n = int(np.prod(scan.shape[:-2]))
        Path(path).with_suffix(".hdr").write_text(
            "HDR,\t\nTime and Date Created:\t06/05/2024 07:08:09\nChip ID:\tW529_F5,-,-,-\n"
            f"Frames in Acquisition (Number):\t{n}\nFrames per Trigger "
            f"(Number):\t{frames_per_trigger}\n"
            "Counter Depth (number):\t12\nEnd\t\n"
        )
    return Path(path)


# --- NanoMegas ASTAR blockfile (.blo), written by rosettasciio --------------------------------


def write_blo(path: Path, scan: np.ndarray, *, step_nm: float, beam_energy_V: int) -> Path:
    """A .blo file written by rosettasciio's blockfile writer (uint8, square patterns)."""
    from rsciio.blockfile import file_writer

    rx, ry, q, _ = scan.shape
    axes = [
        {"name": "y", "size": rx, "scale": step_nm, "offset": 0.0, "units": "nm", "navigate": True},
        {"name": "x", "size": ry, "scale": step_nm, "offset": 0.0, "units": "nm", "navigate": True},
        {"name": "dy", "size": q, "scale": 0.01, "offset": 0.0, "units": "cm", "navigate": False},
        {"name": "dx", "size": q, "scale": 0.01, "offset": 0.0, "units": "cm", "navigate": False},
    ]
    signal = {
        "data": scan,
        "axes": axes,
        "metadata": {"General": {"title": "test"}, "Signal": {}},
        "original_metadata": {
            "blockfile_header": {"Beam_energy": beam_energy_V, "Note": "stemflow"}
        },
        "attributes": {"_lazy": False},
    }
    file_writer(str(path), signal, show_progressbar=False)
    return Path(path)


# --- EMPAD (.xml + .raw) ---------------------------------------------------------------------


def write_empad(path: Path, scan: np.ndarray, *, step_nm: float, q_per_nm: float) -> Path:
    """An EMPAD .xml and its .raw: 128x128 float32 frames, each followed by 2 footer rows.

    The scan size is in the raw file's name (``scan_x{RY}_y{RX}.raw``) as EMPAD 1.2 names it;
    the field of view is the larger scan side times the step, times EMPAD's scale factor.
    """
    rx, ry, q0, q1 = scan.shape
    assert (q0, q1) == (128, 128) and scan.dtype == np.float32
    raw = f"scan_x{ry}_y{rx}.raw"
    fov_m = step_nm * 1e-9 * max(rx, ry) * 0.72
    Path(path).write_text(
        "<root><timestamp><isoformat>2024-05-06T07:08:09</isoformat></timestamp>"
        f'<raw_file filename="{raw}"/>'
        "<iom_measurements><full_scan_field_of_view>"
        f"<x>{fov_m!r}</x><y>{fov_m!r}</y><scale_factor>0.72</scale_factor>"
        "</full_scan_field_of_view>"
        f"<calibrated_pixelsize>{q_per_nm * 1e-9!r}</calibrated_pixelsize>"
        "</iom_measurements></root>"
    )
    footer = np.full((2, 128), -1.0, np.float32)
    with open(Path(path).parent / raw, "wb") as f:
        for frame in scan.reshape(-1, 128, 128):
            f.write(frame.astype("<f4").tobytes() + footer.tobytes())
    return Path(path)


# --- Dectris ARINA (master + data files, bitshuffle-LZ4) -------------------------------------


def write_arina(
    folder: Path,
    scan: np.ndarray,
    *,
    name: str = "scan",
    frames_per_file: int = 7,
    step_nm: float | None = None,
) -> Path:
    """A Dectris master file linking data files of at most ``frames_per_file`` frames each.

    The data files hold ``/entry/data/data`` (n, QX, QY), one frame per chunk, compressed with
    bitshuffle-LZ4 as the detector writes them. With ``step_nm``, the acquisition's metadata
    file ``{name}.h5`` records the probe step (``STEM Metadata`` attribute ``Pixel Size``, nm).
    """
    import hdf5plugin

    frames = scan.reshape((-1,) + scan.shape[-2:])
    master = Path(folder) / f"{name}_master.h5"
    with h5py.File(master, "w") as m:
        data = m.create_group("entry/data")
        m["entry"].attrs["NX_class"] = "NXentry"
        det = m.create_group("entry/instrument/detector")
        det["description"] = b"Dectris ARINA"
        det["x_pixel_size"] = 1e-4
        det.create_group("detectorSpecific")["nimages"] = len(frames)
        for k, start in enumerate(range(0, len(frames), frames_per_file), start=1):
            file = f"{name}_data_{k:06d}.h5"
            with h5py.File(Path(folder) / file, "w") as d:
                d.create_dataset(
                    "entry/data/data",
                    data=frames[start : start + frames_per_file],
                    chunks=(1,) + frames.shape[1:],
                    **hdf5plugin.Bitshuffle(cname="lz4"),
                )
            data[f"data_{k:06d}"] = h5py.ExternalLink(file, "/entry/data/data")
    if step_nm is not None:
        with h5py.File(Path(folder) / f"{name}.h5", "w") as f:
            f.create_group("STEM Metadata").attrs["Pixel Size"] = np.array([step_nm])
    return master


# --- FEI TIA (.emi + .ser) ---------------------------------------------------------------------

_SER_TYPES = {
    np.dtype("uint8"): 1,
    np.dtype("uint16"): 2,
    np.dtype("uint32"): 3,
    np.dtype("int16"): 5,
    np.dtype("int32"): 6,
    np.dtype("float32"): 7,
    np.dtype("float64"): 8,
}


def write_tia(
    folder: Path,
    scan: np.ndarray,
    *,
    name: str = "scan",
    step_m: float,
    q_per_m: float,
    kV: float,
    mode: str = "STEM nP SA Zoom Diffraction",
) -> Path:
    """A TIA series ``{name}_1.ser`` (2D scan of 2D images) and its ``{name}.emi``.

    Layout after Boothroyd's description as openNCEM reads it: a header (series version
    0x0220, 8-byte offsets), one dimension per scan axis (X first, the fast one), the data
    elements (two calibrations, type, ArraySizeX, ArraySizeY, pixels with rows stored
    bottom-up), the position tags, then the data and tag offset arrays.
    """
    rx, ry, rows, cols = scan.shape
    n = rx * ry
    header = struct.pack("<HHHIIIIQI", 0x4949, 0x0197, 0x0220, 0x4122, 0x4142, n, n, 0, 2)
    dims = b""
    for size, delta in ((ry, step_m), (rx, -step_m)):
        dims += struct.pack("<Iddii", size, 0.0, delta, 0, 8) + b"Position"
        dims += struct.pack("<i", 6) + b"meters"
    element_header = struct.pack(
        "<ddiddihii",
        -cols / 2 * q_per_m,
        q_per_m,
        0,
        -rows / 2 * q_per_m,
        q_per_m,
        0,
        _SER_TYPES[scan.dtype],
        cols,
        rows,
    )
    body = bytearray(header + dims)
    data_offsets, tag_offsets = [], []
    for frame in scan.reshape(-1, rows, cols):
        data_offsets.append(len(body))
        body += (
            element_header
            + np.ascontiguousarray(frame[::-1]).astype(scan.dtype.newbyteorder("<")).tobytes()
        )
    for i in range(n):
        tag_offsets.append(len(body))
        body += struct.pack(
            "<HHIdd", 0x4142, 0, 1_700_000_000 + i, (i % ry) * step_m, -(i // ry) * step_m
        )
    offset_array = len(body)
    body += np.array(data_offsets + tag_offsets, "<u8").tobytes()
    body[22:30] = struct.pack("<Q", offset_array)
    ser = Path(folder) / f"{name}_1.ser"
    ser.write_bytes(bytes(body))
    rows_xml = "".join(
        f"<Data><Label>{label}</Label><Value>{value}</Value><Unit>{unit}</Unit></Data>"
        for label, value, unit in (
            ("High tension", kV, "kV"),
            ("Mode", mode, ""),
            ("Microscope", "Titan", ""),
        )
    )
    info = (
        "<ObjectInfo><AcquireDate>Mon May 06 07:08:09 2024</AcquireDate>"
        f"<ExperimentalDescription><Root>{rows_xml}</Root></ExperimentalDescription>"
        "<AcquireInfo><CameraNamePath>BM-Ceta</CameraNamePath></AcquireInfo></ObjectInfo>"
    )
    (Path(folder) / f"{name}.emi").write_bytes(
        b"\x01\x02EMI binary preamble\x00" + info.encode() + b"\x00" * 16
    )
    return Path(folder) / f"{name}.emi"


# --- Gatan DigitalMicrograph (.dm3, .dm4) --------------------------------------------------------

_DM_IMAGE_TYPES = {
    np.dtype("int16"): 1,
    np.dtype("float32"): 2,
    np.dtype("uint8"): 6,
    np.dtype("int32"): 7,
    np.dtype("int8"): 9,
    np.dtype("uint16"): 10,
    np.dtype("uint32"): 11,
    np.dtype("float64"): 12,
}
_DM_ELEMENT_TYPES = {
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("uint16"): 4,
    np.dtype("uint32"): 5,
    np.dtype("float32"): 6,
    np.dtype("float64"): 7,
    np.dtype("int8"): 10,
    np.dtype("uint8"): 10,
}


class _DMWriter:
    """Serialises a nested dict as a DM3/DM4 tag tree (the layout rosettasciio parses).

    Structure fields (tag ids, lengths, type codes) are big-endian; values are in the file's
    byte order. ``str`` values become arrays of uint16 characters, ``int`` long (or ulong long
    in DM4 when large), ``float`` double, ``np.ndarray`` an array of its element type.
    """

    def __init__(self, version: int, endian: str) -> None:
        self.version, self.endian = version, endian
        self.q = ">q" if version == 4 else ">l"

    def _len(self, n: int) -> bytes:
        return struct.pack(self.q, n)

    def group(self, tags: dict) -> bytes:
        out = b"\x00\x01" + self._len(len(tags))
        for name, value in tags.items():
            # DM leaves list entries unnamed; rosettasciio names them TagGroup<i> / Data<i>.
            encoded = b"" if re.fullmatch(r"(TagGroup|Data)\d+", name) else name.encode("latin-1")
            body = self.group(value) if isinstance(value, dict) else b"%%%%" + self.data(value)
            size = struct.pack(">Q", len(body)) if self.version == 4 else b""  # DM4: tag byte count
            kind = b"\x14" if isinstance(value, dict) else b"\x15"
            out += kind + struct.pack(">h", len(encoded)) + encoded + size + body
        return out

    def data(self, value: object) -> bytes:
        e = "<" if self.endian == "little" else ">"
        if isinstance(value, str):
            chars = np.frombuffer(value.encode("utf-16-le"), "<u2").astype(e + "u2")
            return (
                self._len(3)
                + self._len(20)
                + self._len(4)
                + self._len(len(chars))
                + chars.tobytes()
            )
        if isinstance(value, bool):
            return self._len(1) + self._len(8) + struct.pack(e + "B", value)
        if isinstance(value, int):
            return self._len(1) + self._len(3) + struct.pack(e + "l", value)
        if isinstance(value, float):
            return self._len(1) + self._len(7) + struct.pack(e + "d", value)
        array = np.asarray(value)
        flat = array.ravel().astype(array.dtype.newbyteorder(e))
        code = _DM_ELEMENT_TYPES[array.dtype]
        return (
            self._len(3) + self._len(20) + self._len(code) + self._len(flat.size) + flat.tobytes()
        )


def write_dm(
    path: Path,
    scan: np.ndarray,
    *,
    version: int,
    step_nm: float,
    q_scale: float,
    q_units: str = "1/nm",
    voltage_V: float,
    convergence_mrad: float | None = None,
    endian: str = "little",
    with_preview: bool = True,
) -> Path:
    """A DM3 (``version=3``) or DM4 file holding ``scan`` as a 4D (or 3D frames) image.

    DM lists dimensions fastest first (pattern columns, rows, then scan columns, rows), with
    one calibration (origin, scale, units) per dimension; ``Microscope Info.Voltage`` is in V.
    With ``with_preview`` a small 2D image (as DM keeps beside a scan) comes first in the
    ImageList, so that the reader has to pick the scan.
    """
    shape = scan.shape
    units = [q_units, q_units] + ["nm"] * (len(shape) - 2)
    scales = [q_scale, q_scale] + [step_nm] * (len(shape) - 2)
    calibrations = {
        f"TagGroup{i}": {"Origin": 0.0, "Scale": float(scales[i]), "Units": units[i]}
        for i in range(len(shape))
    }
    tags: dict = {"Microscope Info": {"Voltage": float(voltage_V), "Illumination Mode": "STEM"}}
    if convergence_mrad is not None:
        tags["EELS"] = {
            "Experimental Conditions": {"Convergence semi-angle (mrad)": float(convergence_mrad)}
        }

    def image(data: np.ndarray, image_tags: dict, name: str) -> dict:
        return {
            "ImageData": {
                "Calibrations": {
                    "Brightness": {"Origin": 0.0, "Scale": 1.0, "Units": "counts"},
                    "Dimension": calibrations
                    if data.ndim == len(shape)
                    else {
                        f"TagGroup{i}": {"Origin": 0.0, "Scale": 1.0, "Units": ""}
                        for i in range(data.ndim)
                    },
                },
                "Data": data,
                "DataType": _DM_IMAGE_TYPES[data.dtype],
                "Dimensions": {f"Data{i}": int(n) for i, n in enumerate(data.shape[::-1])},
            },
            "ImageTags": image_tags,
            "Name": name,
        }

    images = {}
    if with_preview:
        images["TagGroup0"] = image(np.arange(12, dtype=np.float32).reshape(3, 4), {}, "preview")
    images[f"TagGroup{len(images)}"] = image(scan, tags, "4D scan")
    writer = _DMWriter(version, endian)
    root = writer.group(
        {"ApplicationBounds": np.array([0, 0, 100, 100], np.int32), "ImageList": images}
    )
    size = struct.pack(">Q" if version == 4 else ">L", len(root) + 16)
    head = struct.pack(">l", version) + size + struct.pack(">l", 1 if endian == "little" else 0)
    Path(path).write_bytes(head + root + b"\0" * 8)
    return Path(path)


# --- TVIPS (NAME_000.tvips), written by rosettasciio --------------------------------------------


def write_tvips(
    path: Path, scan: np.ndarray, *, beam_energy_keV: int, max_file_size: int | None = None
) -> Path:
    """A TVIPS recording of the scan's frames, by rosettasciio's writer (diffraction mode).

    With ``max_file_size`` the recording is split into parts NAME_000, NAME_001, ...
    """
    from rsciio.tvips import file_writer

    frames = scan.reshape((-1,) + scan.shape[-2:])
    axes = [
        {
            "name": "time",
            "size": len(frames),
            "scale": 1.0,
            "offset": 0.0,
            "units": "ms",
            "navigate": True,
        },
        {
            "name": "dy",
            "size": frames.shape[1],
            "scale": 1.0,
            "offset": 0.0,
            "units": "1/nm",
            "navigate": False,
        },
        {
            "name": "dx",
            "size": frames.shape[2],
            "scale": 1.0,
            "offset": 0.0,
            "units": "1/nm",
            "navigate": False,
        },
    ]
    signal = {
        "data": frames,
        "axes": axes,
        "metadata": {
            "General": {"title": "test"},
            "Acquisition_instrument": {"TEM": {"beam_energy": beam_energy_keV}},
        },
        "original_metadata": {},
        "attributes": {"_lazy": False},
    }
    file_writer(str(path), signal, max_file_size=max_file_size, show_progressbar=False)
    return Path(path)


# --- MRC (.mrc) --------------------------------------------------------------------------------

_MRC_MODES = {
    np.dtype("uint8"): 0,
    np.dtype("int16"): 1,
    np.dtype("float32"): 2,
    np.dtype("uint16"): 6,
}


def write_mrc(path: Path, frames: np.ndarray) -> Path:
    """An MRC2014 stack of frames (NZ, NY, NX): a 1024-byte header, then the pixels."""
    nz, ny, nx = frames.shape
    header = bytearray(1024)
    struct.pack_into("<10i", header, 0, nx, ny, nz, _MRC_MODES[frames.dtype], 0, 0, 0, nx, ny, nz)
    struct.pack_into("<3f", header, 40, float(nx), float(ny), float(nz))  # 1 Å per pixel
    struct.pack_into("<3f", header, 52, 90.0, 90.0, 90.0)
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    header[208:212] = b"MAP "
    header[212:216] = b"\x44\x44\x00\x00"
    Path(path).write_bytes(bytes(header) + frames.astype(frames.dtype.newbyteorder("<")).tobytes())
    return Path(path)


def write_de_movie(folder: Path, scan: np.ndarray, *, step_nm: float) -> Path:
    """A Direct Electron 4D-STEM movie: ``YYYYMMDD_NNNNN_movie.mrc`` holding the frames and
    ``YYYYMMDD_NNNNN_info.txt`` (``key = value`` lines) with the raster scan size and step."""
    rx, ry, rows, cols = scan.shape
    movie = write_mrc(Path(folder) / "20240506_00001_movie.mrc", scan.reshape(-1, rows, cols))
    (Path(folder) / "20240506_00001_info.txt").write_text(
        "Instrument Project TEMorSTEM Mode = 1\nScan - Enable = Enable\nScan - Type = Raster\n"
        f"Scan - Size X = {ry}\nScan - Size Y = {rx}\nImage Size X (pixels) = {cols}\n"
        f"Image Size Y (pixels) = {rows}\nSpecimen Pixel Size X (nanometers) = {step_nm}\n"
        f"Specimen Pixel Size Y (nanometers) = {step_nm}\n"
    )
    return movie


# --- ThermoFisher Velox EMD (.emd) ---------------------------------------------------------------


def write_velox(
    path: Path, frames: np.ndarray, *, q_per_m: float, voltage_V: float, convergence_rad: float
) -> Path:
    """A Velox EMD file with one camera image stack (diffraction frames).

    Velox stores a stack as ``/Data/Image/<id>/Data`` of shape (QX, QY, N), one frame per
    chunk, and its metadata as JSON in a uint8 array ``Metadata`` (one column per frame).
    """
    n, rows, cols = frames.shape
    metadata = {
        "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1715000000"}},
        "BinaryResult": {
            "PixelSize": {"width": repr(q_per_m), "height": repr(q_per_m)},
            "PixelUnitX": "1/m",
            "PixelUnitY": "1/m",
            "Offset": {"x": "0", "y": "0"},
            "DetectorIndex": "0",
        },
        "Detectors": {"Detector-0": {"DetectorName": "BM-Ceta", "ExposureTime": "0.001"}},
        "Optics": {
            "AccelerationVoltage": repr(voltage_V),
            "BeamConvergence": repr(convergence_rad),
            "CameraLength": "0.115",
        },
        "Scan": {"FrameTime": "0.001"},
        "Instrument": {"InstrumentClass": "Titan"},
    }
    text = np.frombuffer(json.dumps(metadata).encode() + b"\0" * 7, np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "Version", data=np.array([json.dumps({"format": "Velox", "version": "11"}).encode()])
        )
        group = f.create_group("Data/Image/6fdbde41eecc4e1a9d4ee2a1a9f0ab5c")
        group.create_dataset("Data", data=np.moveaxis(frames, 0, -1), chunks=(rows, cols, 1))
        group.create_dataset("Metadata", data=np.repeat(text[:, None], n, axis=1))
    return Path(path)


# --- Berkeley EMD (NCEM, .emd), written by rosettasciio -------------------------------------------


def write_emd_berkeley(
    path: Path, scan: np.ndarray, *, step_nm: float, q_per_nm: float, angstrom: bool = False
) -> Path:
    """A Berkeley (NCEM) EMD 0.2 file written by rosettasciio's EMD writer; with ``angstrom``
    the same calibration is written in Å and 1/Å."""
    from rsciio.emd import file_writer

    length, step, q_units, q_step = (
        ("Å", step_nm * 10, "1/Å", q_per_nm / 10) if angstrom else ("nm", step_nm, "1/nm", q_per_nm)
    )

    axes = [
        {
            "name": "y",
            "size": scan.shape[0],
            "scale": step,
            "offset": 0.0,
            "units": length,
            "navigate": True,
        },
        {
            "name": "x",
            "size": scan.shape[1],
            "scale": step,
            "offset": 0.0,
            "units": length,
            "navigate": True,
        },
        {
            "name": "ky",
            "size": scan.shape[2],
            "scale": q_step,
            "offset": 0.0,
            "units": q_units,
            "navigate": False,
        },
        {
            "name": "kx",
            "size": scan.shape[3],
            "scale": q_step,
            "offset": 0.0,
            "units": q_units,
            "navigate": False,
        },
    ]
    signal = {
        "data": scan,
        "axes": axes,
        "metadata": {
            "General": {"title": "scan"},
            "Signal": {"signal_type": "electron_diffraction"},
        },
        "original_metadata": {},
        "attributes": {"_lazy": False},
    }
    file_writer(str(path), signal)
    return Path(path)
