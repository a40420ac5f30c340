"""Vendor files on object storage (a real moto S3 server on 127.0.0.1): read from a local copy
that holds the file and its companion files, in a temporary folder that is removed afterwards.

Before: every vendor file on s3:// failed with "s3://.../a.mib: Merlin .mib files are read from
a local disk only; copy the file (with its companion files) to a local folder and pass that
path.", so the nightly facility-reprocess (which scans s3://facility-raw/) failed them all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import s3fs
import xarray as xr

from flows.cli import main
from stemlib.errors import InputError, ResourceError
from stemlib.ingest import IngestOptions, ingest, source_key
from stemlib.io.local_copy import COPY_BLOCK_BYTES, SOURCE_PREFIX, LocalCopy, check_free_space
from stemlib.io.readers import needs_local_copy, open_source
from stemlib.io.readers.vendor.mib import mib_companions
from stemlib.io.scan_store import open_scan
from stemlib.io.storage import locate
from stemlib.noise import noise_store

from . import vendor_files as vf
from .conftest import folders_of_writers, forget_s3_clients, logged_requests
from .test_ingest import COMPANION
from .test_readers_vendor import CASES, SCAN

pytestmark = pytest.mark.s3


def upload(folder: Path, url: str) -> None:
    """Every file of ``folder`` to the prefix ``url``."""
    s3fs.S3FileSystem().put(f"{folder}/", f"{url}/", recursive=True)


def stored_files(store: Path) -> dict[str, bytes]:
    """The bytes of every chunk of a local store (metadata files left out: they hold dates)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


# The formats with companion files (an .hdr, a .raw an .xml names, linked data files and a
# metadata file, series files, recording parts, a Direct Electron info file), and one without.
S3_CASES = ["mib-hdr", "empad", "arina", "tia-emi", "tvips-3-parts", "mrc-de-movie", "velox"]


@pytest.mark.parametrize("name", S3_CASES)
def test_vendor_file_on_s3_stores_the_same_bytes_as_the_local_file(
    tmp_path, s3, s3_server, own_tmpdir, name
):
    case = CASES[name]
    (tmp_path / "raw").mkdir()
    path = case.write(tmp_path / "raw")
    upload(tmp_path / "raw", f"{s3}/raw")
    url = f"{s3}/raw/{path.name}"
    options = IngestOptions(**case.options)

    local = ingest(str(path), str(tmp_path / "local.zarr"), options)
    remote = ingest(url, str(tmp_path / "remote.zarr"), options)

    assert remote.status == "written"
    assert stored_files(tmp_path / "remote.zarr") == stored_files(tmp_path / "local.zarr")
    stored = open_scan(str(tmp_path / "remote.zarr"))
    assert stored.dtype == case.data.dtype
    np.testing.assert_array_equal(stored.values, case.data)
    for key in ("content_sha256", "reader", "reader_details", "source_bytes"):
        assert remote.attrs[key] == local.attrs[key], key
    # Provenance names the object, never the local copy; no credential anywhere.
    assert stored.attrs["source"] == url and remote.attrs["source"] == url
    text = json.dumps(stored.attrs)
    assert str(own_tmpdir) not in text and "stemflow-source-" not in text
    assert s3_server.secret_key not in text and s3_server.access_key not in text
    assert os.listdir(own_tmpdir) == []  # the local copy is gone

    # The rerun finds the finished store by the object's source key, without copying it again.
    before = s3fs.S3FileSystem().info(url)["ETag"]
    assert ingest(url, str(tmp_path / "remote.zarr"), options).status == "skipped"
    assert s3fs.S3FileSystem().info(url)["ETag"] == before
    assert os.listdir(own_tmpdir) == []


def test_only_the_companion_files_the_reader_uses_are_copied(tmp_path, s3, own_tmpdir):
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    (tmp_path / "raw" / "b.mib").write_bytes(b"another scan")
    (tmp_path / "raw" / "notes.txt").write_text("not a companion")
    upload(tmp_path / "raw", f"{s3}/raw")
    copy = LocalCopy(locate(f"{s3}/raw/a.mib"), mib_companions)
    try:
        assert sorted(os.listdir(os.path.dirname(copy.location.path))) == ["a.hdr", "a.mib"]
        assert copy.location.url == f"{s3}/raw/a.mib" and copy.location.is_local
    finally:
        copy.close()
    assert os.listdir(own_tmpdir) == []


