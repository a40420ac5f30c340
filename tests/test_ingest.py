"""Ingest: store layout, provenance, atomic publication, skip/overwrite, bad input, memory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from flows.cli import main
from stemlib.calibration import Calibration
from stemlib.errors import InputError
from stemlib.ingest import IngestOptions, ingest, source_key
from stemlib.io.scan_store import (
    HASH_SCHEME,
    SCAN_VARIABLE,
    StoreLayout,
    choose_layout,
    open_scan,
    write_scan,
)
from stemlib.io.storage import locate
from stemlib.provenance import fingerprint

from . import vendor_files as vf
from .conftest import temporary_writer
from .test_readers_vendor import CASES, SCAN


def scan(shape=(6, 5, 16, 12), dtype="uint16", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3000, shape).astype(dtype)


def leftovers(folder) -> list[str]:
    """Anything a failed run could leave behind: the destination or a temporary sibling."""
    return sorted(p for p in os.listdir(folder) if p.endswith(".zarr") or ".partial-" in p)


def test_store_opens_in_xarray_with_units_and_provenance(tmp_path):
    data = scan()
    np.save(tmp_path / "s.npy", data)
    options = IngestOptions(
        calibration=Calibration(
            probe_step_nm=0.5, q_pixel_size=0.02, q_pixel_units="1/A", origin_px=(8, 6)
        )
    )
    result = ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), options)
    assert result.status == "written"
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds["data"].dims == ("rx", "ry", "qx", "qy")
    np.testing.assert_array_equal(ds["data"].values, data)
    assert ds["rx"].attrs["units"] == "nm" and ds["rx"].values[1] == pytest.approx(0.5)
    assert ds["qx"].attrs["units"] == "1/A"
    assert ds["qx"].values[8] == 0.0 and ds["qy"].values[6] == 0.0  # zero at the direct beam
    assert ds.attrs["probe_step_nm"] == 0.5 and ds.attrs["origin_px"] == [8.0, 6.0]
    assert ds.attrs["source"].endswith("s.npy") and ds.attrs["reader"] == "npy"
    assert ds.attrs["source_bytes"] == os.path.getsize(tmp_path / "s.npy")
    assert "zarr" in ds.attrs["software"] and "numpy" in ds.attrs["software"]
    # The content hash is the documented scheme, recomputed here independently.
    digests = b"".join(
        hashlib.sha256(p.astype("<u2").tobytes()).digest() for p in data.reshape(-1, 16, 12)
    )
    assert ds.attrs["content_sha256"] == hashlib.sha256(digests).hexdigest()
    assert ds.attrs["content_hash_scheme"] == HASH_SCHEME
    encoding = ds["data"].encoding
    assert encoding["compressors"][0].cname.value == "lz4"
    assert encoding["compressors"][0].shuffle.value == "bitshuffle"


@pytest.mark.parametrize("dtype", [">u2", ">f4"])
def test_a_big_endian_scan_is_stored_with_the_same_values_and_hash(tmp_path, capsys, dtype):
    """A big-endian .npy (or raw --dtype '>u2') failed every ingest with a traceback ("verification
    of s.zarr failed: wrote ... uint16"): Zarr reads the store back in native order. It is
    stored in native order now, the same values and content hash as the little-endian file."""
    counts = scan()
    np.save(tmp_path / "big.npy", counts.astype(dtype))
    np.save(tmp_path / "little.npy", counts.astype(dtype.replace(">", "<")))
    for name in ("big", "little"):
        assert main(["ingest", str(tmp_path / f"{name}.npy"), str(tmp_path / f"{name}.zarr")]) == 0
    big, little = (xr.open_zarr(tmp_path / f"{n}.zarr") for n in ("big", "little"))
    assert big["data"].dtype == little["data"].dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(big["data"].values, counts)
    assert big.attrs["content_sha256"] == little.attrs["content_sha256"]
    assert "Traceback" not in capsys.readouterr().err


def test_uncalibrated_axes_are_pixels(tmp_path):
    np.save(tmp_path / "s.npy", scan())
    ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"))
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert {ds[d].attrs["units"] for d in ("rx", "ry", "qx", "qy")} == {"px"}
    for unknown in ("probe_step_nm", "q_pixel_size", "beam_energy_keV", "origin_px"):
        assert unknown not in ds.attrs


def test_pattern_axes_are_zero_at_the_beam_when_only_its_position_is_known(tmp_path):
    """CONVENTIONS.md: qx, qy zero at the direct beam, in px without a q pixel size (simulated
    scans, `--origin` alone); they were pixel indices from 0 before."""
    np.save(tmp_path / "s.npy", scan())
    assert (
        main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--origin", "8,6"]) == 0
    )
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds["qx"].attrs["units"] == ds["qy"].attrs["units"] == "px"
    assert ds["qx"].values[8] == 0.0 and ds["qy"].values[6] == 0.0
    assert ds["qx"].values[0] == -8.0 and ds["qy"].values[-1] == ds.sizes["qy"] - 7.0


def test_the_scan_to_detector_rotation_and_flip_are_stored_from_the_command_line(tmp_path):
    """`--qr-rotation-deg` and `--qr-flip` (py4DSTEM's QR_rotation_degrees and QR_flip): the
    calibration that gives strain results their scan-frame fields."""
    np.save(tmp_path / "s.npy", scan())
    source = str(tmp_path / "s.npy")
    assert (
        main(["ingest", source, str(tmp_path / "s.zarr"), "--qr-rotation-deg=-12.5", "--qr-flip"])
        == 0
    )
    attrs = xr.open_zarr(tmp_path / "s.zarr").attrs
    assert (attrs["qr_rotation_deg"], attrs["qr_flip"]) == (-12.5, True)
    assert main(["ingest", source, str(tmp_path / "t.zarr"), "--qr-rotation-deg", "3"]) == 0
    assert "qr_flip" not in xr.open_zarr(tmp_path / "t.zarr").attrs  # unknown, not False


def test_content_hash_does_not_depend_on_chunking(tmp_path):
    from stemlib.io.readers import open_source
    from stemlib.io.scan_store import StoreLayout, write_scan

    data = scan()
    np.save(tmp_path / "s.npy", data)
    a = write_scan(
        open_source(str(tmp_path / "s.npy")).data,
        str(tmp_path / "a.zarr"),
        calibration=Calibration(),
    )
    b = write_scan(
        open_source(str(tmp_path / "s.npy")).data,
        str(tmp_path / "b.zarr"),
        calibration=Calibration(),
        layout=StoreLayout(chunks=(2, 5, 16, 12), shards=(4, 5, 16, 12)),
    )
    assert a.content_sha256 == b.content_sha256
    assert b.shards == (4, 5, 16, 12)
    np.testing.assert_array_equal(open_scan(str(tmp_path / "b.zarr")).values, data)


def test_layout_shards_large_scans():
    small = choose_layout((64, 64, 128, 128), "uint16")
    assert small.shards is None and small.chunks == (16, 64, 128, 128)  # 32 MB chunks of whole rows
    big = choose_layout((256, 256, 256, 256), "uint16")
    assert big.shards == (1, 256, 256, 256)  # 32 MB shards (one scan row) of 4 MB chunks
    assert np.prod(big.chunks) * 2 == 4 * 2**20


def test_rerun_skips_and_changed_source_is_refused(tmp_path, capsys):
    np.save(tmp_path / "s.npy", scan())
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--quiet"]) == 0
    before = os.stat(tmp_path / "s.zarr" / "zarr.json").st_mtime_ns
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--quiet"]) == 0
    assert "already holds this scan (same source and options): skipped" in capsys.readouterr().out
    assert os.stat(tmp_path / "s.zarr" / "zarr.json").st_mtime_ns == before
    np.save(tmp_path / "s.npy", scan(seed=1))  # a different scan under the same name
    assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "s.zarr already holds a different scan" in err and "pass --overwrite" in err
    assert (
        main(
            ["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--quiet", "--overwrite"]
        )
        == 0
    )
    np.testing.assert_array_equal(open_scan(str(tmp_path / "s.zarr")).values, scan(seed=1))


def test_an_unfinished_store_of_the_same_source_is_written_again(tmp_path, capsys):
    """A store of this very source that is not marked complete (a partial copy of one) was
    refused as "a different scan", with advice to --overwrite; it is rewritten."""
    source, dest = tmp_path / "s.npy", tmp_path / "s.zarr"
    np.save(source, scan())
    assert main(["ingest", str(source), str(dest), "--quiet"]) == 0
    meta = json.loads((dest / "zarr.json").read_text())
    del meta["attributes"]["complete"]
    (dest / "zarr.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["ingest", str(source), str(dest)]) == 0
    out, err = capsys.readouterr()
    assert "skipped" not in out and err == ""
    assert json.loads((dest / "zarr.json").read_text())["attributes"]["complete"] is True
    np.testing.assert_array_equal(open_scan(str(dest)).values, scan())


def test_another_file_with_the_same_stamp_is_a_changed_source(tmp_path, capsys):
    """A different file copied over the source with its time kept (`cp -p`, an rsync of another
    day's scan): the stamp alone would say "the same source" and skip it; its size says no."""
    source, dest = tmp_path / "s.npy", str(tmp_path / "s.zarr")
    np.save(source, scan())
    stamp = os.stat(source).st_mtime_ns
    assert main(["ingest", str(source), dest, "--quiet"]) == 0
    np.save(source, scan()[:, :4])  # another scan, fewer positions: a smaller file
    os.utime(source, ns=(stamp, stamp))
    capsys.readouterr()
    assert main(["ingest", str(source), dest, "--quiet"]) == 2
    assert "s.zarr already holds a different scan" in capsys.readouterr().err


def restamp(path, seconds: float = 10) -> None:
    """Move the modification time of ``path`` by ``seconds``, as a later copy of it would."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + int(seconds * 1e9)))


def test_an_edited_hdr_is_a_changed_source_not_a_finished_store(tmp_path, capsys):
    """A corrected .hdr beside a .mib did not change the source key: the rerun said 'skipped'
    and kept the store read with the old header (here: the old scan shape)."""
    vf.write_mib(tmp_path / "a.mib", SCAN, frames_per_trigger=4)
    command = ["ingest", str(tmp_path / "a.mib"), str(tmp_path / "a.zarr"), "--quiet"]
    assert main(command) == 0 and open_scan(str(tmp_path / "a.zarr")).shape == (3, 4, 16, 24)
    capsys.readouterr()
    assert main(command) == 0
    assert "already holds this scan (same source and options): skipped" in capsys.readouterr().out

    hdr = tmp_path / "a.hdr"  # 3 frames per scan row instead of 4: same size, other bytes
    hdr.write_text(hdr.read_text().replace("(Number):\t4\n", "(Number):\t3\n"))
    restamp(hdr)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "a.zarr already holds a different scan" in err and "pass --overwrite" in err
    assert main([*command, "--overwrite"]) == 0
    stored = open_scan(str(tmp_path / "a.zarr"))
    np.testing.assert_array_equal(stored.values, SCAN.reshape(4, 3, 16, 24))
    assert stored.attrs["companion_files"] == {"a.hdr": hdr.stat().st_size}
    capsys.readouterr()
    assert main(command) == 0 and "skipped" in capsys.readouterr().out


# One companion file of each format whose reader uses some: the one the test changes.
COMPANION = {
    "mib-hdr": "a.hdr",
    "empad": "scan_x4_y3.raw",
    "arina": "scan_data_000002.h5",
    "tia-emi": "scan_1.ser",
    "tvips-3-parts": "rec_001.tvips",
    "mrc-de-movie": "20240506_00001_info.txt",
}


@pytest.mark.parametrize("name", list(COMPANION))
def test_the_source_key_follows_each_companion_file(tmp_path, name):
    case = CASES[name]
    (tmp_path / "raw").mkdir()
    path = case.write(tmp_path / "raw")
    companion = tmp_path / "raw" / COMPANION[name]
    shutil.copy2(companion, tmp_path / "kept")
    options = IngestOptions(**case.options)

    def key() -> str:
        return source_key(locate(str(path)), options)

    first = key()
    (tmp_path / "raw" / "notes.txt").write_text("not a companion file")
    assert key() == first
    restamp(companion)
    restamped = key()
    companion.write_bytes(companion.read_bytes() + b"\0")
    resized = key()
    companion.unlink()
    removed = key()
    assert len({first, restamped, resized, removed}) == 4
    shutil.copy2(tmp_path / "kept", companion)  # the same file back: the same key
    assert key() == first


def key_before_companion_files(path, options: IngestOptions) -> str:
    """The source key that stemflow gave a local file before companion files counted."""
    return fingerprint(
        {
            "source": str(path),
            "size": os.path.getsize(path),
            "stamp": str(os.path.getmtime(path)),
            "options": options.identity(),
            "store_version": 1,
        }
    )


def test_a_source_without_companion_files_keeps_its_key(tmp_path):
    """Finished stores of such sources stay finished: their key is the one they record."""
    np.save(tmp_path / "s.npy", scan())
    vf.write_mib(tmp_path / "a.mib", SCAN)  # no .hdr
    options = IngestOptions(scan_shape=(3, 4))
    for path in (tmp_path / "s.npy", tmp_path / "a.mib"):
        assert source_key(locate(str(path)), options) == key_before_companion_files(path, options)


def test_a_store_keyed_before_companion_files_counted_is_rewritten(tmp_path):
    """Its key cannot tell whether the companion files changed since: the rerun ingests the
    scan again (without --overwrite, as it is the same source file) rather than refusing it."""
    vf.write_mib(tmp_path / "a.mib", SCAN, frames_per_trigger=4)
    source, dest = str(tmp_path / "a.mib"), str(tmp_path / "a.zarr")
    assert ingest(source, dest).status == "written"
    metadata = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    del metadata["attributes"]["companion_files"]  # as an older stemflow wrote the store
    metadata["attributes"]["source_key"] = key_before_companion_files(source, IngestOptions())
    (tmp_path / "a.zarr" / "zarr.json").write_text(json.dumps(metadata))
    assert ingest(source, dest).status == "written"
    assert ingest(source, dest).status == "skipped"


def test_a_reexported_empad_raw_is_a_changed_source(tmp_path):
    """EMPAD's companion is the .raw its .xml names: the key reads the name from the .xml."""
    frames = vf.make_scan((3, 4, 128, 128), "float32")
    vf.write_empad(tmp_path / "e.xml", frames, step_nm=1.2, q_per_nm=0.05)
    source, dest = str(tmp_path / "e.xml"), str(tmp_path / "e.zarr")
    assert ingest(source, dest).status == "written"
    shutil.copy2(tmp_path / "e.xml", tmp_path / "kept.xml")
    vf.write_empad(tmp_path / "e.xml", frames[::-1].copy(), step_nm=1.2, q_per_nm=0.05)
    shutil.copy2(tmp_path / "kept.xml", tmp_path / "e.xml")  # the same .xml, a new .raw
    with pytest.raises(InputError, match=r"e\.zarr already holds a different scan .*--overwrite"):
        ingest(source, dest)
    assert ingest(source, dest, IngestOptions(overwrite=True)).status == "written"
    np.testing.assert_array_equal(open_scan(dest).values, frames[::-1])


def test_destination_holding_something_else(tmp_path, capsys):
    np.save(tmp_path / "s.npy", scan())
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("precious")
    code = main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "results"), "--overwrite"])
    assert code == 2
    assert (
        "results already exists and is not a stemflow scan store; choose another destination"
        in capsys.readouterr().err
    )
    assert (tmp_path / "results" / "notes.txt").read_text() == "precious"


