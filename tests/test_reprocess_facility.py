"""The facility reprocessing flow (issue 7): a folder of good, already-done and broken scans;
one failing scan never stops the others, and each outcome is reported with its reason."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import xarray as xr

from flows.cli import main
from flows.reprocess_facility import reprocess_facility, result_url
from stemlib.baseline_py4dstem import Py4DSTEMConfig
from stemlib.errors import InputError
from stemlib.ingest import IngestOptions

from . import vendor_files as vf
from .test_process_scan import write_raw_scan
from .test_readers_vendor import SCAN


@pytest.fixture(scope="module")
def one_scan(tmp_path_factory) -> str:
    return write_raw_scan(tmp_path_factory.mktemp("raw") / "grains.h5")


def _task_and_subflow_runs(flow_run_id) -> tuple[list, list]:
    """The process-one-scan task runs of a facility run, and its process-scan runs, as the
    Prefect API holds them (what the UI lists)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    async def read():
        async with get_client() as client:
            tasks = await client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])
                )
            )
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )
        return [t for t in tasks if t.task_key.startswith("process_one")], subflows

    return asyncio.run(read())


def _flow_run_names(states: list) -> list[str]:
    """The names the Prefect API holds for the flow runs that ended in ``states``."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return [(await client.read_flow_run(s.state_details.flow_run_id)).name for s in states]

    return asyncio.run(read())


def _latest(key: str):
    """The latest version of artifact ``key`` (its ``data``, ``description``, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
    )

    async def read():
        async with get_client() as client:
            return await client.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(
                    key=ArtifactCollectionFilterKey(any_=[key])
                )
            )

    [latest] = asyncio.run(read())
    return latest


