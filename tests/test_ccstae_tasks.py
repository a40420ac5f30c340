"""Prefect tasks of the CC-ST-AE, run in a flow under Prefect's test harness (issue 6)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stemlib.ccstae import CCSTAEConfig
from stemlib.results import open_strain
from stemlib.simulate import SimulationConfig, write_simulation
from stemlib.truth import open_truth

from .test_process_scan import _run_logs_and_artifacts

CONFIG = CCSTAEConfig.preset("cpu", epochs=1, channels=4, search_patterns=32, batch_size=16)


def test_tasks_carry_the_gpu_tag():
    from tasks.ccstae import infer_ccstae, train_ccstae

    assert "gpu" in train_ccstae.tags and "gpu" in infer_ccstae.tags


def test_gpu_resources_is_a_no_op_without_cuda():
    import dask
    import torch

    from tasks.ccstae import gpu_resources

    with gpu_resources():
        annotations = dask.get_annotations()
    assert ("resources" in annotations) == torch.cuda.is_available()


def _torch_threads_in_and_after_torch_cores() -> tuple[int, int]:
    import torch

    from tasks.ccstae import torch_cores

    with torch_cores("cpu"):
        inside = torch.get_num_threads()
    return inside, torch.get_num_threads()


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A client of one stemflow local cluster of two workers for the module's tests: each
    cluster of its own cost 10-40 s of the suite to start and to import torch in."""
    from distributed import Client

    from flows.runners import local_cluster

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield client


def test_ccstae_tasks_use_every_core_on_a_one_thread_dask_worker(client):
    """A Dask worker runs torch on one thread (OMP_NUM_THREADS=1); the CC-ST-AE's tasks take
    every core for their block and give them back after it."""
    from stemlib.resources import usable_cores

    if usable_cores() < 2:
        pytest.skip("one core: nothing to tell apart")
    inside, after = client.submit(_torch_threads_in_and_after_torch_cores, pure=False).result()
    assert (inside, after) == (usable_cores(), 1)


def _patterns_read_with_two_loader_workers() -> int:
    import dask.array as da
    import torch

    from stemlib.ccstae.data import PatternStream, Preprocess, loader

    data = da.from_array(np.random.rand(6, 6, 16, 16).astype(np.float32), chunks=(2, 6, 16, 16))
    stream = PatternStream(data, Preprocess("sqrt"), batch_size=8)
    return sum(len(b["pattern"]) for b in loader(stream, num_workers=2, device=torch.device("cpu")))


def test_loader_workers_inside_a_dask_worker(client):
    """The gpu preset reads with DataLoader workers inside a flow's Dask worker: stemflow's
    clusters start their workers non-daemonic, so that they may; on a cluster whose workers are
    daemonic (distributed's default) the patterns are read in the worker itself."""
    import dask
    from distributed import Client

    from flows.runners import local_cluster

    assert client.submit(_patterns_read_with_two_loader_workers, pure=False).result() == 36
    with dask.config.set({"distributed.worker.daemon": True}):
        with local_cluster(n_workers=1) as cluster, Client(cluster) as daemonic:
            assert daemonic.submit(_patterns_read_with_two_loader_workers).result() == 36


def _turn(gpus: int, log: str) -> None:
    """Append to ``log`` when this task is ready, when it holds a GPU lock, and when it lets go.

    Both tasks try for a lock once both are ready. With two GPUs, each holds its own until the
    other holds one too (which it never does if they take turns: then it gives up after 30 s);
    with one GPU, the holder holds half a second more, while the other waits."""
    import os
    import time

    from tasks.ccstae import hold_one

    def note(event: str) -> None:
        with open(log, "a") as file:  # O_APPEND: the two processes' lines never mix
            file.write(f"{event} {os.getpid()}\n")

    def wait_for(count: int, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log) as file:
                if sum(line.startswith(f"{event} ") for line in file) >= count:
                    return
            time.sleep(0.01)

    note("ready")
    wait_for(2, "ready", timeout=60.0)
    with hold_one([f"test-gpu-{i}" for i in range(gpus)]) as index:
        note(f"holds {index}")
        wait_for(2, "holds", timeout=30.0 if gpus == 2 else 0.5)
        note(f"releases {index}")