def _without(name: str):
    def build(folder: Path) -> None:
        (folder / name).unlink()

    return build


# A companion missing on S3: the reader's sentence names it (and the object, not the copy).
MISSING = {
    "empad": (
        _without("scan_x4_y3.raw"),
        r"^s3://[^ ]+/raw/a\.xml refers to the raw data file scan_x4_y3\.raw, which is missing; "
        r"keep scan_x4_y3\.raw beside the \.xml\.$",
    ),
    "arina": (
        _without("scan_data_000002.h5"),
        r"^s3://[^ ]+/raw/scan_master\.h5 links the data file scan_data_000002\.h5, which is "
        r"missing; keep the data files beside the master file\.$",
    ),
    "tia-emi": (
        _without("scan_1.ser"),
        r"^s3://[^ ]+/raw/scan\.emi has no series file scan_1\.ser beside it; keep the \.ser "
        r"files beside the \.emi, or pass the \.ser\.$",
    ),
}


@pytest.mark.parametrize("name", list(MISSING))
def test_a_missing_companion_on_s3_is_named_in_one_sentence(tmp_path, s3, own_tmpdir, name):
    case = CASES[name]
    remove, message = MISSING[name]
    (tmp_path / "raw").mkdir()
    path = case.write(tmp_path / "raw")
    remove(tmp_path / "raw")
    upload(tmp_path / "raw", f"{s3}/raw")
    url = f"{s3}/raw/{path.name}"
    with pytest.raises(InputError, match=message):
        ingest(url, str(tmp_path / "out.zarr"), IngestOptions(**case.options))
    assert os.listdir(tmp_path) == ["raw"]  # no store, no temporary sibling
    assert os.listdir(own_tmpdir) == []  # removed on error too