def test_a_destination_that_cannot_be_written_is_named_as_given(tmp_path, capsys):
    """A destination inside a file: the sentence named the hidden temporary store
    (``.s.zarr.partial-<table>-<pid>-<random>``), not the path the user typed."""
    np.save(tmp_path / "s.npy", scan())
    (tmp_path / "notes.txt").write_text("precious")
    dest = tmp_path / "notes.txt" / "s.zarr"
    assert main(["ingest", str(tmp_path / "s.npy"), str(dest), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"stemflow ingest: error: {dest}: Not a directory; check the path and that you can "
        "write there.\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "s.npy"]  # nothing half-written


def test_a_full_disk_is_one_sentence_naming_the_destination(tmp_path, capsys, monkeypatch):
    """The disk fills up while the patterns are written, after the store's metadata: Zarr's
    ``OSError`` names no file, and was a traceback ending "[Errno 28] No space left on
    device"; nothing is left."""
    from zarr.storage import LocalStore

    np.save(tmp_path / "s.npy", scan())
    real_set, written = LocalStore.set, []

    async def full_at_the_patterns(store, key, value):
        if key.startswith(f"{SCAN_VARIABLE}/c/"):  # no write of it is under way: none starts
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(key)
        await real_set(store, key, value)

    monkeypatch.setattr(LocalStore, "set", full_at_the_patterns)
    dest = tmp_path / "s.zarr"
    assert main(["ingest", str(tmp_path / "s.npy"), str(dest), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"stemflow ingest: error: {dest}: its disk is full; free space on it, or write to "
        "another disk.\n"
    )
    assert "zarr.json" in written and sorted(os.listdir(tmp_path)) == ["s.npy"]


def test_a_failed_write_leaves_no_folder_it_created(tmp_path):
    """A store refused while it was written (NaN patterns) took the folders it had created
    with it, but left them: an empty ``new/deeper/`` after a failed run."""
    data = scan(dtype="float32")
    data[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    (tmp_path / "kept").mkdir()
    for dest in (tmp_path / "new" / "deeper" / "s.zarr", tmp_path / "kept" / "s.zarr"):
        with pytest.raises(InputError, match="NaN/Inf pixels"):
            ingest(str(tmp_path / "nan.npy"), str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "nan.npy"]  # kept: not ours
    assert list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize("allow", [False, True])
def test_nonfinite_float_data(tmp_path, allow):
    data = scan(dtype="float32")
    data[1, 2, 3, 4] = np.nan
    data[4, 0, 0, 0] = np.inf
    np.save(tmp_path / "s.npy", data)
    options = IngestOptions(allow_nonfinite=allow)
    if not allow:
        with pytest.raises(
            InputError,
            match=(
                r"s\.npy holds 2 NaN/Inf pixels in 2 patterns; clean the data, "
                r"or pass --allow-nonfinite"
            ),
        ):
            ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), options)
        assert leftovers(tmp_path) == []
    else:
        ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), options)
        ds = xr.open_zarr(tmp_path / "s.zarr")
        assert ds.attrs["nonfinite_pixels"] == 2
        np.testing.assert_array_equal(ds["data"].values, data)