@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_tasks_on_one_host_take_turns(gpus, tmp_path, client):
    """Two CC-ST-AE tasks on a host with one GPU run one after the other on it; with two GPUs,
    side by side, each on its own: the locks that gpu_turn holds on CUDA (one per GPU), run
    here on the CPU. Judged by the order of the tasks' events, not by the clock."""
    log = tmp_path / "events.log"
    log.touch()
    # one task per worker: the scheduler may give both to one worker, which runs them in turn
    workers = list(client.scheduler_info()["workers"])
    client.gather([client.submit(_turn, gpus, str(log), pure=False, workers=[w]) for w in workers])
    events = [line.split() for line in log.read_text().splitlines() if not line.startswith("ready")]
    order = [(event, index) for event, index, _ in events]
    tasks = [pid for _, _, pid in events]
    if gpus == 1:  # the one lock, held by one task and then by the other
        assert order == [("holds", "0"), ("releases", "0")] * 2, events
        assert tasks[0] == tasks[1] != tasks[2] == tasks[3], events
    else:  # each holds its own lock while the other holds the other
        assert [e for e, _ in order] == ["holds", "holds", "releases", "releases"], events
        assert {index for _, index in order[:2]} == {"0", "1"} and len(set(tasks)) == 2, events


def _held_gpu() -> tuple[str, int]:
    import torch

    from tasks.ccstae import gpu_turn

    with gpu_turn("cuda") as device:
        return str(device), torch.cuda.current_device()


def test_on_cuda_gpu_turn_in_a_dask_worker_yields_the_gpu_it_holds():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from distributed import Client

    from flows.runners import local_cluster

    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        device, current = client.submit(_held_gpu, pure=False).result()
    assert device.startswith("cuda:") and device == f"cuda:{current}"


def test_hold_one_outside_a_dask_worker_holds_nothing():
    import torch

    from tasks.ccstae import gpu_turn, hold_one

    with hold_one(["test-gpu-0"]) as index, gpu_turn("cpu") as device:
        assert index is None and device == torch.device("cpu")


@pytest.mark.usefixtures("prefect_harness")
def test_train_then_infer_in_a_flow(tmp_path):
    from prefect import flow

    from tasks.ccstae import infer_ccstae, train_ccstae

    scan = str(tmp_path / "scan.zarr")
    write_simulation(
        SimulationConfig(
            scan=(6, 6), pattern=80, grains=2, disk_radius_px=2.5, edge_px=0.5, seed=3
        ),
        scan,
    )
    reference = tmp_path / "reference.npy"
    np.save(reference, open_truth(scan)["reference_mask"].values)

    @flow
    def strain_flow() -> tuple[dict, dict]:
        trained = train_ccstae(
            scan, str(tmp_path / "work"), reference=str(reference), config=CONFIG, device="cpu"
        )
        written = infer_ccstae(
            scan,
            str(tmp_path / "strain.zarr"),
            str(tmp_path / "work"),
            reference=str(reference),
            config=CONFIG,
            device="cpu",
        )
        return trained, written

    state = strain_flow(return_state=True)
    trained, written = state.result()
    assert (
        trained["epochs"] == 1
        and written["model_checkpoint_sha256"] == trained["checkpoint_sha256"]
    )
    # each epoch's seconds (the speed benchmark reports the last, and judges it: on CUDA the
    # first compiles); no bound on them here
    assert len(trained["epoch_s"]) == 1 and trained["epoch_s"][0] > 0
    # the progress of each stage, which an operator follows in the UI while it runs
    logs, _ = _run_logs_and_artifacts(state.state_details.flow_run_id)
    assert re.search(r"^ccstae: epoch 1/1  loss [0-9.e-]+  \d+ patterns/s", logs, re.MULTILINE)
    for stage in ("rotation search", "inference", "inference from the neighbours' warps"):
        assert re.search(rf"^ccstae: {stage} 36/36 patterns \(\d+ patterns/s\)$", logs, re.M)
    assert re.search(r"^trained on .*: 1 epochs, final loss [0-9.e-]+, checkpoint", logs, re.M)
    ds = open_strain(str(tmp_path / "strain.zarr"))
    assert list(ds["method"].values) == ["ccstae"] and written["coverage"] == 1.0
    truth = open_truth(scan)
    assert float(np.nanmax(np.abs(ds["exx"].values[0] - truth["exx"].values))) < 2e-3