def test_cli_ingests_a_mib_from_s3_and_reports_a_missing_raw_in_one_line(
    tmp_path, s3, s3_server, own_tmpdir, capsys
):
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    vf.write_empad(
        tmp_path / "raw" / "e.xml",
        vf.make_scan((3, 4, 128, 128), "float32"),
        step_nm=1.2,
        q_per_nm=0.05,
    )
    (tmp_path / "raw" / "scan_x4_y3.raw").unlink()
    upload(tmp_path / "raw", f"{s3}/raw")

    assert main(["ingest", f"{s3}/raw/a.mib", str(tmp_path / "a.zarr"), "--quiet"]) == 0
    np.testing.assert_array_equal(open_scan(str(tmp_path / "a.zarr")).values, SCAN)
    capsys.readouterr()
    assert main(["ingest", f"{s3}/raw/e.xml", str(tmp_path / "e.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "e.xml refers to the raw data file scan_x4_y3.raw, which is missing" in err
    assert s3_server.secret_key not in err and s3_server.access_key not in err
    assert str(own_tmpdir) not in err
    assert sorted(os.listdir(tmp_path)) == ["a.zarr", "raw"]  # nothing of e.zarr
    assert os.listdir(own_tmpdir) == []


def test_a_reuploaded_hdr_on_s3_is_a_changed_source(tmp_path, s3, own_tmpdir):
    """A .hdr uploaded again beside its .mib (here: another scan shape) did not change the
    source key: the rerun skipped and kept the store read with the old header."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    upload(tmp_path / "raw", f"{s3}/raw")
    url, dest = f"{s3}/raw/a.mib", str(tmp_path / "a.zarr")
    assert ingest(url, dest).status == "written"
    assert ingest(url, dest).status == "skipped"

    (tmp_path / "new").mkdir()
    vf.write_mib(tmp_path / "new" / "a.mib", SCAN, frames_per_trigger=12)  # for its .hdr
    s3fs.S3FileSystem().put(str(tmp_path / "new" / "a.hdr"), f"{s3}/raw/a.hdr")
    with pytest.raises(InputError, match=r"a\.zarr already holds a different scan .*--overwrite"):
        ingest(url, dest)
    assert os.listdir(own_tmpdir) == []  # the key was computed without copying anything
    assert ingest(url, dest, IngestOptions(overwrite=True)).status == "written"
    np.testing.assert_array_equal(open_scan(dest).values, SCAN.reshape(1, 12, 16, 24))
    assert ingest(url, dest).status == "skipped"


def test_the_key_of_an_empad_on_s3_follows_its_raw_without_copying_it(tmp_path, s3, own_tmpdir):
    """The .xml names the .raw: it is read from the object store, and nothing is copied."""
    frames = vf.make_scan((3, 4, 128, 128), "float32")
    (tmp_path / "raw").mkdir()
    vf.write_empad(tmp_path / "raw" / "e.xml", frames, step_nm=1.2, q_per_nm=0.05)
    upload(tmp_path / "raw", f"{s3}/raw")
    location = locate(f"{s3}/raw/e.xml")
    first = source_key(location, IngestOptions())
    assert source_key(location, IngestOptions()) == first
    s3fs.S3FileSystem().pipe(f"{s3}/raw/scan_x4_y3.raw", b"re-exported")
    assert source_key(location, IngestOptions()) != first
    assert os.listdir(own_tmpdir) == []


def test_run_checks_an_s3_vendor_file_without_copying_it(tmp_path, s3, own_tmpdir, capsys):
    """``stemflow run`` leaves reading to the ingest step (one copy, not two) and still refuses
    a wrong destination before any work."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    upload(tmp_path / "raw", f"{s3}/raw")
    (tmp_path / "notes.zarr").write_text("my notes")
    assert main(["run", f"{s3}/raw/a.mib", str(tmp_path / "notes.zarr")]) == 2
    err = capsys.readouterr().err
    assert "is not a stemflow strain store" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(own_tmpdir) == []  # nothing was copied
    assert main(["run", f"{s3}/raw/gone.mib", str(tmp_path / "out" / "strain.zarr")]) == 2
    assert f"{s3}/raw/gone.mib does not exist; check the path." in capsys.readouterr().err


def test_a_killed_ingest_s_copy_is_removed_by_the_next_copy(tmp_path, s3, own_tmpdir):
    """The local copy of a vendor file on s3:// can hold a whole scan; an ingest killed (out of
    memory, kill -9) left it under TMPDIR for ever. The next copy removes those of killed
    processes of this machine, and keeps a running ingest's and one it cannot attribute."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    upload(tmp_path / "raw", f"{s3}/raw")
    others = ["stemflow-source-k2j4_h5g"]  # named by an earlier stemflow
    with folders_of_writers(SOURCE_PREFIX, own_tmpdir, others) as kept:
        LocalCopy(locate(f"{s3}/raw/a.mib"), mib_companions).close()
        assert sorted(os.listdir(own_tmpdir)) == kept


def test_open_source_keeps_the_copy_until_closed(tmp_path, s3, own_tmpdir):
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    upload(tmp_path / "raw", f"{s3}/raw")
    assert needs_local_copy(f"{s3}/raw/a.mib") and not needs_local_copy(str(tmp_path / "raw/a.mib"))
    with open_source(f"{s3}/raw/a.mib") as scan:
        assert len(os.listdir(own_tmpdir)) == 1
        np.testing.assert_array_equal(scan.data.compute(), SCAN)
        assert scan.source == f"{s3}/raw/a.mib"
    assert os.listdir(own_tmpdir) == []


def _ingest(source: str, dest: Path) -> None:
    result = ingest(source, str(dest))
    assert result.status == "written" and result.attrs["source_bytes"] == SCAN.nbytes + 12 * 384
    np.testing.assert_array_equal(open_scan(str(dest)).values, SCAN)


def _noise(source: str, dest: Path) -> None:
    noise_store(source, str(dest), background=0.5)
    assert open_scan(str(dest)).shape == SCAN.shape


@pytest.mark.parametrize("command", [_ingest, _noise])
def test_an_ingest_asks_s3_about_its_source_file_once(tmp_path, s3, own_tmpdir, caplog, command):
    """An ingest asked S3 about a vendor file five times before copying it: a HEAD for its key
    (keyed_source's info), a HEAD and a listing in open_source (whether it exists, whether it is
    a folder) and a HEAD for the copy's size (LocalCopy); stemflow noise asked twice more first
    (whether it exists, whether it is a file). They take the first info now; the one HEAD left
    besides it is s3fs's own, when the copy opens the file."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    upload(tmp_path / "raw", f"{s3}/raw")
    forget_s3_clients()  # nothing kept from the upload
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        command(f"{s3}/raw/a.mib", tmp_path / "a.zarr")
    key = f"/{s3.removeprefix('s3://')}/raw/a.mib"
    asked = [r for r in logged_requests(caplog.records) if "raw/a.mib" in r and r != f"GET {key}"]
    assert asked == [f"HEAD {key}", f"HEAD {key}"]
    assert os.listdir(own_tmpdir) == []


@pytest.mark.parametrize("name", list(COMPANION))
def test_an_ingest_from_object_storage_lists_the_companion_files_once(
    tmp_path, s3, own_tmpdir, caplog, name
):
    """A vendor file on object storage had its companion files listed for the source key, then
    again for the local copy its reader opens: two HEAD requests more per named file (a .hdr),
    a LIST more per wildcard (.ser series, TVIPS parts), an EMPAD .xml read again. The copy now
    holds what the key's listing found, in stemflow noise's reading too: after the requests of
    that listing come only those of the copy, a HEAD and a GET of each file it reads."""
    case = CASES[name]
    (tmp_path / "raw").mkdir()
    path = case.write(tmp_path / "raw")
    upload(tmp_path / "raw", f"{s3}/raw")
    url, options = f"{s3}/raw/{path.name}", IngestOptions(**case.options)

    def requests(call):
        forget_s3_clients()  # s3fs's listings cache from a call before: each one asks anew
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            caplog.clear()
            value = call()
        return value, logged_requests(caplog.records)

    key, listing = requests(lambda: source_key(locate(url), options))
    result, ingested = requests(lambda: ingest(url, str(tmp_path / "a.zarr"), options))
    _, noised = requests(
        lambda: noise_store(url, str(tmp_path / "n.zarr"), background=0.5, read=options)
    )
    folder = f"/{s3.removeprefix('s3://')}/raw/"
    for sent in (ingested, noised):
        assert sent[: len(listing)] == listing, sent  # the listing for the key, once...
        heads, gets = sent[len(listing) :: 2], sent[len(listing) + 1 :: 2]
        assert [h.replace("HEAD ", "GET ", 1) for h in heads] == gets, sent  # ...then reads
        assert {g.removeprefix(f"GET {folder}") for g in gets} == set(os.listdir(tmp_path / "raw"))
    assert result.source_key == key and result.status == "written"
    np.testing.assert_array_equal(open_scan(str(tmp_path / "a.zarr")).values, case.data)
    assert os.listdir(own_tmpdir) == []


def test_too_little_free_space_is_one_sentence_naming_the_file_and_tmpdir(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ResourceError) as caught:
        check_free_space("s3://facility-raw/day1/scan_042.mib", free + 10**12, str(tmp_path))
    message = str(caught.value)
    assert message.startswith("s3://facility-raw/day1/scan_042.mib needs ") and message.endswith(
        f"GB of local disk for the copy its reader opens, but {tmp_path} has "
        f"{free / 1e9:.1f} GB free; set TMPDIR to a folder on a disk with more free space."
    )
    check_free_space("s3://facility-raw/day1/scan_042.mib", 1, str(tmp_path))  # room: no error


def test_the_copy_streams_in_ranged_requests_of_one_block(tmp_path, s3, own_tmpdir, caplog):
    """A file of 6 blocks arrives in (at least) 6 ranged GET requests, each of at most
    COPY_BLOCK_BYTES, written out as they come: the file is never held in memory whole."""
    size = 6 * COPY_BLOCK_BYTES
    s3fs.S3FileSystem().pipe(f"{s3}/raw/big.blo", os.urandom(size))
    bucket = s3.removeprefix("s3://")
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        copy = LocalCopy(locate(f"{s3}/raw/big.blo"), lambda path: [])
    ranged = [
        r
        for r in caplog.records
        if f"GET /{bucket}/raw/big.blo " in r.getMessage() and " 206 " in r.getMessage()
    ]
    assert os.path.getsize(copy.location.path) == size
    assert len(ranged) >= size // COPY_BLOCK_BYTES
    copy.close()
    assert os.listdir(own_tmpdir) == []


@pytest.mark.slow
def test_facility_reprocess_processes_a_mib_under_an_s3_root(
    prefect_harness, tmp_path, s3, own_tmpdir
):
    """The nightly deployment's case: a Merlin scan with its .hdr under an s3:// root."""
    from flows.reprocess_facility import reprocess_facility, result_url
    from stemlib.noise import add_noise
    from stemlib.simulate import simulate

    from .test_process_scan import SIMULATION

    counts = add_noise(simulate(SIMULATION)["data"].data, background=0.1, counts=1e5, seed=1)
    scan = np.asarray(counts).astype("uint16")  # counts up to a few thousand
    (tmp_path / "raw" / "day1").mkdir(parents=True)
    vf.write_mib(tmp_path / "raw" / "day1" / "scan_042.mib", scan, frames_per_trigger=12)
    upload(tmp_path / "raw", f"{s3}/raw")
    report = reprocess_facility(root=f"{s3}/raw/", dest_root=f"{s3}/results", methods=["py4dstem"])
    assert report["counts"] == {"processed": 1, "skipped": 0, "failed": 0}, report["scans"]
    assert report["scans"][0]["scan"] == f"{s3}/raw/day1/scan_042.mib"
    stored = open_scan(f"{s3}/results/day1/scan_042/scan_042.zarr")  # beside the result
    np.testing.assert_array_equal(stored.values, scan)
    assert stored.attrs["source"] == f"{s3}/raw/day1/scan_042.mib"
    strain = xr.open_zarr(result_url(f"{s3}/results", "day1/scan_042"))
    assert [str(m) for m in strain["method"].values] == ["py4dstem"]
    # The ingest ran in a Dask worker process, which inherited TMPDIR: its copy is gone.
    assert not [n for n in os.listdir(own_tmpdir) if n.startswith("stemflow-source-")]
    again = reprocess_facility(root=f"{s3}/raw/", dest_root=f"{s3}/results", methods=["py4dstem"])
    assert again["counts"] == {"processed": 0, "skipped": 1, "failed": 0}


def test_the_facility_scan_finds_an_empad_by_the_raw_file_its_xml_names(tmp_path, s3):
    """EMPAD names its frames scan_x{RY}_y{RX}.raw, not after the .xml: the nightly scan of a
    bucket counted such an .xml as a companion and never processed it. An .xml that is not an
    EMPAD header, or whose frames are missing, is no scan."""
    from stemlib.discover import find_scans

    (tmp_path / "raw" / "lost").mkdir(parents=True)
    scan = vf.make_scan((3, 4, 128, 128), "float32")
    vf.write_empad(tmp_path / "raw" / "e.xml", scan, step_nm=1.2, q_per_nm=0.05)
    vf.write_empad(tmp_path / "raw" / "lost" / "f.xml", scan, step_nm=1.2, q_per_nm=0.05)
    (tmp_path / "raw" / "lost" / "scan_x4_y3.raw").unlink()
    (tmp_path / "raw" / "settings.xml").write_text("<settings><gain>2</gain></settings>")
    (tmp_path / "raw" / "notes.xml").write_text("not xml <")
    upload(tmp_path / "raw", f"{s3}/raw")
    assert find_scans(f"{s3}/raw") == [f"{s3}/raw/e.xml"]
    assert find_scans(str(tmp_path / "raw")) == [str(tmp_path / "raw" / "e.xml")]
