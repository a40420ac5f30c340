"""The process-scan flow end to end (issue 7): a raw HDF5 scan with its truth -> ingest ->
CC-ST-AE and py4DSTEM in parallel on a real Dask LocalCluster -> one strain dataset on a real
S3-compatible server, read back with ``xr.open_zarr``; reruns skip finished steps; a killed
worker does not change the result; an unreachable store fails clearly and publishes nothing;
credentials never reach datasets, logs or artifacts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from flows.process_scan import process_scan
from stemlib.ccstae import CCSTAEConfig
from stemlib.errors import InputError, StorageError
from stemlib.io.export import write_hdf5_scan
from stemlib.metrics import strain_errors
from stemlib.noise import add_noise
from stemlib.simulate import SimulationConfig, simulate
from stemlib.truth import open_truth

from .conftest import IN_PROCESS_CLUSTER, closed_port, forget_s3_clients

#: A one-epoch CC-ST-AE: the plumbing is tested here, its accuracy in test_ccstae_*.
TINY = CCSTAEConfig.preset("cpu", epochs=1, channels=4, search_patterns=32, batch_size=16)
SIMULATION = SimulationConfig(scan=(12, 12), pattern=64, grains=3, lattice="square", seed=5)


def write_raw_scan(path) -> str:
    """A raw HDF5 scan with 10 % background noise and its truth, as a detector would write."""
    sim = simulate(SIMULATION)
    counts = add_noise(sim["data"].data, background=0.1, counts=1e5, seed=1)
    truth = sim[
        [v for v in sim.data_vars if v.startswith("truth_") or v in ("grain_id", "reference_mask")]
    ]
    truth.attrs["truth_symmetry"] = sim.attrs["truth_symmetry"]
    with dask.config.set(scheduler="threads"):
        return str(write_hdf5_scan(counts, path, truth=truth))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    return write_raw_scan(tmp_path_factory.mktemp("raw") / "grains.h5")


def _run_logs_and_artifacts(flow_run_id) -> tuple[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs go to the API in batches: send the last ones

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(  # task runs' logs carry their flow run's id too
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
                offset=0,
                sort=LogSort.TIMESTAMP_ASC,
            )
            response = await client._client.post(
                "/artifacts/filter",
                json={
                    "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
                    "limit": 50,
                    "offset": 0,
                    "sort": "CREATED_DESC",
                },
            )
        text = "\n".join(log.message for log in logs)
        return text, json.dumps(response.json())

    return asyncio.run(read())


def _in_process() -> Any:
    """A Dask task runner on a cluster inside this process (:data:`IN_PROCESS_CLUSTER`)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=IN_PROCESS_CLUSTER
    )


def _store_bytes(fs, root: str) -> bytes:
    """Every metadata document under a Zarr store (where attributes live)."""
    return b"".join(fs.cat_file(p) for p in fs.find(root) if p.endswith(".json"))


