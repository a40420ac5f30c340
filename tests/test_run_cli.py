"""``stemflow run`` and ``stemflow demo`` refuse mistakes before any work: one sentence on
stderr, exit status 2, no traceback, nothing written (issue 7). The pipeline itself is tested
through the flow in test_process_scan.py."""

from __future__ import annotations

import os

import pytest

from flows.cli import main

from .test_process_scan import write_raw_scan


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    return write_raw_scan(tmp_path_factory.mktemp("raw") / "grains.h5")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("stemflow run: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference", "20:30,0:4"], "lies outside the scan of 12 x 12 positions"),
        (["--dataset", "/nothing/here"], "has no dataset /nothing/here; pass --dataset with one"),
    ],
)
def test_bad_options_are_refused_before_any_work(raw, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["run", raw, str(out / "strain.zarr"), *extra]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_a_missing_source_is_named(tmp_path, capsys):
    assert main(["run", str(tmp_path / "scan_042.mib"), str(tmp_path / "out" / "strain.zarr")]) == 2
    err = _error(capsys)
    assert "scan_042.mib does not exist" in err
    assert not (tmp_path / "out").exists()


def test_a_destination_holding_something_else_is_refused(raw, tmp_path, capsys):
    (tmp_path / "notes.zarr").write_text("my notes")
    assert main(["run", raw, str(tmp_path / "notes.zarr")]) == 2
    assert "is not a stemflow strain store" in _error(capsys)
    assert (tmp_path / "notes.zarr").read_text() == "my notes"


def test_a_scan_store_source_is_checked_and_never_replaced(tmp_path, capsys):
    from stemlib.io import open_scan
    from stemlib.simulate import SimulationConfig, write_simulation

    store = str(tmp_path / "scan.zarr")
    write_simulation(SimulationConfig(scan=(6, 6), pattern=32, grains=2, seed=1), store)
    assert (
        main(["run", store, str(tmp_path / "out" / "strain.zarr"), "--reference", "8:9,0:2"]) == 2
    )
    assert "lies outside the scan of 6 x 6 positions" in _error(capsys)
    assert main(["run", store, store]) == 2
    assert f"{store} already exists and is not a stemflow strain store" in _error(capsys)
    assert open_scan(store).shape == (6, 6, 32, 32) and sorted(os.listdir(tmp_path)) == [
        "scan.zarr"
    ]


def test_the_demo_scan_is_written_once_with_its_truth(tmp_path):
    import h5py

    from flows.commands.demo import DEMO_SIMULATION, write_demo_scan

    path = write_demo_scan(tmp_path)
    with h5py.File(path) as f:
        assert f["data"].shape == (
            *DEMO_SIMULATION.scan,
            DEMO_SIMULATION.pattern,
            DEMO_SIMULATION.pattern,
        )
        assert {"exx", "eyy", "exy", "theta"} <= {k.removeprefix("truth_") for k in f["truth"]}
    stamp = path.stat().st_mtime_ns
    assert write_demo_scan(tmp_path) == path and path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("command", "preset"),
    [
        (["run", "s.h5", "d.zarr"], "cpu"),
        (["run", "s.h5", "d.zarr", "--preset", "gpu"], "gpu"),
        (["run", "s.h5", "d.zarr", "--device", "cpu"], "cpu"),
        (["demo", "--device", "auto"], "cpu"),  # the demo's recipe on any machine
        (["demo", "--preset", "gpu"], "gpu"),
    ],
)
def test_a_ccstae_config_file_changes_the_chosen_preset(tmp_path, command, preset):
    """``--ccstae-config`` changes the recipe that ``--preset`` (auto: the device's) picks."""
    from flows.cli import build_parser
    from flows.commands.run import method_options
    from stemlib.ccstae import CCSTAEConfig

    config = tmp_path / "ccstae.yaml"
    config.write_text("epochs: 3\n")
    args = build_parser().parse_args([*command, "--ccstae-config", str(config)])
    assert method_options(args)["ccstae"] == CCSTAEConfig.preset(preset, epochs=3)


def test_a_mistake_found_in_a_dask_worker_prints_no_traceback(tmp_path, capfd):
    """NaN patterns are found by the ingest task on a Dask worker, whose task-run log reaches
    the terminal: it says the sentence without Prefect's traceback, and the command ends with
    the same sentence, exit status 2."""
    import numpy as np

    scan = np.ones((4, 4, 16, 16), dtype="float32")
    scan[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", scan)
    dest = tmp_path / "out" / "strain.zarr"
    assert main(["run", str(tmp_path / "nan.npy"), str(dest), "--method", "py4dstem"]) == 2
    err = capfd.readouterr().err
    sentence = (
        f"{tmp_path / 'nan.npy'} holds 256 NaN/Inf pixels in 1 patterns; clean the data, or pass "
        "--allow-nonfinite to store them with their count recorded."
    )
    assert "Traceback" not in err
    assert (
        f"Finished in state Failed('Task run encountered an exception InputError: {sentence}')"
        in err
    )
    assert err.strip().splitlines()[-1] == f"stemflow run: error: {sentence}"
    # nothing published, and nothing half-written: no scan store, no temporary one, no folder
    assert os.listdir(tmp_path) == ["nan.npy"]
