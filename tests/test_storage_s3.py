"""Object storage against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections import Counter

import h5py
import numpy as np
import pytest
import s3fs
import xarray as xr

from flows.cli import main
from stemlib.errors import InputError, StorageError
from stemlib.ingest import ingest
from stemlib.io.scan_store import open_scan
from stemlib.io.storage import WORK_PREFIX, local_workdir
from stemlib.noise import noise_store
from stemlib.rerun import finished_step
from stemlib.results import open_strain, strain_dataset, write_strain

from .conftest import (
    closed_port,
    folders_of_writers,
    forget_s3_clients,
    logged_requests,
    temporary_writer,
)

pytestmark = pytest.mark.s3


def scan(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, (4, 5, 16, 12)).astype("uint16")


def keys(bucket: str) -> list[str]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(fs.find(bucket.removeprefix("s3://")))


def test_ingest_to_s3_opens_with_one_line_of_xarray(tmp_path, s3):
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/scans/s.zarr"
    result = ingest(str(tmp_path / "s.npy"), url)
    assert result.status == "written"
    ds = xr.open_zarr(url)  # endpoint and key from the standard variables only
    np.testing.assert_array_equal(ds["data"].values, scan())
    assert not [k for k in keys(s3) if ".partial-" in k]
    assert ingest(str(tmp_path / "s.npy"), url).status == "skipped"


def test_a_write_to_s3_removes_what_killed_writers_of_this_machine_left(tmp_path, s3):
    """A temporary store that a writer on this machine left when it was killed is removed by
    the next write to the destination; a running writer's is kept."""
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/scans/s.zarr"
    with (
        temporary_writer(url, killed=True) as killed,
        temporary_writer(url, killed=False) as running,
    ):
        forget_s3_clients()  # list the bucket afresh, as a later command would
        assert ingest(str(tmp_path / "s.npy"), url).status == "written"
        left = {k.split("/")[2] for k in keys(s3)}
    assert left == {"s.zarr", running.rsplit("/", 1)[1]}, killed


def test_a_workdir_on_s3_removes_the_local_copies_killed_runs_left(s3, own_tmpdir):
    """A CC-ST-AE training whose workdir is on s3:// works in a local copy under TMPDIR; one
    killed (out of memory, kill -9) left that copy there for ever. The next one removes the
    copies of killed runs of this machine, and keeps a running one's, another machine's (a
    shared TMPDIR) and one named by an earlier stemflow; its own is copied back and removed."""
    others = ["ccstae-work-0123456789ab-1-0123abcd", "ccstae-work-k2j4_h5g"]
    with folders_of_writers(WORK_PREFIX, own_tmpdir, others) as kept:
        with local_workdir(f"{s3}/runs/work") as folder:
            assert os.path.dirname(folder) == str(own_tmpdir)
            with open(os.path.join(folder, "checkpoint.pt"), "wb") as f:
                f.write(b"weights")
        assert sorted(os.listdir(own_tmpdir)) == kept
    assert keys(s3) == [f"{s3.removeprefix('s3://')}/runs/work/checkpoint.pt"]