@pytest.mark.slow
def test_process_scan_publishes_both_methods_to_s3(prefect_harness, raw, s3, s3_server):
    import s3fs

    dest = f"{s3}/grains/strain.zarr"
    state = process_scan(source=raw, dest=dest, ccstae=TINY, device="cpu", return_state=True)
    assert state.is_completed(), state.message
    published = state.result()
    assert published["url"] == dest and published["steps"] == {
        "ingest": "written",
        "ccstae": "done",
        "py4dstem": "done",
    }

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server.endpoint, key=s3_server.access_key, secret=s3_server.secret_key
    )
    ds = xr.open_zarr(fs.get_mapper(dest[len("s3://") :]), consolidated=False)
    assert [str(m) for m in ds["method"].values] == ["ccstae", "py4dstem"]
    assert dict(ds.sizes) == {"method": 2, "rx": 12, "ry": 12}
    for name in ("exx", "eyy", "exy", "theta", "valid", "diff_exx", "truth_exx", "virtual_bf"):
        assert name in ds, name
    assert set(ds.attrs["run_keys"]) == {"ccstae", "py4dstem"} and ds.attrs["request_key"]
    assert ds.attrs["input"]["content_sha256"]
    # Each method's reference region is in its record; the top level holds only what they
    # share, and the one model's checkpoint.
    references = {m: ds.attrs["methods"][m]["reference"] for m in ("ccstae", "py4dstem")}
    assert all(r.startswith("auto: ") for r in references.values()), references
    # Both methods find the same automatic region in this scan, so the top level holds it too.
    assert references["ccstae"] == references["py4dstem"]
    assert ds.attrs["reference"] == references["ccstae"]
    assert (
        ds.attrs["model_checkpoint_sha256"]
        == ds.attrs["methods"]["ccstae"]["model_checkpoint_sha256"]
    )

    # The published statistics are those of the published maps against the scan's truth.
    truth = open_truth(published["url"].rsplit("/", 1)[0] + "/grains.zarr")
    errors = strain_errors(ds.sel({"method": "py4dstem"}).load(), truth, symmetry=4)
    assert max(errors[c] for c in ("exx", "eyy", "exy")) < 1.5e-3  # the known answer
    for c in ("exx", "eyy", "exy"):
        assert ds.attrs["statistics"]["mae"]["py4dstem"][c] == pytest.approx(errors[c], rel=1e-6)
    diff = (ds["exx"].sel({"method": "ccstae"}) - ds["exx"].sel({"method": "py4dstem"})).values
    assert np.allclose(
        np.where(np.isfinite(diff), diff, 0), np.nan_to_num(ds["diff_exx"].values), atol=1e-12
    )

    # The CC-ST-AE's checkpoint is kept beside the result in the bucket (for resuming).
    work = fs.find(f"{s3[len('s3://') :]}/grains/.strain.zarr.work")
    assert any(p.endswith("/checkpoint.pt") for p in work)
    for name in ("ccstae", "py4dstem", "comparison", "virtual", "ccstae-bases"):
        assert fs.cat_file(published["pngs"][name][len("s3://") :])[:4] == b"\x89PNG"

    logs, artifacts = _run_logs_and_artifacts(state.state_details.flow_run_id)
    assert "| MAE exx vs truth (1e-3) |" in artifacts and dest in artifacts
    assert "| exx spread in the reference (1e-3) |" in artifacts
    caption = (
        "Coverage of ccstae and py4dstem, their spread in the reference, their agreement, and "
        "their error against the truth"
    )
    assert caption in artifacts
    for method in ("ccstae", "py4dstem"):  # each method's precision, in its record and the table
        spread = ds.attrs["methods"][method]["reference_spread"]
        assert ds.attrs["statistics"]["spread"][method] == spread
        assert 0 < spread["exx"] < 1.5e-3 and spread["positions"] > 10
    # The statistics are keyed by the scan (its own history in the Artifacts page); the maps
    # and the dataset link are this run's.
    keys = [a["key"] for a in json.loads(artifacts)]
    assert keys.count("strain-grains-h5") == 1 and set(keys) == {"strain-grains-h5", None}
    assert "published" in logs
    stored = _store_bytes(fs, dest[len("s3://") :]) + _store_bytes(
        fs, f"{s3[len('s3://') :]}/grains/grains.zarr"
    )
    for secret in (s3_server.secret_key, s3_server.access_key):
        assert secret not in logs and secret not in artifacts and secret.encode() not in stored

    # A rerun of the same request reads what the first run published back from the dataset:
    # the same summary, nothing computed or written (a republication, as before, took a pass
    # over the scan for its virtual images and rewrote the dataset).
    bucket = f"{s3[len('s3://') :]}/grains"
    written = {p: i["LastModified"] for p, i in fs.find(bucket, detail=True).items()}
    rerun = process_scan.with_options(task_runner=_in_process())
    again = rerun(source=raw, dest=dest, ccstae=TINY, device="cpu")
    assert again["steps"] == {"ingest": "skipped", "ccstae": "skipped", "py4dstem": "skipped"}
    assert {**again, "steps": None} == {**published, "steps": None}
    fs.invalidate_cache()
    assert {p: i["LastModified"] for p, i in fs.find(bucket, detail=True).items()} == written

    # A publication that lost a map (a run stopped between the dataset and its PNGs) is
    # published again, from the methods' finished results.
    fs.rm(published["pngs"]["comparison"][len("s3://") :])
    again = rerun(source=raw, dest=dest, ccstae=TINY, device="cpu")
    assert again["steps"] == {"ingest": "skipped", "ccstae": "skipped", "py4dstem": "skipped"}
    assert again["statistics"] == published["statistics"]
    assert fs.cat_file(published["pngs"]["comparison"][len("s3://") :])[:4] == b"\x89PNG"