@pytest.mark.slow
def test_good_done_and_broken_scans(
    prefect_harness, one_scan, tmp_path, capsys, in_process_cluster
):
    root, results = tmp_path / "raw", tmp_path / "results"
    (root / "day1").mkdir(parents=True)
    shutil.copy(one_scan, root / "day1" / "done.h5")
    # The facility's own py4DSTEM settings (smaller Dask tasks: the same maps).
    settings = Py4DSTEMConfig(block_patterns=64)
    first = reprocess_facility(  # the command below runs on worker processes
        root=str(root),
        dest_root=str(results),
        methods=["py4dstem"],
        py4dstem=settings,
        dask_address=in_process_cluster,
    )
    assert first["counts"] == {"processed": 1, "skipped": 0, "failed": 0}

    shutil.copy(one_scan, root / "day1" / "new.h5")
    (root / "broken.mib").write_bytes(b"not a Merlin file at all" * 100)
    # The second night by hand, as `stemflow reprocess` with the same settings from a file (so
    # done.h5 is skipped): a line per scan, then the counts; exit status 1 as one scan failed.
    config = tmp_path / "py4dstem.yaml"
    config.write_text("block_patterns: 64\n")
    capsys.readouterr()
    command = ["reprocess", str(root), str(results), "--method", "py4dstem"]
    assert main([*command, "--py4dstem-config", str(config)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "Traceback" not in err
    # The broken file's reason is the reader's sentence, as `stemflow ingest` would print it.
    reason = (
        f"{root}/broken.mib is not a Quantum Detectors Merlin .mib file (its first frame header "
        "does not start with MQ1); check the file, or pass --format with its real format."
    )
    assert lines[-4:-1] == [
        f"failed     {root}/broken.mib: {reason}",
        f"skipped    {root}/day1/done.h5: already processed",
        f"processed  {root}/day1/new.h5 -> {result_url(str(results), 'day1/new')}",
    ]
    assert lines[-1] == "1 processed, 1 skipped, 1 failed"
    # The night's table artifact: the same rows, the reason before the results' long URLs.
    night = _latest("reprocess-summary")
    assert night.description == "1 processed, 1 skipped, 1 failed"
    rows = json.loads(night.data)
    assert [list(row) for row in rows] == [["scan", "status", "reason", "result"]] * 3
    assert [(row["status"], row["reason"]) for row in rows] == [
        ("failed", reason),
        ("skipped", "already processed"),
        ("processed", ""),
    ]

    # A dry run lists what the next night would do (try the broken file again: a dry run reads
    # no scan), and does nothing.
    shutil.copy(one_scan, root / "day1" / "later.h5")
    capsys.readouterr()
    assert main([*command, "--py4dstem-config", str(config), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"to process {root}/broken.mib -> {result_url(str(results), 'broken')}",
        f"skipped    {root}/day1/done.h5: already processed",
        f"to process {root}/day1/later.h5 -> {result_url(str(results), 'day1/later')}",
        f"skipped    {root}/day1/new.h5: already processed",
        "2 to process, 2 skipped, 0 failed",
    ]
    assert not (results / "day1" / "later").exists() and not (results / "broken").exists()
    # With --recompute (after an upgrade, say) the processed scans are processed again too.
    assert main([*command, "--py4dstem-config", str(config), "--dry-run", "--recompute"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 to process, 0 skipped, 0 failed"

    new = xr.open_zarr(result_url(str(results), "day1/new"))
    done = xr.open_zarr(result_url(str(results), "day1/done"))
    assert [str(m) for m in new["method"].values] == ["py4dstem"]
    xr.testing.assert_equal(new["exx"].load(), done["exx"].load())  # the same scan, the same answer
    assert not (results / "broken").exists()  # a failed scan publishes nothing
    # Each scan's statistics are an artifact keyed by its path below the root.
    for name in ("new", "done"):
        scan = _latest(f"strain-day1-{name}")
        assert scan.data.startswith(f"## day1/{name}\n")
        assert scan.description == (
            "Coverage of py4dstem, its spread in the reference, and its error against the truth"
        )

    # Other parameters are another request, which the nightly run would not skip.
    from flows.process_scan import resolved_parameters
    from tasks.publish import published_request, request_key

    source = str(root / "day1" / "done.h5")
    published = published_request(result_url(str(results), "day1/done"))
    ours = resolved_parameters(methods=["py4dstem"], py4dstem=settings)
    assert published == request_key(source, **ours)
    assert published != request_key(source, **{**ours, "symmetry": 4})
    assert published != request_key(source, **resolved_parameters(methods=["py4dstem"]))


def test_a_facility_of_raw_binary_files(prefect_harness, tmp_path, in_process_cluster):
    """Raw binary files say nothing of their layout, so a run finds them only when told their
    format (and the ingest options give the layout); a file of the wrong size is reported by
    name, and the rest of the folder is not taken for scans. In the UI, the scan's task run
    and process-scan run are named by its path below the root."""
    (tmp_path / "raw" / "day1").mkdir(parents=True)
    short = tmp_path / "raw" / "day1" / "short.raw"
    short.write_bytes(bytes(100))
    (tmp_path / "raw" / "notes.mib").write_bytes(b"not a scan")
    layout = IngestOptions(format="raw", dtype="uint16", frame_shape=(8, 8), scan_shape=(4, 4))
    dry_state = reprocess_facility(
        root=str(tmp_path / "raw"),
        dest_root=str(tmp_path / "results"),
        ingest=layout,
        dry_run=True,
        return_state=True,
    )
    dry = dry_state.result()
    assert dry["counts"] == {"to process": 1, "skipped": 0, "failed": 0}
    assert dry["scans"][0]["result"] == result_url(str(tmp_path / "results"), "day1/short")
    state = reprocess_facility(
        root=str(tmp_path / "raw"),
        dest_root=str(tmp_path / "results"),
        ingest=layout,
        dask_address=in_process_cluster,
        return_state=True,
    )
    # A night with a failed scan ends Failed, which the run list and automations show.
    assert state.is_failed() and state.message == (
        "Flow run encountered an exception: ScansFailed: 1 of 1 scans failed (0 processed, 0 "
        "skipped, 1 failed); the reprocess-summary artifact gives each one's reason."
    )
    found = state.result(raise_on_failure=False).summary
    assert found["counts"] == {"processed": 0, "skipped": 0, "failed": 1}
    (row,) = found["scans"]
    assert row["scan"] == str(short)
    assert row["reason"].startswith(f"{short} is truncated: it has 100 ")
    tasks, subflows = _task_and_subflow_runs(state.state_details.flow_run_id)
    assert [(t.name, t.state.type.value) for t in tasks] == [("process-day1/short", "COMPLETED")]
    assert [(f.name, f.state.type.value) for f in subflows] == [("process-day1/short", "FAILED")]
    # The facility's runs are named by their root, and a dry run says so.
    assert _flow_run_names([dry_state, state]) == ["reprocess-raw-dry-run", "reprocess-raw"]


def test_an_edited_companion_file_is_a_new_request(tmp_path):
    """The nightly run skips a scan whose result records its request key: an edited .hdr
    beside a .mib is a new request, as an edited .mib is, so the scan is processed again (and
    its ingest refuses to replace the old scan store without --overwrite, as for a new .mib)."""
    from flows.process_scan import resolved_parameters
    from tasks.publish import request_key

    vf.write_mib(tmp_path / "a.mib", SCAN, frames_per_trigger=4)
    parameters = resolved_parameters(methods=["py4dstem"])
    before = request_key(str(tmp_path / "a.mib"), **parameters)
    assert request_key(str(tmp_path / "a.mib"), **parameters) == before
    (tmp_path / "a.hdr").write_text((tmp_path / "a.hdr").read_text() + "\n")
    assert request_key(str(tmp_path / "a.mib"), **parameters) != before


def test_a_scan_store_written_again_with_another_calibration_is_a_new_request(tmp_path):
    """A scan store as the source: the same patterns written again with another beam centre
    (ingest --overwrite --origin) are another input, not the request already published."""
    import dask.array as da
    import numpy as np

    from flows.process_scan import resolved_parameters
    from stemlib.calibration import Calibration
    from stemlib.io.scan_store import write_scan
    from tasks.publish import request_key

    parameters = resolved_parameters(methods=["py4dstem"])
    keys = []
    for origin in ((6.0, 6.0), (6.0, 6.0), (6.5, 6.0)):
        store = str(tmp_path / f"s{len(keys)}.zarr")
        patterns = da.ones((2, 2, 12, 12), dtype=np.uint16)
        write_scan(patterns, store, calibration=Calibration(origin_px=origin))
        keys.append(request_key(store, **parameters))
    assert keys[0] == keys[1] != keys[2]


def test_a_root_that_is_not_a_folder_is_one_sentence(prefect_harness, tmp_path, capsys):
    """From the command and from the flow (the nightly deployment): the flow's run found no
    scan there and completed, night after night, with "0 processed, 0 skipped, 0 failed"."""
    missing = tmp_path / "no-such-day"
    assert main(["reprocess", str(missing), str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err == (
        f"stemflow reprocess: error: {missing} is not a folder or prefix of raw scans; check "
        "the path.\n"
    )
    state = reprocess_facility(
        root=str(missing), dest_root=str(tmp_path / "results"), return_state=True
    )
    assert state.is_failed()
    assert state.message == (
        f"Flow run encountered an exception: InputError: {missing} is not a folder or prefix "
        "of raw scans; check the path."
    )
    assert not (tmp_path / "results").exists()


def test_max_concurrent_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["reprocess", str(tmp_path), str(tmp_path / "results"), "--max-concurrent", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: argument --max-concurrent: expected a whole number of at least 1, got '0'\n"
    )


def test_a_night_with_nothing_new_starts_no_cluster(prefect_harness, tmp_path, monkeypatch):
    import flows.reprocess_facility as facility

    def no_cluster():
        raise AssertionError("a Dask cluster was started with no scan to process")

    monkeypatch.setattr(facility, "local_cluster", no_cluster)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("no scans tonight")
    night = reprocess_facility(root=str(tmp_path / "raw"), dest_root=str(tmp_path / "results"))
    assert night == {"counts": {"processed": 0, "skipped": 0, "failed": 0}, "scans": []}


@pytest.mark.parametrize(
    ("reference", "sentence"),
    [
        ("0:3", "--reference '0:3' is not understood; use auto, RX0:RX1,RY0:RY1 (e.g. 0:8,0:8) "),
        ("{tmp}/mask.npy", "reference mask {tmp}/mask.npy does not exist; pass an existing .npy "),
    ],
)
def test_a_reference_no_scan_could_take_is_refused_before_any_scan(
    tmp_path, capsys, reference, sentence
):
    """Every scan's run would fail on it: one sentence instead, before the survey."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    reference = reference.format(tmp=tmp_path)
    command = ["reprocess", str(tmp_path / "raw"), str(tmp_path / "results")]
    assert main([*command, "--reference", reference, "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(
        "stemflow reprocess: error: " + sentence.format(tmp=tmp_path)
    )


@pytest.mark.parametrize(
    ("layout", "sentence"),
    [
        (
            ["--dtype", "uint16", "--frame-shape", "8,8"],
            "--format raw: a raw binary file needs its layout; pass --dtype (e.g. uint16) and "
            "--frame-shape QX,QY, and --scan-shape RX,RY.",
        ),
        (
            ["--dtype", "unit16", "--frame-shape", "8,8", "--scan-shape", "4,4"],
            "--dtype 'unit16' is not a NumPy dtype; use e.g. uint16 or <f4.",
        ),
    ],
)
def test_raw_files_without_their_layout_are_refused_before_any_scan(
    prefect_harness, tmp_path, capsys, layout, sentence
):
    """Every raw file would fail on it: one sentence instead, before the survey (a dry run
    listed each file as to process, and a run failed each with the same sentence)."""
    (tmp_path / "raw").mkdir()
    for name in ("a.raw", "b.raw"):
        (tmp_path / "raw" / name).write_bytes(bytes(4 * 4 * 8 * 8 * 2))
    command = ["reprocess", str(tmp_path / "raw"), str(tmp_path / "results"), "--format", "raw"]
    for dry_run in (["--dry-run"], []):
        assert main([*command, *layout, *dry_run]) == 2
        assert capsys.readouterr().err == f"stemflow reprocess: error: {sentence}\n"
    assert not (tmp_path / "results").exists()
    # The flow (the nightly deployment) refuses it too, with the same sentence.
    ingest = IngestOptions(format="raw", dtype="uint16", frame_shape=(8, 8))
    with pytest.raises(InputError, match=r"^--format raw: a raw binary file needs its layout"):
        reprocess_facility(
            root=str(tmp_path / "raw"), dest_root=str(tmp_path / "results"), ingest=ingest
        )


def test_a_dest_root_that_is_a_file_is_one_sentence(prefect_harness, tmp_path, capsys):
    """No result could be written under it: one sentence before the survey, the file kept (a
    dry run listed every scan as to process, and a run failed each one), from the command and
    from the flow (the nightly deployment)."""
    (tmp_path / "raw").mkdir()
    vf.write_mib(tmp_path / "raw" / "a.mib", SCAN, frames_per_trigger=4)
    (tmp_path / "results").write_text("my notes")
    for dry_run in (["--dry-run"], []):
        assert main(["reprocess", str(tmp_path / "raw"), str(tmp_path / "results"), *dry_run]) == 2
        assert capsys.readouterr().err == (
            f"stemflow reprocess: error: {tmp_path / 'results'} is a file, not a folder or prefix "
            "of results; pass another DEST_ROOT.\n"
        )
    with pytest.raises(InputError, match="results is a file, not a folder or prefix of results"):
        reprocess_facility(root=str(tmp_path / "raw"), dest_root=str(tmp_path / "results"))
    assert (tmp_path / "results").read_text() == "my notes"


def test_the_form_takes_at_least_one_scan_at_a_time():
    """The form's max_concurrent took 0 or -3 (the flow quietly ran one scan at a time), where
    the command refuses them."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    field = parameter_schema(reprocess_facility.fn).model_dump()["properties"]["max_concurrent"]
    assert (field["minimum"], field["default"]) == (1, 2)
    with pytest.raises(ParameterTypeError, match="greater than or equal to 1"):
        reprocess_facility.validate_parameters({"root": "r", "dest_root": "d", "max_concurrent": 0})