BAD_INPUTS = [
    ("missing.npy", None, [], r"missing\.npy does not exist; check the path\."),
    ("scan.xyz", b"12345", [], r"unknown format \.xyz; pass --format with one of: "),
    ("fake.npy", b"not numpy", [], r"fake\.npy is not a NumPy \.npy file"),
    ("fake.h5", b"\x00" * 64, [], r"fake\.h5 is not a valid hdf5 file"),
    ("frames.npy", (12, 16, 12), [], r"pass --scan-shape RX,RY"),
    (
        "frames.npy",
        (12, 16, 12),
        ["--scan-shape", "5,3"],
        r"does not fit: pass a scan shape whose product is 12",
    ),
    ("five.npy", (2, 2, 3, 16, 12), [], r"with 5 dims; expected 4 dims"),
    ("empty.npy", (0, 3, 16, 12), [], r"holds an empty scan"),
    ("cut.npy", "truncated", [], r"cut\.npy is truncated"),
    ("scans", "folder", [], r"scans is a folder; pass the scan file inside it\."),
]


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    BAD_INPUTS,
    ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)],
)
def test_bad_input_is_one_sentence_and_publishes_nothing(
    tmp_path, capsys, name, content, extra, message
):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, tuple):
        np.save(path, np.zeros(content, np.uint16))
    elif content == "truncated":
        np.save(path, scan())
        path.write_bytes(path.read_bytes()[:-50])
    elif content == "folder":
        path.mkdir()
    code = main(["ingest", str(path), str(tmp_path / "out.zarr"), "--quiet", *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("stemflow ingest: error: ")
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err), captured.err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        (np.zeros((2, 2, 8, 8), np.complex64), [], "s.npy holds complex64 values, not counts; "),
        (np.zeros((2, 2, 8, 8), bool), [], "s.npy holds bool values, not counts; save its"),
        (
            np.zeros((2, 2, 8, 8), np.uint16),
            ["--origin", "500,3"],
            "the direct beam (origin) (500.0, 3.0) px lies outside the 8 x 8 px patterns",
        ),
        (
            np.zeros((2, 2, 8, 8), np.uint16),
            ["--origin", "nan,3"],
            "error: --origin: Input should be a finite number; correct it and run again.",
        ),
        (
            np.zeros((2, 2, 8, 8), np.uint16),
            ["--qr-rotation-deg", "inf"],
            "error: --qr-rotation-deg: Input should be a finite number; correct it",
        ),
        (
            np.zeros((2, 2, 8, 8), np.uint16),
            ["--beam-energy-kev", "-300"],
            "error: --beam-energy-kev: Input should be greater than 0; correct it",
        ),
    ],
)
def test_values_that_are_not_a_scan_or_its_calibration(tmp_path, capsys, data, extra, message):
    np.save(tmp_path / "s.npy", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complex scan's cast warned before the sentence
        assert main(["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemflow ingest: error: ") and message in err
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["s.npy"]


def test_the_format_is_one_of_the_readers():
    """A fixed choice: the Prefect form shows a dropdown, a misspelt name fails before a run."""
    assert IngestOptions(format="mib").format == "mib"
    with pytest.raises(ValueError, match=r"Input should be 'auto', 'mib', .*'raw' or 'hdf5'"):
        IngestOptions(format="mbi")


@pytest.mark.parametrize("damage", ["cut short", "changed"])
def test_a_damaged_chunk_is_one_sentence_never_wrong_counts(tmp_path, capsys, damage):
    np.save(tmp_path / "s.npy", scan())
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(tmp_path / "s.npy"), str(store), "--quiet"]) == 0
    (chunk,) = (p for p in (store / "data" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    if damage == "cut short":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # one flipped byte: blosc alone would decode it silently
    chunk.write_bytes(bytes(raw))
    with pytest.raises(InputError) as error:
        open_scan(str(store)).load()
    assert str(error.value) == (
        f"{store}: the patterns at rx 0:6, ry 0:5 cannot be read back (a chunk file was cut "
        "short or changed); ingest the raw scan again."
    )
    capsys.readouterr()
    assert main(["noise", str(store), str(tmp_path / "n.zarr"), "--background", "0.5"]) == 2
    assert capsys.readouterr().err == f"stemflow noise: error: {error.value}\n"
    assert sorted(os.listdir(tmp_path)) == ["s.npy", "s.zarr"]  # no n.zarr, nor its temporary


def three_blocks(store, *, sharded: bool) -> np.ndarray:
    """Write ``scan()`` to ``store`` in three blocks of two scan rows (chunks, or shards of two
    one-row chunks), the middle one all zeros (zarr's fill value); return the data."""
    data = scan()
    data[2:4] = 0
    layout = (
        StoreLayout(chunks=(1, 5, 16, 12), shards=(2, 5, 16, 12))
        if sharded
        else StoreLayout(chunks=(2, 5, 16, 12), shards=None)
    )
    write_scan(da.from_array(data), str(store), calibration=Calibration(), layout=layout)
    return data


def lost_block(store, key: str, total: int) -> str:
    """The sentence that names the block ``key`` missing of ``total`` in ``store``."""
    return (
        f"{store} lacks 1 of the {total} blocks that hold its patterns (first missing: {key}), "
        "which would read as zeros"
    )


def block_keys(store) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in store.glob("data/c/**/*") if p.is_file())


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
def test_a_store_that_lost_a_block_is_one_sentence_never_zeros(tmp_path, sharded):
    """Zarr reads a chunk or shard object that is missing as zeros: a finished store that an
    interrupted copy (aws s3 sync, rsync) or a deleted object left without one gave strain maps
    of those zeros, with nothing said. Every block is stored, also one of zeros only, so that a
    missing one is told apart from a block of zeros."""
    store = tmp_path / "s.zarr"
    data = three_blocks(store, sharded=sharded)
    assert block_keys(store) == ["data/c/0/0/0/0", "data/c/1/0/0/0", "data/c/2/0/0/0"]
    assert xr.open_zarr(store).attrs["data_blocks"] == 3
    np.testing.assert_array_equal(open_scan(str(store)).values, data)
    (store / "data/c/2/0/0/0").unlink()
    with pytest.raises(InputError) as error:
        open_scan(str(store))
    assert str(error.value) == (
        f"{lost_block(store, 'data/c/2/0/0/0', 3)}; copy the store again from its source, or "
        "rerun the command that wrote it (stemflow ingest, simulate or noise) to write it again."
    )


def test_a_store_written_before_blocks_were_counted_opens_unchecked(tmp_path):
    """Earlier writers stored no block of zeros only and recorded no count: their stores open
    as before."""
    store = tmp_path / "s.zarr"
    data = three_blocks(store, sharded=False)
    group = zarr.open_group(store, mode="r+")
    del group.attrs["data_blocks"], group.attrs["stored_blocks"]
    zarr.consolidate_metadata(group.store)
    (store / "data/c/1/0/0/0").unlink()  # the zeros, which an earlier writer did not store
    np.testing.assert_array_equal(open_scan(str(store)).values, data)


@pytest.mark.parametrize(
    "command", [["strain", "--method", "py4dstem"], ["noise", "--background", "0.5"]]
)
def test_a_step_on_a_store_that_lost_a_block_stops_with_the_sentence(tmp_path, capsys, command):
    store = tmp_path / "s.zarr"
    three_blocks(store, sharded=False)
    (store / "data/c/2/0/0/0").unlink()
    name, *options = command
    assert main([name, str(store), str(tmp_path / "out.zarr"), *options]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err == (
        f"stemflow {name}: error: {lost_block(store, 'data/c/2/0/0/0', 3)}; copy the store "
        "again from its source, or rerun the command that wrote it (stemflow ingest, simulate "
        "or noise) to write it again.\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_a_rerun_writes_a_store_that_lost_a_block_again(tmp_path, capsys, monkeypatch):
    """A rerun skips a finished store only while it holds every block: the ingest or noise
    command that wrote a store that lost one writes it again, with a warning."""
    import stemlib.io.scan_store as store_module

    monkeypatch.setattr(store_module, "CHUNK_BYTES", 16 * 12 * 2 * 5)  # a block per scan row
    np.save(tmp_path / "s.npy", scan())
    clean, noisy = tmp_path / "s.zarr", tmp_path / "n.zarr"
    commands = {
        clean: ["ingest", str(tmp_path / "s.npy"), str(clean), "--quiet"],
        noisy: ["noise", str(clean), str(noisy), "--background", "0.5", "--quiet"],
    }
    for args in commands.values():
        assert main(args) == 0
    noise = open_scan(str(noisy)).values
    for store, args in commands.items():
        keys = block_keys(store)
        (store / keys[1]).unlink()
        capsys.readouterr()
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert "skipped" not in out
        assert err == (
            f"stemflow {args[0]}: warning: {lost_block(store, keys[1], len(keys))}; writing it "
            "again.\n"
        )
        assert block_keys(store) == keys
    np.testing.assert_array_equal(open_scan(str(clean)).values, scan())
    np.testing.assert_array_equal(open_scan(str(noisy)).values, noise)


def test_a_store_that_lost_its_array_metadata_is_one_sentence_and_written_again(tmp_path, capsys):
    """A copy that lost the data array's zarr.json left a store that zarr cannot open (a
    traceback) and that a rerun took for finished work."""
    np.save(tmp_path / "s.npy", scan())
    store = tmp_path / "s.zarr"
    ingest_args = ["ingest", str(tmp_path / "s.npy"), str(store), "--quiet"]
    assert main(ingest_args) == 0
    (store / "data" / "zarr.json").unlink()
    with pytest.raises(InputError) as error:
        open_scan(str(store))
    fix = (
        "copy the store again from its source, or rerun the command that wrote it (stemflow "
        "ingest, simulate or noise) to write it again."
    )
    assert str(error.value) == f"{store} lacks the metadata of its patterns (data/zarr.json); {fix}"
    capsys.readouterr()
    assert main(["strain", str(store), str(tmp_path / "out.zarr"), "--method", "py4dstem"]) == 2
    assert capsys.readouterr().err == f"stemflow strain: error: {error.value}\n"
    assert main(ingest_args) == 0
    assert capsys.readouterr().err == (
        f"stemflow ingest: warning: {store} lacks the metadata of its patterns (data/zarr.json); "
        "writing it again.\n"
    )
    np.testing.assert_array_equal(open_scan(str(store)).values, scan())


def test_a_reader_that_leaves_the_pipe_gets_no_traceback():
    """``stemflow ingest --list-formats | head -1``: the pipe closes before the list is out."""
    import subprocess
    import sys

    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", "--list-formats"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run.stdout.close()
    assert run.stderr.read() == b"" and run.wait() == 1


def test_interrupted_write_publishes_nothing(tmp_path, monkeypatch):
    """A failure while blocks stream leaves neither the destination nor a temporary store, also
    while other threads are still writing their blocks (the temporary store is removed after
    them, not under them)."""
    import dask

    import stemlib.io.scan_store as store

    np.save(tmp_path / "s.npy", scan())
    lock, calls, running = threading.Lock(), {"started": 0, "finished": 0}, threading.Event()
    raised, returned = threading.Event(), threading.Event()
    real = store._write_and_hash

    def failing(block, target, block_info=None):
        with lock:
            calls["started"] += 1
            n = calls["started"]
        try:
            if n == 2:  # fails while another block is being written
                assert running.wait(30), "no other block was written at the same time"
                raised.set()
                raise OSError("disk full")
            running.set()
            raised.wait(30)
            # Held until the failed ingest returns, or half a second: an ingest that returned
            # without waiting for this block would see it written into the store it removed.
            returned.wait(0.5)
            return real(block, target, block_info)
        finally:
            with lock:
                calls["finished"] += 1

    monkeypatch.setattr(store, "_write_and_hash", failing)
    monkeypatch.setattr(store, "CHUNK_BYTES", 16 * 12 * 2 * 5)  # several blocks
    with dask.config.set(num_workers=3), pytest.raises(OSError, match="disk full"):
        ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"))
    with lock:
        still_writing = calls["started"] - calls["finished"]
    returned.set()
    deadline = time.monotonic() + 30  # a block still being written (the defect) finishes now
    while calls["started"] != calls["finished"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert still_writing == 0 and calls["started"] >= 2
    assert leftovers(tmp_path) == []


def test_a_write_removes_what_killed_writers_left_and_keeps_what_others_use(tmp_path):
    """kill -9 during an ingest left its temporary store beside the destination for ever (user
    audit). The next write to that destination removes it, and the replaced store a publication
    killed between its two renames leaves; never the store of a writer still running, one
    written on another machine (a shared disk), or one named by an earlier stemflow."""
    np.save(tmp_path / "s.npy", scan())
    dest = str(tmp_path / "s.zarr")
    elsewhere = ".s.zarr.partial-0123456789ab-1-0123abcd"  # another machine's process 1
    earlier = ".s.zarr.partial-0123456789ab"
    for name in (elsewhere, earlier):
        (tmp_path / name).mkdir()
    with (
        temporary_writer(dest, killed=True) as partial,
        temporary_writer(dest, "old", killed=True) as old,
        temporary_writer(dest, killed=False) as running,
    ):
        assert ".s.zarr.partial-" in partial and ".s.zarr.old-" in old
        assert all(os.path.isdir(p) for p in (partial, old, running))
        assert ingest(str(tmp_path / "s.npy"), dest).status == "written"
        left = sorted(os.listdir(tmp_path))
    names = [os.path.basename(p) for p in (earlier, elsewhere, running)]
    assert left == sorted([*names, "s.npy", "s.zarr"])
    np.testing.assert_array_equal(open_scan(dest).values, scan())


def test_failed_replacement_keeps_the_old_store(tmp_path, monkeypatch):
    import stemlib.io.scan_store as store

    np.save(tmp_path / "s.npy", scan())
    ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"))
    np.save(tmp_path / "s.npy", scan(seed=1))
    monkeypatch.setattr(
        store, "_write_and_hash", lambda *a, **k: (_ for _ in ()).throw(OSError("network lost"))
    )
    with pytest.raises(OSError, match="network lost"):
        ingest(str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), IngestOptions(overwrite=True))
    np.testing.assert_array_equal(open_scan(str(tmp_path / "s.zarr")).values, scan())
    assert leftovers(tmp_path) == ["s.zarr"]


def test_open_scan_refuses_other_stores(tmp_path):
    xr.Dataset({"x": ("a", np.arange(3))}).to_zarr(tmp_path / "other.zarr", zarr_format=3)
    with pytest.raises(
        InputError,
        match=(
            r"other\.zarr is not a scan store: it needs a variable 'data' "
            r"with dims \(rx, ry, qx, qy\)"
        ),
    ):
        open_scan(str(tmp_path / "other.zarr"))
    with pytest.raises(
        InputError, match=r"nothing\.zarr does not exist; run `stemflow ingest SOURCE"
    ):
        open_scan(str(tmp_path / "nothing.zarr"))


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import dask
    from stemlib.ingest import ingest
    from stemlib.resources import peak_rss

    before = peak_rss()  # the imports count in the reference
    with dask.config.set(scheduler="threads", num_workers=2):
        ingest(sys.argv[1], sys.argv[2])
    after = peak_rss()
    print(json.dumps({"before": before, "after": after}))
    """
)


@pytest.mark.slow
def test_peak_memory_is_well_below_the_scan_size(tmp_path):
    """An 805 MB scan converts with a few blocks in memory at a time, never the whole scan."""
    shape = (96, 64, 256, 256)
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape)
    for i in range(shape[0]):  # fill row by row so the test itself stays small
        big[i] = np.random.default_rng(i).poisson(3.0, shape[1:]).astype(np.uint16)
    big.flush()
    del big
    size = os.path.getsize(path)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / "big.zarr")],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = rss["after"] - rss["before"]
    block = 32 * 2**20  # one write block (a scan row of 256 x 256 px patterns here)
    # Memory is a few blocks per thread (read buffer, zarr's copy, shard buffers), not the scan:
    # measured 268 MB with 2 threads (170 MB with 1) for this 805 MB scan of 25 blocks.
    assert grew < 10 * block and grew < size / 2, (
        f"peak RSS grew by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB scan"
    )
    assert open_scan(str(tmp_path / "big.zarr")).shape == shape


def test_truth_in_an_hdf5_source_is_carried_into_the_store(tmp_path):
    """A simulated raw file keeps its ground truth through ingest (stemflow's truth layout)."""
    import h5py

    from stemlib.truth import open_truth, truth_dataset, write_truth_group

    data = scan()
    rng = np.random.default_rng(5)
    truth = truth_dataset(
        **{k: rng.normal(scale=0.01, size=(6, 5)) for k in ("exx", "eyy", "exy", "theta")},
        reference_mask=np.eye(6, 5, dtype=bool),
        symmetry=6,
    )
    with h5py.File(tmp_path / "sim.h5", "w") as f:
        f["data"] = data
        write_truth_group(f.create_group("truth"), truth)
    ingest(str(tmp_path / "sim.h5"), str(tmp_path / "s.zarr"))
    back = open_truth(str(tmp_path / "s.zarr"))
    assert back.attrs["symmetry"] == 6
    np.testing.assert_array_equal(back["exx"].values, truth["truth_exx"].values)
    np.testing.assert_array_equal(back["reference_mask"].values, np.eye(6, 5, dtype=bool))


@pytest.mark.slow
def test_multislice_dev_scan_ingests_with_its_truth(tmp_path):
    """The shared multislice files keep their detector-frame truth (``*_lab``, ``theta_deg``)."""
    from stemlib.devdata import abtem_dev_path, read_abtem_dev
    from stemlib.truth import open_truth

    name = "dev_si001_32x32_128px_12grains_seed11_dose1000"
    try:
        path = abtem_dev_path(name)
    except InputError:  # a clone outside the workplace, without ../shared/data
        pytest.skip(f"{name} is not in the shared data folder")
    ingest(str(path), str(tmp_path / "si.zarr"), IngestOptions(dataset="datacube"))
    expected = read_abtem_dev(path)
    np.testing.assert_array_equal(open_scan(str(tmp_path / "si.zarr")).values, expected.data)
    back = open_truth(str(tmp_path / "si.zarr"))
    np.testing.assert_allclose(back["theta"].values, expected.truth["truth_theta"].values)
    np.testing.assert_allclose(back["eyy"].values, expected.truth["truth_eyy"].values)


def test_a_dev_scan_is_stored_in_stemflow_s_units_with_its_detector_frame_truth(tmp_path):
    """The abtem-dev layout (shared/data/abtem-dev/README.md) written out small: its scan step,
    in Å there, is stored in nm; its rotation, in degrees there, in rad; and its truth is the
    detector-frame ``*_lab`` strain, not the crystal frame's."""
    import h5py

    from stemlib.devdata import write_abtem_dev
    from stemlib.truth import open_truth

    rng = np.random.default_rng(0)
    lab = {k: rng.uniform(-0.02, 0.02, (2, 3)) for k in ("exx", "eyy", "exy")}
    path = tmp_path / "dev_si001_2x3_16px_seed0_dose1000.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            material="si001",
            energy_keV=300.0,
            semiangle_mrad=2.0,
            nominal_scan_step_A=5.0,
            invA_per_px=0.0167619,
            centre_px=8,
        )
        f["datacube"] = rng.poisson(5.0, (2, 3, 16, 16)).astype(np.uint16)
        truth = f.create_group("truth")
        for name, value in lab.items():
            truth[f"{name}_lab"] = value
            truth[name] = -value  # the crystal frame's U - I, which CONVENTIONS.md does not report
        truth["theta_deg"] = np.full((2, 3), 30.0)
        truth["grain_id"] = np.zeros((2, 3), np.int32)
        truth["reference_mask"] = np.ones((2, 3), bool)
    write_abtem_dev(path, str(tmp_path / "dev.zarr"))
    scan = open_scan(str(tmp_path / "dev.zarr"))
    assert scan.attrs["probe_step_nm"] == 0.5  # 5 Å
    assert scan["ry"].attrs["units"] == "nm" and scan["ry"].values.tolist() == [0.0, 0.5, 1.0]
    assert (scan.attrs["q_pixel_size"], scan.attrs["q_pixel_units"]) == (0.0167619, "1/A")
    assert scan.attrs["origin_px"] == [8.0, 8.0] and scan.attrs["beam_energy_keV"] == 300.0
    assert scan.attrs["convergence_semiangle_mrad"] == 2.0
    stored = open_truth(str(tmp_path / "dev.zarr"))
    for name, value in lab.items():
        np.testing.assert_array_equal(stored[name].values, value)
    np.testing.assert_allclose(stored["theta"].values, np.pi / 6)
    assert stored.attrs["symmetry"] == 4


def _beam_scan(centre=(20.0, 30.0), shape=(4, 4, 48, 48), seed=3) -> np.ndarray:
    """Poisson counts of a beam disk (4 px) at ``centre`` (qx, qy) px and four weaker disks."""
    rows, cols = np.indices(shape[2:])
    image = np.full(shape[2:], 2.0)
    for dx, dy, height in ((0, 0, 400.0), (9, 0, 60.0), (-9, 0, 60.0), (0, 9, 60.0), (0, -9, 60.0)):
        distance = np.hypot(rows - centre[0] - dx, cols - centre[1] - dy)
        image += height * np.clip(4.5 - distance, 0, 1)
    return np.random.default_rng(seed).poisson(image, shape).astype("uint16")


def test_a_recorded_beam_off_the_patterns_beam_is_a_warning_with_the_fix(tmp_path, capsys):
    """The direct beam ingest records (``--origin``, or the file's calibration) sets the qx, qy
    coordinates: where the patterns show it elsewhere, ingest says so and names the --origin
    that records it (CC-ST-AE only warned at strain time, without the value)."""
    import py4DSTEM

    np.save(tmp_path / "s.npy", _beam_scan())
    args = ["ingest", str(tmp_path / "s.npy"), str(tmp_path / "s.zarr"), "--origin", "24,24"]
    assert main(args) == 0
    assert capsys.readouterr().err.replace(str(tmp_path) + "/", "") == (
        "stemflow ingest: warning: s.npy: --origin gives its direct beam at (24, 24) px, but its "
        "patterns show it at (20.0, 30.0) px; pass --origin 20.0,30.0 for qx, qy coordinates "
        "that count from the beam.\n"
    )
    # the beam's own pixel, or one within its disk: nothing to say
    for origin in ("20,30", "22,28"):
        args[-3:] = [str(tmp_path / f"{origin}.zarr"), "--origin", origin]
        assert main(args) == 0
        assert not capsys.readouterr().err
    # the file's own record
    cube = py4DSTEM.DataCube(data=_beam_scan())
    cube.calibration.set_qx0_mean(30.0)
    cube.calibration.set_qy0_mean(20.0)
    py4DSTEM.save(str(tmp_path / "cube.h5"), cube, mode="o")
    assert main(["ingest", str(tmp_path / "cube.h5"), str(tmp_path / "cube.zarr")]) == 0
    assert capsys.readouterr().err.replace(str(tmp_path) + "/", "") == (
        "stemflow ingest: warning: cube.h5: the file records its direct beam at (30, 20) px, but "
        "its patterns show it at (20.0, 30.0) px; pass --origin 20.0,30.0 for qx, qy "
        "coordinates that count from the beam.\n"
    )
    # a scan with no beam (noise alone) has nothing to say whatever is recorded
    np.save(tmp_path / "flat.npy", scan())
    args = ["ingest", str(tmp_path / "flat.npy"), str(tmp_path / "flat.zarr"), "--origin", "1,1"]
    assert main(args) == 0
    assert not capsys.readouterr().err