def test_an_unreachable_store_fails_clearly_and_publishes_nothing(
    prefect_harness, raw, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-but-secret-all-the-same")
    forget_s3_clients()
    state = process_scan(
        source=raw,
        dest="s3://nowhere/grains/strain.zarr",
        methods=["py4dstem"],
        scan_store=str(tmp_path / "scan.zarr"),
        workdir=str(tmp_path / "work"),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(StorageError, match=r"^s3://nowhere/.*cannot be reached") as info:
        state.result()
    assert info.value.transient  # the store may come back: Prefect's retries apply
    assert "not-a-real-secret" not in str(info.value)
    # It failed before any work: nothing ingested, nothing computed.
    assert os.listdir(tmp_path) == []


def test_a_source_that_does_not_exist_fails_in_one_sentence(prefect_harness, tmp_path):
    """A run started from the UI has no command to check its source first: the failed run's
    message (what the UI shows) is one sentence naming the path, not "FileNotFoundError:
    [Errno 2] No such file or directory"; nothing is written."""
    from prefect.client.orchestration import get_client

    missing = tmp_path / "raw" / "scan_042.mib"
    state = process_scan(
        source=str(missing), dest=str(tmp_path / "out" / "strain.zarr"), return_state=True
    )

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(state.state_details.flow_run_id)

    run = asyncio.run(read())
    assert run.state.is_failed()
    assert run.state.message == (
        f"Flow run encountered an exception: InputError: {missing} does not exist; check the path."
    )
    assert os.listdir(tmp_path) == []


def test_a_destination_that_cannot_be_written_fails_before_any_work(prefect_harness, raw, tmp_path):
    """A run started from the UI into a folder it cannot write (inside a file here; a read-only
    disk or another user's folder alike) ingested and mapped the scan before its publication
    said so; its scan store and maps, kept elsewhere, are not even started now."""
    (tmp_path / "notes.txt").write_text("kept")
    dest = tmp_path / "notes.txt" / "strain.zarr"
    state = process_scan(
        source=raw,
        dest=str(dest),
        methods=["py4dstem"],
        scan_store=str(tmp_path / "scan.zarr"),
        workdir=str(tmp_path / "work"),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(InputError) as info:
        state.result()
    assert str(info.value) == (
        f"{dest}: Not a directory; check the path and that you can write there."
    )
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_the_ingest_step_retries_an_unreachable_store_and_not_a_mistake(
    prefect_harness, tmp_path, monkeypatch
):
    """process-scan ingests in its resolve-scan task, which calls the ingest function, not the
    ingest-scan task: it had none of that task's retries, so one dropped connection to the
    object store failed the run. A missing file is still not retried."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.process_scan import resolve_scan
    from stemlib.ingest import IngestOptions

    np.save(tmp_path / "s.npy", np.zeros((2, 2, 8, 8), "uint16"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    forget_s3_clients()
    quick = resolve_scan.with_options(retry_delay_seconds=0)

    @flow
    def two_scans() -> None:
        unreachable = quick.submit(str(tmp_path / "s.npy"), "s3://bucket/s.zarr", IngestOptions())
        missing = quick.submit(str(tmp_path / "no.npy"), str(tmp_path / "m.zarr"), IngestOptions())
        for future in (unreachable, missing):
            future.wait()

    state = two_scans(return_state=True)

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs()
        return [r for r in runs if r.flow_run_id == state.state_details.flow_run_id]

    attempts = {r.state.message.split(": ", 1)[0]: r.run_count for r in asyncio.run(read())}
    assert attempts == {
        "Task run encountered an exception StorageError": 3,  # 1 + 2 retries
        "Task run encountered an exception InputError": 1,
    }


@pytest.mark.slow
def test_a_worker_killed_mid_run_changes_nothing(prefect_harness, raw, tmp_path):
    from distributed import Client

    from flows.runners import dask_runner, local_cluster

    with local_cluster(2) as cluster:
        client = Client(cluster)
        killed: list[int] = []

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                busy = [
                    w
                    for w, tasks in client.processing().items()
                    if any("py4dstem" in t for t in tasks)
                ]
                if busy:
                    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        result = process_scan.with_options(task_runner=dask_runner(cluster.scheduler_address))(
            source=raw,
            dest=str(tmp_path / "rough" / "strain.zarr"),
            methods=["py4dstem"],
            device="cpu",
        )
        killer.join()
        client.close()
    assert killed, "no worker was running the baseline to be killed"
    # The same as the baseline computed in one process, undisturbed, on the same scan store.
    from stemlib.baseline_py4dstem import py4dstem_strain
    from stemlib.io import open_scan

    with dask.config.set(scheduler="threads"):
        calm = py4dstem_strain(open_scan(str(tmp_path / "rough" / "grains.zarr")))
    rough = xr.open_zarr(result["url"]).sel({"method": "py4dstem"}).load()
    for name in ("exx", "eyy", "exy", "theta", "valid"):
        np.testing.assert_array_equal(rough[name].values, calm[name].values[0])


@pytest.mark.slow
def test_recompute_trains_and_maps_again_what_a_rerun_would_skip(prefect_harness, raw, tmp_path):
    """After an upgrade of stemflow, a facility computes its results again with the same
    settings: recompute runs the steps that a rerun skips (the rerun at the end of
    test_process_scan_publishes_both_methods_to_s3) again, and CC-ST-AE trains anew rather than
    resuming its finished model; the scan store is kept."""
    dest = tmp_path / "strain.zarr"
    # The rotation stage and the starting bases alone (a checkpoint all the same): seconds.
    quick = TINY.model_copy(
        update={"epochs": 0, "refine_steps": 0, "template_rounds": 0, "search_angles": 72}
    )
    flow = process_scan.with_options(task_runner=_in_process())
    run = dict(source=raw, dest=str(dest), methods=["ccstae"], ccstae=quick, device="cpu")
    flow(**run)
    [model] = (dest.parent / ".strain.zarr.work").glob("ccstae-model-*")
    (model / "sentinel").write_text("the first run's model folder")
    again = flow(**run, recompute=True)
    assert again["steps"] == {"ingest": "skipped", "ccstae": "done"}
    assert not (model / "sentinel").exists() and (model / "checkpoint.pt").is_file()


def test_a_training_that_refuses_the_scan_is_the_runs_one_sentence(prefect_harness, tmp_path):
    """CC-ST-AE's training refuses a scan it cannot map (here 16 noise-free patterns of the
    beam alone); the flow then asked for the inference's result, which never ran, and failed
    with "UnfinishedRun: Run is in PENDING state" and a traceback instead of the training's
    sentence."""
    from stemlib.calibration import Calibration
    from stemlib.io.scan_store import write_scan

    q = np.hypot(*np.indices((32, 32)) - 16.0)
    beam = (1.0 / (1.0 + np.exp((q - 3.0) / 0.3))).astype(np.float32)  # the direct beam alone
    vacuum = str(tmp_path / "vacuum.zarr")
    write_scan(
        da.from_array(np.broadcast_to(beam, (4, 4, 32, 32)).copy()),
        vacuum,
        calibration=Calibration(),
    )
    state = process_scan(
        source=vacuum,
        dest=str(tmp_path / "out" / "strain.zarr"),
        methods=["ccstae"],
        device="cpu",
        return_state=True,
    )
    assert state.is_failed()
    assert state.message.startswith(
        f"Flow run encountered an exception: InputError: the 16 patterns sampled from {vacuum} "
        "are all the same (a noise-free simulation, or one pattern repeated)"
    )
    assert not (tmp_path / "out" / "strain.zarr").exists()
