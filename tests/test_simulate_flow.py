"""`stemflow simulate` and the simulate-benchmark flow (issue 4) through Prefect's test harness
on a real Dask LocalCluster."""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError

from flows.cli import main
from flows.simulate_benchmark import PAPER_LEVELS, NoiseLevels, noisy_url
from stemlib.noise import noise_store
from stemlib.truth import open_truth


def leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".zarr") or ".partial-" in p)


def test_paper_levels_and_copy_names():
    assert PAPER_LEVELS == (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
    assert NoiseLevels().levels == list(PAPER_LEVELS) and NoiseLevels().counts == 1e5
    assert os.path.basename(noisy_url("out/sim.zarr", 0.05)) == "sim-noise05.zarr"
    assert os.path.basename(noisy_url("out/sim.zarr", 0.0)) == "sim-noise00.zarr"
    assert os.path.basename(noisy_url("out/sim", 0.7)) == "sim-noise70.zarr"
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        NoiseLevels(levels=[0.1, 1.2])
    with pytest.raises(ValidationError, match="greater than 0"):
        NoiseLevels(counts=0)


def test_cli_simulate_writes_a_scan_with_its_truth(tmp_path, capsys):
    dest = str(tmp_path / "sim.zarr")
    args = [
        "simulate",
        dest,
        "--scan",
        "6,5",
        "--pattern",
        "64",
        "--grains",
        "3",
        "--lattice",
        "hexagonal",
    ]
    assert main([*args, "--max-strain", "0.01", "--max-rot", "20", "--seed", "2", "--quiet"]) == 0
    assert f"wrote {dest}: data (6, 5, 64, 64) float32" in capsys.readouterr().out
    ds = xr.open_zarr(dest)
    assert ds["data"].shape == (6, 5, 64, 64)
    sim = ds.attrs["simulation"]
    assert (sim["lattice"], sim["grains"], sim["max_strain"], sim["max_rot_deg"], sim["seed"]) == (
        "hexagonal",
        3,
        0.01,
        20.0,
        2,
    )
    truth = open_truth(dest)
    assert truth.attrs["symmetry"] == 6
    assert np.abs(truth["theta"].values).max() <= np.radians(20) + 1e-12
    assert (
        main(
            [
                "simulate",
                str(tmp_path / "hard.zarr"),
                "--scan",
                "6,5",
                "--pattern",
                "96",
                "--hard",
                "--quiet",
            ]
        )
        == 0
    )
    assert xr.open_zarr(tmp_path / "hard.zarr").attrs["simulation"]["gradient"] > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--scan", "4,4", "--grains", "17"],
            "grains=17 is more than the 16 probe positions of scan=4,4; use --grains <= 16 or a "
            "larger --scan.",
        ),
        (
            ["--scan", "4,4", "--pattern", "20"],
            "pattern=20 px is too small for the lattice: its disks would (nearly) overlap; use "
            "--pattern >= 29.",
        ),
        (
            ["--scan", "0,4"],
            "--scan: Input should be greater than or equal to 1; correct it and run again.",
        ),
        (
            ["--scan", "4,4", "--max-strain", "0.5"],
            "--max-strain: Input should be less than or equal to 0.1; correct it and run again.",
        ),
        (
            ["--scan", "4,4", "--max-rot", "nan"],
            "--max-rot: Input should be a finite number; correct it and run again.",
        ),
        (
            ["--scan", "4,4", "--levels", "0,1.5"],
            "--levels: Input should be less than or equal to 1; correct it and run again.",
        ),
    ],
)
def test_cli_bad_input_exits_non_zero_with_one_sentence(tmp_path, capsys, flags, message):
    code = main(["simulate", str(tmp_path / "sim.zarr"), *flags, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"stemflow simulate: error: {message}\n"
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_benchmark_flow_on_a_local_cluster(prefect_harness, tmp_path, capsys):
    """`stemflow simulate --levels` runs the flow on a 2-worker LocalCluster: the clean scan and
    one noisy copy per level, each with the truth, byte for byte what one thread writes."""
    dest = str(tmp_path / "sim.zarr")
    args = ["simulate", dest, "--scan", "6,8", "--pattern", "48", "--grains", "3", "--seed", "5"]
    assert (
        main([*args, "--levels", "0,0.05,0.5", "--counts", "1e4", "--noise-seed", "3", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "50 % background: " in out and "sim-noise50.zarr" in out
    assert leftovers(tmp_path) == [
        "sim-noise00.zarr",
        "sim-noise05.zarr",
        "sim-noise50.zarr",
        "sim.zarr",
    ]
    truth = open_truth(dest)
    for level in ("00", "05", "50"):
        copy = xr.open_zarr(tmp_path / f"sim-noise{level}.zarr")
        assert (
            copy.attrs["noise_background"] == int(level) / 100 and copy.attrs["noise_counts"] == 1e4
        )
        xr.testing.assert_identical(open_truth(str(tmp_path / f"sim-noise{level}.zarr")), truth)
    assert xr.open_zarr(tmp_path / "sim-noise50.zarr")["data"].dtype == np.uint16
    # The same copy written here on one thread has the same bytes as the cluster's.
    with dask.config.set(scheduler="threads", num_workers=1):
        here = noise_store(dest, str(tmp_path / "here.zarr"), background=0.5, counts=1e4, seed=3)
    assert (
        xr.open_zarr(tmp_path / "sim-noise50.zarr").attrs["content_sha256"] == here.content_sha256
    )


def test_a_scan_too_large_for_the_machine_is_one_sentence(tmp_path, capsys):
    """numpy's MemoryError was a traceback. 1e14 positions need 728 TiB of truth maps, more
    than a process can address, so no machine's memory settings let the allocation succeed."""
    dest = tmp_path / "huge.zarr"
    assert main(["simulate", str(dest), "--scan", "10000000,10000000", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "stemflow simulate: error: this machine has not enough memory for it (Unable to "
        "allocate 728. TiB for an array with shape (10000000, 10000000) and data type int64); "
        "use a smaller scan, or a machine with more memory.\n"
    )
    assert leftovers(tmp_path) == []
