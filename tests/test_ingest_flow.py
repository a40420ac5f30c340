"""The ingest flow through Prefect's test harness on a real Dask LocalCluster."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import xarray as xr
from prefect import flow
from prefect.client.orchestration import get_client

from flows.ingest import ingest_flow
from flows.runners import dask_runner
from stemlib.ingest import IngestOptions
from tasks.ingest import ingest_scan

from .conftest import closed_port


def scan(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, (4, 6, 16, 16)).astype("uint16")


async def _task_runs(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=10,
        )


@pytest.mark.slow
def test_ingest_flow_on_a_local_cluster_to_s3(prefect_harness, tmp_path, s3):
    np.save(tmp_path / "s.npy", scan())
    url = f"{s3}/flow/s.zarr"
    runner = dask_runner(n_workers=2)
    state = ingest_flow.with_options(task_runner=runner)(
        source=str(tmp_path / "s.npy"), dest=url, return_state=True
    )
    assert state.is_completed()
    record = state.result()
    assert record["status"] == "written" and record["url"] == url
    np.testing.assert_array_equal(xr.open_zarr(url)["data"].values, scan())
    # The second run finds the finished store.
    again = ingest_flow.with_options(task_runner=runner)(source=str(tmp_path / "s.npy"), dest=url)
    assert again["status"] == "skipped"


def test_storage_errors_are_retried_and_input_errors_are_not(
    prefect_harness, tmp_path, monkeypatch
):
    np.save(tmp_path / "s.npy", scan())
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    quick = ingest_scan.with_options(retry_delay_seconds=0)

    @flow
    def two_ingests() -> None:
        unreachable = quick.submit(str(tmp_path / "s.npy"), "s3://bucket/s.zarr", IngestOptions())
        missing = quick.submit(
            str(tmp_path / "missing.npy"), str(tmp_path / "m.zarr"), IngestOptions()
        )
        for future in (unreachable, missing):
            future.wait()

    state = two_ingests(return_state=True)
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    attempts = {run.state.message.split(": ", 1)[0]: run.run_count for run in runs}
    assert attempts == {
        "Task run encountered an exception StorageError": 3,  # 1 + 2 retries
        "Task run encountered an exception InputError": 1,  # the missing file: once
    }
    assert not (tmp_path / "m.zarr").exists()


def test_only_a_store_that_could_not_be_reached_is_tried_again():
    """Refused credentials and a missing bucket failed three times over about 35 s (two
    retries) before the run said so: nothing changes until the user acts."""
    from prefect.states import Completed, Failed

    from stemlib.errors import InputError, StorageError
    from tasks._retry import retry_on_storage_error

    unreachable = StorageError("s3://b/s.zarr: the object store cannot be reached")
    refused = StorageError(
        "s3://b/s.zarr: the object store refused the credentials", transient=False
    )
    retried = {
        "unreachable": Failed(data=unreachable),
        "refused": Failed(data=refused),
        "mistake": Failed(data=InputError("s.npy does not exist")),
        "done": Completed(data=1),
    }
    assert {k: retry_on_storage_error(None, None, s) for k, s in retried.items()} == {
        "unreachable": True,
        "refused": False,
        "mistake": False,
        "done": False,
    }