def test_sources_on_s3_are_read_by_byte_ranges(tmp_path, s3):
    fs = s3fs.S3FileSystem()
    np.save(tmp_path / "s.npy", scan())
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["cube"] = scan(seed=1)
    fs.put(str(tmp_path / "s.npy"), f"{s3}/raw/s.npy")
    fs.put(str(tmp_path / "s.h5"), f"{s3}/raw/s.h5")
    ingest(f"{s3}/raw/s.npy", str(tmp_path / "a.zarr"))
    ingest(f"{s3}/raw/s.h5", str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(open_scan(str(tmp_path / "a.zarr")).values, scan())
    np.testing.assert_array_equal(open_scan(str(tmp_path / "b.zarr")).values, scan(seed=1))


def test_strain_dataset_to_s3(s3):
    maps = {k: np.random.default_rng(1).normal(size=(4, 5)) for k in ("exx", "eyy", "exy", "theta")}
    ds = strain_dataset("py4dstem", **maps, attrs={"reference": "0:2,0:2"})
    url = write_strain(ds, f"{s3}/results/strain.zarr")
    back = open_strain(url)
    np.testing.assert_array_equal(back["exx"].values, ds["exx"].values)
    assert back.attrs["convention"] == "stemflow-1"
    # A second store beside the first, and the first again: the folder they share is listed
    # (for what killed writers left) before each is written, and s3fs's kept listing must not
    # say that the new temporary store does not exist.
    for again in (f"{s3}/results/other.zarr", url):
        np.testing.assert_array_equal(open_strain(write_strain(ds, again))["exx"], ds["exx"])
    s3fs.S3FileSystem().rm(f"{url}/theta/c/0/0/0")  # one listing of the store finds it gone
    with pytest.raises(InputError, match=r"its maps \(first missing: theta/c/0/0/0\), which"):
        open_strain(url)


def test_wrong_credentials_are_named_not_printed(tmp_path, s3, monkeypatch, capsys):
    np.save(tmp_path / "s.npy", scan())
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    forget_s3_clients()
    code = main(["ingest", str(tmp_path / "s.npy"), f"{s3}/s.zarr", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "refused the credentials or access; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err
    )
    assert secret not in err and "AKIAIOSFODNN7EXAMPLE" not in err and "Traceback" not in err
    with pytest.raises(StorageError, match="refused the credentials") as refused:
        ingest(str(tmp_path / "s.npy"), f"{s3}/s.zarr")
    assert refused.value.transient is False  # no retry: not until the user sets a key
    monkeypatch.undo()


def test_credentials_in_the_url_never_reach_messages_or_stores(tmp_path, s3, s3_server, capsys):
    np.save(tmp_path / "s.npy", scan())
    bucket = s3.removeprefix("s3://")
    # AWS secret keys hold "/" and "+", which hide them from urlsplit's netloc
    secrets = [(s3_server.access_key, s3_server.secret_key), ("AKIAEXAMPLE", "wJalr/XUtn+FEMI")]
    for (key, secret), outward in itertools.product(secrets, (True, False)):
        url = f"s3://{key}:{secret}@{bucket}/s.zarr"
        args = [str(tmp_path / "s.npy"), url] if outward else [url, str(tmp_path / "s.zarr")]
        code = main(["ingest", *args, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and secret not in err and key not in err
        assert err.strip() == (
            f"stemflow ingest: error: {s3}/s.zarr: a URL must not carry credentials (they would "
            "reach logs and messages); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) instead."
        )
    assert keys(s3) == [] and not (tmp_path / "s.zarr").exists()


def test_unreachable_endpoint_fails_fast_with_one_sentence(tmp_path, s3, monkeypatch, capsys):
    np.save(tmp_path / "s.npy", scan())
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    forget_s3_clients()
    code = main(["ingest", str(tmp_path / "s.npy"), f"{s3}/s.zarr", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        f"stemflow ingest: error: {s3}/s.zarr: the object store at {endpoint} cannot be reached; "
        "check AWS_ENDPOINT_URL and that the server is running."
    )
    with pytest.raises(StorageError, match="cannot be reached") as unreachable:
        ingest(f"{s3}/raw.npy", str(tmp_path / "out.zarr"))
    assert unreachable.value.transient is True  # retried: the server may come back
    assert not (tmp_path / "out.zarr").exists()


def test_missing_bucket(tmp_path, s3, capsys):
    np.save(tmp_path / "s.npy", scan())
    code = main(["ingest", str(tmp_path / "s.npy"), "s3://no-such-bucket-here/s.zarr", "--quiet"])
    assert code == 2
    assert (
        "s3://no-such-bucket-here/s.zarr: the bucket does not exist; create it or correct the URL."
        in capsys.readouterr().err
    )
    with pytest.raises(StorageError, match="the bucket does not exist") as missing:
        ingest(str(tmp_path / "s.npy"), "s3://no-such-bucket-here/s.zarr")
    assert missing.value.transient is False


def test_failed_upload_publishes_nothing(tmp_path, s3, monkeypatch):
    import stemlib.io.scan_store as store

    np.save(tmp_path / "s.npy", scan())
    monkeypatch.setattr(
        store, "_write_and_hash", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("reset"))
    )
    with pytest.raises(StorageError, match="cannot be reached"):
        ingest(str(tmp_path / "s.npy"), f"{s3}/s.zarr")
    assert keys(s3) == []


def test_a_publication_cut_short_is_written_again_by_the_rerun(tmp_path, s3, monkeypatch):
    """Object stores have no rename: publication copies key by key, root metadata last. Cut
    short, the prefix holds a marker, not a store; the rerun (no --overwrite) writes it again."""
    np.save(tmp_path / "s.npy", scan())
    copy, calls = s3fs.S3FileSystem.copy, {"n": 0}

    def cut_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ConnectionError("reset")
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "copy", cut_after_two)
    with pytest.raises(StorageError, match="cannot be reached"):
        ingest(str(tmp_path / "s.npy"), f"{s3}/s.zarr")
    left = [k.split("/", 2)[2] for k in keys(s3)]
    assert ".stemflow-publishing" in left and "zarr.json" not in left
    monkeypatch.setattr(s3fs.S3FileSystem, "copy", copy)
    assert main(["ingest", str(tmp_path / "s.npy"), f"{s3}/s.zarr", "--quiet"]) == 0
    np.testing.assert_array_equal(open_scan(f"{s3}/s.zarr").values, scan())
    assert ".stemflow-publishing" not in [k.split("/", 2)[2] for k in keys(s3)]


def test_a_store_that_lost_an_object_on_s3_is_one_sentence_and_the_rerun_writes_it(
    tmp_path, s3, monkeypatch
):
    """A shard or chunk object deleted on the bucket (or left out by an interrupted copy) read
    as zeros; one listing of the store's data prefix now finds it missing."""
    import stemlib.io.scan_store as store

    monkeypatch.setattr(store, "CHUNK_BYTES", 16 * 12 * 2 * 5)  # a block per scan row
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/scans/s.zarr"
    ingest(str(tmp_path / "s.npy"), url)
    s3fs.S3FileSystem().rm(f"{url}/data/c/2/0/0/0")
    with pytest.raises(InputError) as error:
        open_scan(url)
    assert str(error.value) == (
        f"{url} lacks 1 of the 4 blocks that hold its patterns (first missing: data/c/2/0/0/0), "
        "which would read as zeros; copy the store again from its source, or rerun the command "
        "that wrote it (stemflow ingest, simulate or noise) to write it again."
    )
    assert ingest(str(tmp_path / "s.npy"), url).status == "written"
    np.testing.assert_array_equal(open_scan(url).values, scan())
    assert ingest(str(tmp_path / "s.npy"), url).status == "skipped"


def test_open_scan_reads_the_group_metadata_once_besides_xarray(tmp_path, s3, caplog):
    """open_scan read the store's zarr.json three times (for its attributes, in xarray's opening,
    and again for the damage check's list of arrays) and asked for Zarr v2 metadata beside it
    and beside its data array's (.zgroup, .zattrs, .zmetadata, .zarray): 40 requests to S3 for
    a small scan, 25 of them on the group's metadata. It now reads the group once for its
    attributes and arrays, xarray reads it once more, and a Zarr v3 store is not asked for v2
    metadata; the damage check still reads the data array's own zarr.json and lists the store.
    """
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/scans/s.zarr"
    ingest(str(tmp_path / "s.npy"), url)
    forget_s3_clients()  # nothing kept from the writing: a run that opens the scan afresh
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        opened = open_scan(url)
    requests = logged_requests(caplog.records)
    prefix = f"/{s3.removeprefix('s3://')}/scans/s.zarr/"
    reads = Counter(r.removeprefix(f"GET {prefix}") for r in requests if r.startswith("GET "))
    assert {k: n for k, n in reads.items() if k.endswith("zarr.json")} == {
        "zarr.json": 2,
        "data/zarr.json": 1,
    }, requests
    assert not [r for r in requests if re.search(r"\.z(group|attrs|metadata|array)", r)]
    assert len([r for r in requests if "list-type=2" in r and "delimiter=&" in r]) == 1  # blocks
    np.testing.assert_array_equal(opened.values, scan())


@pytest.mark.parametrize("step", ["ingest", "noise"])
def test_rerun_reads_scan_metadata_once(tmp_path, s3, caplog, step):
    """A rerun of an ingest (or of stemflow noise) read the finished store's zarr.json for its
    key, then opened the group again to check its arrays for lost blocks: two reads, and Zarr v2
    lookups beside the second. The group read for the key is handed to the check."""
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/scans/s.zarr"
    ingest(str(tmp_path / "s.npy"), url)
    if step == "ingest":
        rerun = lambda: ingest(str(tmp_path / "s.npy"), url).status  # noqa: E731
    else:
        noise_store(url, f"{s3}/scans/noisy.zarr", background=0.5)
        url = f"{s3}/scans/noisy.zarr"
        rerun = lambda: noise_store(f"{s3}/scans/s.zarr", url, background=0.5).status  # noqa: E731
    forget_s3_clients()
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        assert rerun() == "skipped"
    requests = logged_requests(caplog.records)
    prefix = f"GET /{s3.removeprefix('s3://')}/scans/{url.rsplit('/', 1)[1]}/"
    reads = Counter(r.removeprefix(prefix) for r in requests if r.startswith(prefix))
    assert reads["zarr.json"] == 1, requests
    assert not [r for r in requests if re.search(r"\.z(group|attrs|metadata|array)", r)]


def strain_store_requests(s3, caplog, read) -> tuple[object, Counter, list[str]]:
    """What ``read(url)`` gives for a strain store on S3 written just before (nothing kept from
    the writing), and its requests: the GETs per key of the store, and all."""
    z = np.zeros((3, 4))
    ds = strain_dataset("py4dstem", exx=z, eyy=z, exy=z, theta=z, attrs={"run_keys": {"a": "k"}})
    url = write_strain(ds, f"{s3}/strain.zarr")
    forget_s3_clients()
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        result = read(url)
    requests = logged_requests(caplog.records)
    prefix = f"GET /{s3.removeprefix('s3://')}/strain.zarr/"
    reads = Counter(r.removeprefix(prefix) for r in requests if r.startswith(prefix))
    return result, reads, requests


def test_the_rerun_check_of_a_strain_store_reads_its_group_metadata_once(s3, caplog):
    """finished_step read the store's zarr.json for its run keys, then damaged_strain read it
    again for its arrays, each time asking for Zarr v2 metadata beside it too (.zgroup, .zattrs,
    .zmetadata: two requests each on S3): 20 requests per method and scan of a facility rerun,
    16 of them on the group's metadata; then 6, two of them asking whether the store's folder
    exists (a HEAD and a listing) before asking for its zarr.json; now 4. The store is still
    listed for lost blocks."""
    finished, reads, requests = strain_store_requests(s3, caplog, lambda u: finished_step(u, "k"))
    assert finished and reads["zarr.json"] == 1, requests
    assert not [r for r in requests if r.endswith("/strain.zarr") or "max-keys=1" in r], requests
    assert not [r for r in requests if re.search(r"\.z(group|attrs|metadata)", r)]
    assert len([r for r in requests if "list-type=2" in r and "delimiter=&" in r]) == 1


def test_open_strain_asks_for_no_zarr_v2_metadata(s3, caplog):
    """open_strain (xarray's reading) and damaged_strain each read the store's zarr.json and
    asked for Zarr v2 metadata beside it, 12 requests on S3 of 35. damaged_strain now has the
    group that open_strain read; xarray, which takes no zarr group, reads it once more."""
    ds, reads, requests = strain_store_requests(s3, caplog, open_strain)
    assert ds.sizes["rx"] == 3 and reads["zarr.json"] == 2, requests
    assert not [r for r in requests if re.search(r"\.z(group|attrs|metadata|array)", r)]
    assert len([r for r in requests if "list-type=2" in r and "delimiter=&" in r]) == 1
