"""Vendor readers: a bytes round-trip of every format with its calibration, laziness, the choice
of reader for shared extensions (.h5, .emd), and bad input (one sentence, nothing published).

Every file is written by the test (see ``tests/vendor_files.py``): with rosettasciio's own
writers where it has one (blockfile, TVIPS, Berkeley EMD) and from the formats' layouts
otherwise. Scans hold distinct values per position and per pixel, with non-square patterns
where the format allows, so that any axis swap, flip or byte-order slip fails the comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np
import pytest

from flows.cli import main
from stemlib.calibration import Calibration
from stemlib.errors import InputError
from stemlib.ingest import IngestOptions, ingest
from stemlib.io.readers import ReadOptions, open_source, supported_formats
from stemlib.io.scan_store import open_scan

from . import vendor_files as vf

SCAN = vf.make_scan((3, 4, 16, 24), "uint16")
FRAMES = SCAN.reshape(12, 16, 24)


@dataclass(frozen=True)
class Case:
    """A file the test writes, what it holds, and what the reader must say about it."""

    write: Callable[[Path], Path]
    data: np.ndarray
    reader: str
    calibration: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _tia_without_emi(tmp: Path) -> Path:
    vf.write_tia(tmp, SCAN, step_m=2e-9, q_per_m=5e8, kV=300)
    (tmp / "scan.emi").unlink()
    return tmp / "scan_1.ser"


CASES: dict[str, Case] = {
    "mib-hdr": Case(
        lambda t: vf.write_mib(t / "a.mib", SCAN, frames_per_trigger=4),
        SCAN,
        "rsciio:QuantumDetector",
    ),
    "mib-u8-scan-shape": Case(
        lambda t: vf.write_mib(t / "a.mib", vf.make_scan(dtype="uint8")),
        vf.make_scan(dtype="uint8"),
        "rsciio:QuantumDetector",
        options={"scan_shape": (3, 4)},
    ),
    "mib-u32": Case(
        lambda t: vf.write_mib(t / "a.mib", SCAN.astype("uint32") * 70000, frames_per_trigger=4),
        SCAN.astype("uint32") * 70000,
        "rsciio:QuantumDetector",
    ),
    "blo": Case(
        lambda t: vf.write_blo(
            t / "a.blo", vf.make_scan((3, 4, 16, 16), "uint8"), step_nm=1.5, beam_energy_V=200_000
        ),
        vf.make_scan((3, 4, 16, 16), "uint8"),
        "rsciio:Blockfile",
        {"probe_step_nm": 1.5, "beam_energy_keV": 200.0},
    ),
    "empad": Case(
        lambda t: vf.write_empad(
            t / "a.xml", vf.make_scan((3, 4, 128, 128), "float32"), step_nm=1.2, q_per_nm=0.05
        ),
        vf.make_scan((3, 4, 128, 128), "float32"),
        "rsciio:EMPAD",
        {"probe_step_nm": 1.2, "q_pixel_size": 0.005, "q_pixel_units": "1/A"},
    ),
    "arina": Case(
        lambda t: vf.write_arina(t, SCAN, step_nm=0.7),
        SCAN,
        "arina",
        {"probe_step_nm": 0.7},
        {"scan_shape": (3, 4)},
    ),
    "tia-emi": Case(
        lambda t: vf.write_tia(t, SCAN, step_m=2e-9, q_per_m=5e8, kV=300),
        SCAN,
        "tia",
        {
            "probe_step_nm": 2.0,
            "q_pixel_size": 0.05,
            "q_pixel_units": "1/A",
            "beam_energy_keV": 300.0,
        },
    ),
    # Without the .emi the detector's units (1/m or m) are unknown: no q scale, no energy.
    "tia-ser-alone": Case(_tia_without_emi, SCAN, "tia", {"probe_step_nm": 2.0}),
    "dm3": Case(
        lambda t: vf.write_dm(
            t / "a.dm3",
            SCAN,
            version=3,
            step_nm=0.8,
            q_scale=0.1,
            voltage_V=200e3,
            convergence_mrad=21.0,
        ),
        SCAN,
        "rsciio:DigitalMicrograph",
        {
            "probe_step_nm": 0.8,
            "q_pixel_size": 0.01,
            "q_pixel_units": "1/A",
            "beam_energy_keV": 200.0,
            "convergence_semiangle_mrad": 21.0,
        },
    ),
    "dm4-big-endian-mrad": Case(
        lambda t: vf.write_dm(
            t / "a.dm4",
            SCAN,
            version=4,
            step_nm=0.8,
            q_scale=0.5,
            q_units="mrad",
            voltage_V=300e3,
            endian="big",
        ),
        SCAN,
        "rsciio:DigitalMicrograph",
        {
            "probe_step_nm": 0.8,
            "q_pixel_size": 0.5,
            "q_pixel_units": "mrad",
            "beam_energy_keV": 300.0,
        },
    ),
    "dm4-frames": Case(
        lambda t: vf.write_dm(
            t / "a.dm4",
            FRAMES.astype("float32"),
            version=4,
            step_nm=0.8,
            q_scale=0.1,
            voltage_V=300e3,
        ),
        SCAN.astype("float32"),
        "rsciio:DigitalMicrograph",
        {"q_pixel_size": 0.01, "q_pixel_units": "1/A", "beam_energy_keV": 300.0},
        {"scan_shape": (3, 4)},
    ),
    "tvips": Case(
        lambda t: vf.write_tvips(t / "rec_000.tvips", SCAN, beam_energy_keV=200),
        SCAN,
        "tvips",
        {"beam_energy_keV": 200.0},
        {"scan_shape": (3, 4)},
    ),
    # 256-byte header + 5 records of 60 + 768 bytes per part: parts of 5, 5 and 2 frames.
    "tvips-3-parts": Case(
        lambda t: vf.write_tvips(
            t / "rec_000.tvips", SCAN, beam_energy_keV=200, max_file_size=256 + 5 * 828
        ),
        SCAN,
        "tvips",
        {"beam_energy_keV": 200.0},
        {"scan_shape": (3, 4)},
    ),
    "mrc": Case(
        lambda t: vf.write_mrc(t / "a.mrc", FRAMES),
        SCAN,
        "rsciio:MRC",
        options={"scan_shape": (3, 4)},
    ),
    "mrc-de-movie": Case(
        lambda t: vf.write_de_movie(t, SCAN, step_nm=0.6),
        SCAN,
        "rsciio:MRC",
        {"probe_step_nm": 0.6},
    ),
    "velox": Case(
        lambda t: vf.write_velox(
            t / "v.emd", FRAMES, q_per_m=2e8, voltage_V=300e3, convergence_rad=0.021
        ),
        SCAN,
        "rsciio:EMD",
        {"q_pixel_size": 0.02, "q_pixel_units": "1/A", "beam_energy_keV": 300.0},
        {"scan_shape": (3, 4)},
    ),
    "emd-berkeley": Case(
        lambda t: vf.write_emd_berkeley(t / "b.emd", SCAN, step_nm=0.9, q_per_nm=0.03),
        SCAN,
        "rsciio:EMD",
        {"probe_step_nm": 0.9, "q_pixel_size": 0.003, "q_pixel_units": "1/A"},
    ),
    # The same calibration written in Å and 1/Å (9 Å, 0.003 1/Å) reads the same.
    "emd-berkeley-angstrom": Case(
        lambda t: vf.write_emd_berkeley(
            t / "b.emd", SCAN, step_nm=0.9, q_per_nm=0.03, angstrom=True
        ),
        SCAN,
        "rsciio:EMD",
        {"probe_step_nm": 0.9, "q_pixel_size": 0.003, "q_pixel_units": "1/A"},
    ),
}


def assert_calibration(actual: Calibration, expected: dict[str, Any]) -> None:
    """Every field as expected; fields not expected must be unknown (None), never guessed."""
    for name in Calibration.model_fields:
        value = getattr(actual, name)
        if name in expected:
            assert value == pytest.approx(expected[name]), name
        else:
            assert value is None, f"{name} = {value!r} should be unknown"


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact_lazy_and_calibrated(tmp_path, name, dask_computes):
    case = CASES[name]
    path = case.write(tmp_path)
    with dask_computes as counter:
        src = open_source(str(path), options=ReadOptions(**case.options))
    assert counter.count == 0, "opening computed something"
    assert isinstance(src.data, da.Array)
    assert src.reader == case.reader
    assert src.data.chunks[2:] == (
        (case.data.shape[2],),
        (case.data.shape[3],),
    )  # whole patterns per block
    out = src.data.compute()
    assert out.dtype == case.data.dtype
    np.testing.assert_array_equal(out, case.data)
    assert_calibration(src.calibration, case.calibration)
    assert src.source == str(path)
    json.dumps(src.details)  # provenance must be storable as JSON attributes


@pytest.mark.parametrize("name", ["arina", "tia-emi", "tvips-3-parts", "mib-hdr", "velox"])
def test_blocks_follow_the_chunks_option(tmp_path, name):
    case = CASES[name]
    options = ReadOptions(**{**case.options, "chunks": (2, 3)})
    data = open_source(str(case.write(tmp_path)), options=options).data
    assert data.chunks == ((2, 1), (3, 1), (16,), (24,))
    np.testing.assert_array_equal(data[1:3, 2:4].compute(), case.data[1:3, 2:4])


def test_multi_file_recordings_are_read_in_order(tmp_path):
    (tmp_path / "tvips").mkdir()
    tvips = CASES["tvips-3-parts"].write(tmp_path / "tvips")
    details = open_source(str(tvips), options=ReadOptions(scan_shape=(3, 4))).details
    assert details["files"] == ["rec_000.tvips", "rec_001.tvips", "rec_002.tvips"]
    master = CASES["arina"].write(tmp_path)
    details = open_source(str(master), options=ReadOptions(scan_shape=(3, 4))).details
    assert details["data_files"] == ["scan_data_000001.h5", "scan_data_000002.h5"]
    assert details["filters"] == ["bitshuffle; see https://github.com/kiyo-masui/bitshuffle"]


def test_vendor_scan_ingests_with_its_calibration(tmp_path, capsys):
    vf.write_dm(tmp_path / "a.dm4", SCAN, version=4, step_nm=0.8, q_scale=0.1, voltage_V=200e3)
    assert main(["ingest", str(tmp_path / "a.dm4"), str(tmp_path / "a.zarr"), "--quiet"]) == 0
    assert "read as rsciio:DigitalMicrograph" in capsys.readouterr().out
    stored = open_scan(str(tmp_path / "a.zarr"))
    np.testing.assert_array_equal(stored.values, SCAN)
    assert (
        stored.attrs["probe_step_nm"] == pytest.approx(0.8)
        and stored.attrs["beam_energy_keV"] == 200.0
    )
    assert stored.attrs["reader_details"]["format"] == "Gatan DigitalMicrograph 4"


# --- the right reader for a shared extension -----------------------------------------------------


def test_h5_goes_to_arina_only_for_a_dectris_master_file(tmp_path):
    master = vf.write_arina(tmp_path, SCAN)
    assert open_source(str(master), options=ReadOptions(scan_shape=(3, 4))).reader == "arina"
    # One of its data files on its own is a plain HDF5 stack of frames for the core reader.
    part = open_source(
        str(tmp_path / "scan_data_000001.h5"), options=ReadOptions(scan_shape=(1, 7))
    )
    assert part.reader == "hdf5:plain"
    np.testing.assert_array_equal(part.data.compute()[0], FRAMES[:7])
    for name in ("plain.h5", "other_master.h5"):  # not a Dectris master, whatever its name
        with h5py.File(tmp_path / name, "w") as f:
            f["scan"] = SCAN
        assert open_source(str(tmp_path / name)).reader == "hdf5:plain"
    with pytest.raises(
        InputError, match=r"plain\.h5 is not a Dectris master file .*pass the NAME_master\.h5 file"
    ):
        open_source(str(tmp_path / "plain.h5"), format="arina")


def test_emd_goes_to_velox_berkeley_or_the_core_reader(tmp_path):
    import emdfile

    vf.write_velox(
        tmp_path / "velox.emd", FRAMES, q_per_m=2e8, voltage_V=300e3, convergence_rad=0.021
    )
    vf.write_emd_berkeley(tmp_path / "berkeley.emd", SCAN, step_nm=0.9, q_per_nm=0.03)
    emdfile.save(str(tmp_path / "emd1.emd"), emdfile.Array(data=SCAN, name="datacube"), mode="o")
    velox = open_source(str(tmp_path / "velox.emd"), options=ReadOptions(scan_shape=(3, 4)))
    assert velox.details["format"] == "ThermoFisher Velox EMD"
    assert open_source(str(tmp_path / "berkeley.emd")).details["format"] == "Berkeley EMD 0.2"
    emd1 = open_source(str(tmp_path / "emd1.emd"))
    assert emd1.reader == "hdf5:emd1"
    np.testing.assert_array_equal(emd1.data.compute(), SCAN)
    with pytest.raises(InputError, match=r"berkeley\.emd is not a ThermoFisher Velox EMD file"):
        open_source(str(tmp_path / "berkeley.emd"), format="velox")
    with pytest.raises(
        InputError, match=r"emd1\.emd is not a Berkeley EMD 0\.x file .*--format hdf5 reads"
    ):
        open_source(str(tmp_path / "emd1.emd"), format="emd-berkeley")


def test_berkeley_dataset_option(tmp_path):
    vf.write_emd_berkeley(tmp_path / "b.emd", SCAN, step_nm=0.9, q_per_nm=0.03)
    out = open_source(str(tmp_path / "b.emd"), options=ReadOptions(dataset="/signals/scan/data"))
    np.testing.assert_array_equal(out.data.compute(), SCAN)
    with pytest.raises(
        InputError,
        match=r"b\.emd has no dataset /nope; pass --dataset with the path of the scan's data\.",
    ):
        open_source(str(tmp_path / "b.emd"), options=ReadOptions(dataset="/nope"))


def test_every_vendor_format_is_listed():
    listing = supported_formats()
    for name in (
        "mib",
        "blo",
        "empad",
        "arina",
        "tia",
        "dm",
        "tvips",
        "mrc",
        "velox",
        "emd-berkeley",
    ):
        assert re.search(rf"^  {re.escape(name)} ", listing, flags=re.MULTILINE), name


# --- bad input: one sentence naming the file and the fix, nothing published ----------------------


def _cut(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _tia_cut(t: Path) -> Path:
    vf.write_tia(t, SCAN, step_m=2e-9, q_per_m=5e8, kV=300)
    return _cut(t / "scan_1.ser", 5000)


def _tvips_renamed(t: Path) -> Path:
    vf.write_tvips(t / "rec_000.tvips", SCAN, beam_energy_keV=200)
    return Path(shutil.copy(t / "rec_000.tvips", t / "scan.tvips"))


def _arina_missing_part(t: Path) -> Path:
    master = vf.write_arina(t, SCAN)
    (t / "scan_data_000002.h5").unlink()
    return master


def _arina_cut_part(t: Path) -> Path:
    master = vf.write_arina(t, SCAN)
    _cut(t / "scan_data_000002.h5", 3000)
    return master


def _empad_missing_raw(t: Path) -> Path:
    xml = vf.write_empad(
        t / "a.xml", vf.make_scan((3, 4, 128, 128), "float32"), step_nm=1.2, q_per_nm=0.05
    )
    (t / "scan_x4_y3.raw").unlink()
    return xml


def _empad_cut_raw(t: Path) -> Path:
    xml = vf.write_empad(
        t / "a.xml", vf.make_scan((3, 4, 128, 128), "float32"), step_nm=1.2, q_per_nm=0.05
    )
    _cut(t / "scan_x4_y3.raw", 100_000)
    return xml


def _emi_alone(t: Path) -> Path:
    emi = vf.write_tia(t, SCAN, step_m=2e-9, q_per_m=5e8, kV=300)
    (t / "scan_1.ser").unlink()
    return emi


def _mib_short_of_hdr(t: Path) -> Path:
    path = vf.write_mib(t / "cut.mib", SCAN, frames_per_trigger=4)
    return _cut(path, 10 * 1152)  # 10 whole frames of 384 + 768 bytes


BAD = {
    "text-as-mib": (
        lambda t: _file(t / "fake.mib", b"hello, this is not a detector file"),
        {},
        r"fake\.mib is not a Quantum Detectors Merlin \.mib file \(its first frame header does "
        r"not start with MQ1\); check the file, or pass --format with its real format\.",
    ),
    "random-bytes-as-dm4": (
        lambda t: _file(t / "fake.dm4", np.random.default_rng(0).bytes(4096)),
        {},
        r"fake\.dm4 is not a Gatan DigitalMicrograph file \(its header is not DM3 or DM4\); "
        r"check the file, or pass --format with its real format\.",
    ),
    "text-as-emd": (
        lambda t: _file(t / "fake.emd", b"not HDF5"),
        {},
        r"fake\.emd is not a valid velox, emd-berkeley, hdf5 file \(its contents do not match "
        r"its extension\); check the file, or pass --format with its real format\.",
    ),
    "mib-cut-mid-frame": (
        lambda t: _cut(vf.write_mib(t / "cut.mib", SCAN), 12 * 1152 - 100),
        {},
        r"cut\.mib is truncated: it has 13724 bytes but its last frame \(12\) needs 13824; "
        r"check that the file was copied completely\.",
    ),
    "mib-shorter-than-its-hdr": (
        _mib_short_of_hdr,
        {},
        r"cut\.mib is truncated: it holds 10 frames but its \.hdr announces 12; check that the "
        r"file was copied completely\.",
    ),
    "mib-frames-without-scan-shape": (
        lambda t: vf.write_mib(t / "a.mib", SCAN),
        {},
        r"a\.mib has shape \(12, 16, 24\) \(12 frames\); expected 4 dims \(rx, ry, qx, qy\): "
        r"pass --scan-shape RX,RY\.",
    ),
    "mib-scan-shape-does-not-fit": (
        lambda t: vf.write_mib(t / "a.mib", SCAN),
        {"scan_shape": (5, 3)},
        r"a\.mib holds 12 frames of 16x24, which --scan-shape 5,3 \(15 positions\) does not "
        r"fit: pass a scan shape whose product is 12\.",
    ),
    "blo-cut-short": (
        lambda t: _cut(
            vf.write_blo(
                t / "cut.blo",
                vf.make_scan((3, 4, 16, 16), "uint8"),
                step_nm=1.5,
                beam_energy_V=200_000,
            ),
            4500,
        ),
        {},
        r"cut\.blo is truncated: it has 4500 bytes but its header's 3x4 scan of 16x16 patterns "
        r"needs 7264; check that the file was copied completely\.",
    ),
    "empad-raw-missing": (
        _empad_missing_raw,
        {},
        r"a\.xml refers to the raw data file scan_x4_y3\.raw, which is missing; keep "
        r"scan_x4_y3\.raw beside the \.xml\.",
    ),
    "empad-raw-cut": (
        _empad_cut_raw,
        {},
        r"scan_x4_y3\.raw is truncated: it has 100000 bytes but the 12 frames that a\.xml "
        r"describes need 798720; check that the file was copied completely\.",
    ),
    "xml-not-empad": (
        lambda t: _file(t / "notes.xml", b"<notes><a>1</a></notes>"),
        {},
        r"notes\.xml is not a readable EMPAD \.xml file \(.+\); check that it is complete and "
        r"really a EMPAD \.xml file, or pass --format with its real format\.",
    ),
    "arina-data-file-missing": (
        _arina_missing_part,
        {"scan_shape": (3, 4)},
        r"scan_master\.h5 links the data file scan_data_000002\.h5, which is missing; keep the "
        r"data files beside the master file\.",
    ),
    "arina-data-file-cut": (
        _arina_cut_part,
        {"scan_shape": (3, 4)},
        r"scan_master\.h5: its data file scan_data_000002\.h5 is not readable \(.+\); check "
        r"that it was copied completely\.",
    ),
    "tia-ser-cut": (
        _tia_cut,
        {},
        r"scan_1\.ser is truncated: it has 5000 bytes but its table of frame offsets needs \d+; "
        r"check that the file was copied completely\.",
    ),
    "tia-emi-without-ser": (
        _emi_alone,
        {},
        r"scan\.emi has no series file scan_1\.ser beside it; keep the \.ser files beside the "
        r"\.emi, or pass the \.ser\.",
    ),
    "dm-cut": (
        lambda t: _cut(
            vf.write_dm(t / "cut.dm4", SCAN, version=4, step_nm=1, q_scale=1, voltage_V=1), 2000
        ),
        {},
        r"cut\.dm4 is not a readable Gatan DM file \(.+\); check that it is complete and really "
        r"a Gatan DM file, or pass --format with its real format\.",
    ),
    "dm-image-not-scan": (
        lambda t: vf.write_dm(
            t / "image.dm3",
            SCAN[0, 0],
            version=3,
            step_nm=1,
            q_scale=1,
            voltage_V=1,
            with_preview=False,
        ),
        {},
        r"image\.dm3 holds no scan or stack of diffraction patterns \(it holds 4D scan \(16, "
        r"24\)\); pass the file that holds the 4D-STEM scan\.",
    ),
    "tvips-not-first-part": (
        _tvips_renamed,
        {"scan_shape": (3, 4)},
        r"scan\.tvips: TVIPS recordings are read from their first part, named NAME_000\.tvips; "
        r"pass that file\.",
    ),
    "tvips-cut": (
        lambda t: _cut(vf.write_tvips(t / "rec_000.tvips", SCAN, beam_energy_keV=200), 5000),
        {"scan_shape": (3, 4)},
        r"rec_000\.tvips is truncated: it has 5000 bytes but its last frame \(6\) needs 5224; "
        r"check that the file was copied completely\.",
    ),
    "mrc-cut": (
        lambda t: _cut(vf.write_mrc(t / "cut.mrc", FRAMES), 5000),
        {"scan_shape": (3, 4)},
        r"cut\.mrc is truncated: it has 5000 bytes but its 12 frames of 16x24 needs 10240; "
        r"check that the file was copied completely\.",
    ),
    "velox-frames-without-scan-shape": (
        lambda t: vf.write_velox(
            t / "v.emd", FRAMES, q_per_m=2e8, voltage_V=3e5, convergence_rad=0.02
        ),
        {},
        r"v\.emd has shape \(12, 16, 24\) \(12 frames\); expected 4 dims \(rx, ry, qx, qy\): "
        r"pass --scan-shape RX,RY\.",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_sentence_and_publishes_nothing(tmp_path, name):
    build, options, message = BAD[name]
    source = str(build(tmp_path))
    with pytest.raises(InputError, match=message):
        open_source(source, options=ReadOptions(**options))
    with pytest.raises(InputError, match=message):
        ingest(source, str(tmp_path / "out.zarr"), IngestOptions(**options))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".zarr") or ".partial-" in p]


def test_cli_reports_a_bad_vendor_file_without_traceback(tmp_path, capsys):
    vf.write_mib(tmp_path / "cut.mib", SCAN)
    _cut(tmp_path / "cut.mib", 5000)
    assert main(["ingest", str(tmp_path / "cut.mib"), str(tmp_path / "out.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "cut.mib is truncated" in err
        and "Traceback" not in err
        and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out.zarr").exists()


def test_a_vendor_file_on_another_filesystem_is_read_from_a_local_copy(tmp_path, monkeypatch):
    """Any fsspec filesystem, not only S3 (tests/test_vendor_s3.py): here fsspec's memory://."""
    import tempfile

    import fsspec

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fs = fsspec.filesystem("memory")
    vf.write_mib(tmp_path / "a.mib", SCAN, frames_per_trigger=4)
    fs.pipe("/stemflow-test/a.mib", (tmp_path / "a.mib").read_bytes())
    fs.pipe("/stemflow-test/a.hdr", (tmp_path / "a.hdr").read_bytes())
    before = set(os.listdir(tmp_path))
    with open_source("memory://stemflow-test/a.mib") as scan:
        np.testing.assert_array_equal(scan.data.compute(), SCAN)  # scan shape from the .hdr
        assert scan.source == "memory://stemflow-test/a.mib"
    assert set(os.listdir(tmp_path)) == before  # the copy is gone
