"""The paper's noise model (issue 4, CONVENTIONS.md section 3): mean and variance against the
model on many patterns, seeding, provenance, truth carried over, and bad input."""

from __future__ import annotations

import math
import os

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from flows.cli import main
from stemlib.calibration import Calibration
from stemlib.errors import InputError
from stemlib.ingest import IngestOptions, ingest, source_key
from stemlib.io.export import write_hdf5_scan
from stemlib.io.scan_store import open_scan, write_scan
from stemlib.io.storage import locate
from stemlib.noise import add_noise, background_pattern, count_dtype, noise_store, paper_scale
from stemlib.simulate import SimulationConfig, simulate, write_simulation
from stemlib.truth import open_truth

from .conftest import ComputeCounter

# One grain and no descan: all 1600 patterns are the same P, so every pixel has 1600 draws.
SAME = SimulationConfig(scan=(40, 40), pattern=40, grains=1, spacing_px=9.0, disk_radius_px=2.0)
N = 1e4
W = 0.5
SCALE = 3.7  # the source is not normalised: the model must divide each pattern by its sum


def lorentzian(n: int, q0: float, normalise: bool = True) -> np.ndarray:
    """B written out pixel by pixel from CONVENTIONS.md (q from fftshift(fftfreq(n)))."""
    q = [(k - n // 2) / n for k in range(n)]  # = fftshift(fftfreq(n)) for even and odd n
    b = np.array([[1.0 / (1.0 + (qx * qx + qy * qy) / q0**2) for qy in q] for qx in q])
    return b / b.sum() if normalise else b


@pytest.fixture(scope="module")
def clean_pattern() -> np.ndarray:
    return simulate(SAME)["data"][0, 0].values.astype(np.float64)


@pytest.fixture(scope="module")
def noisy(clean_pattern) -> np.ndarray:
    source = simulate(SAME)["data"].data * SCALE
    return add_noise(source, background=W, counts=N, seed=2024).compute().astype(np.float64)


def chi_square_ok(samples: np.ndarray, lam: np.ndarray) -> tuple[bool, float, float]:
    """Do per-pixel means and variances of ``samples`` (M, H, W) fit Poisson(lam)?

    Means: sum of ((m - lam) / sqrt(lam / M))^2 over the K pixels is chi-square with K degrees of
    freedom (mean K, sd sqrt(2K)). Variances: the same with Var(s^2) = (lam + 2 lam^2) / M.
    Both must lie within 5 sd of K.
    """
    m = samples.shape[0]
    use = lam > 1e-3
    mean, var = samples.mean(axis=0)[use], samples.var(axis=0, ddof=1)[use]
    lam_u = lam[use]
    k = use.sum()
    chi_mean = float((((mean - lam_u) / np.sqrt(lam_u / m)) ** 2).sum())
    chi_var = float((((var - lam_u) / np.sqrt((lam_u + 2 * lam_u**2) / m)) ** 2).sum())
    bound = 5 * math.sqrt(2 * k)
    return abs(chi_mean - k) < bound and abs(chi_var - k) < bound, chi_mean / k, chi_var / k


def test_background_is_the_lorentzian_of_the_conventions():
    for n in (40, 41, 200):
        np.testing.assert_allclose(background_pattern((n, n)), lorentzian(n, 0.01), rtol=1e-12)
    b = background_pattern((200, 200))
    # q0 = 0.01 cycles/pixel is 2 px at n = 200: half the peak 2 px from the centre, both axes.
    assert b[100, 102] / b[100, 100] == pytest.approx(0.5) and b[98, 100] / b[
        100, 100
    ] == pytest.approx(0.5)
    assert b.sum() == pytest.approx(1.0, abs=1e-12)


# Which model the draws are tested against: only the exact one passes. Each wrong variant is a
# mistake the test must catch (a wrong width, a missing normalisation, an off-centre peak).
VARIANTS = {
    "exact": lambda p, n: N * ((1 - W) * p + W * lorentzian(n, 0.01)),
    "q0 = 0.02": lambda p, n: N * ((1 - W) * p + W * lorentzian(n, 0.02)),
    "q0 = 0.005": lambda p, n: N * ((1 - W) * p + W * lorentzian(n, 0.005)),
    "B not normalised": lambda p, n: N * ((1 - W) * p + W * lorentzian(n, 0.01, normalise=False)),
    "P not normalised": lambda p, n: N * ((1 - W) * SCALE * p + W * lorentzian(n, 0.01)),
    "no (1 - w) on P": lambda p, n: N * (p + W * lorentzian(n, 0.01)),
    "B one pixel off centre": lambda p, n: (
        N * ((1 - W) * p + W * np.roll(lorentzian(n, 0.01), 1, axis=0))
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_noise_mean_and_variance_match_the_model_and_only_it(noisy, clean_pattern, variant):
    """Chi-square on 1600 draws of each of 1600 pixels: the exact model passes, variants fail."""
    lam = VARIANTS[variant](clean_pattern, clean_pattern.shape[0])
    ok, chi_mean, chi_var = chi_square_ok(noisy.reshape(-1, *clean_pattern.shape), lam)
    assert ok == (variant == "exact"), (
        f"{variant}: chi2/K of means {chi_mean:.2f}, of variances {chi_var:.2f}"
    )


def test_dose_model_is_shot_noise_alone(clean_pattern):
    source = simulate(SAME)["data"].data * SCALE
    samples = add_noise(source, background=0, counts=N, seed=3, model="dose").compute()
    assert samples.dtype == np.uint16
    samples = samples.reshape(-1, *clean_pattern.shape).astype(np.float64)
    assert chi_square_ok(samples, N * clean_pattern)[0]
    assert not chi_square_ok(samples, N * (0.9 * clean_pattern + 0.1 * lorentzian(40, 0.01)))[0]
    assert samples.sum(axis=(1, 2)).mean() == pytest.approx(N, rel=0.01)


def test_zero_background_is_the_clean_pattern_without_a_poisson_step():
    source = simulate(SAME)["data"].data
    assert add_noise(source, background=0, counts=N, seed=1) is source


def test_counts_dtype_cannot_overflow():
    assert count_dtype(1e5) == np.uint32  # 1e5 + 20 sqrt(1e5) > 65535
    assert count_dtype(6e4) == np.uint16 and count_dtype(65535) == np.uint32
    assert count_dtype(1e12) == np.uint64
    # A pattern with all its intensity in one pixel: the count is the whole dose.
    one_pixel = np.zeros((1, 1, 8, 8))
    one_pixel[0, 0, 4, 4] = 1.0
    counts = add_noise(
        da.from_array(one_pixel), background=0.0, counts=1e5, seed=0, model="dose"
    ).compute()
    assert counts.dtype == np.uint32 and counts[0, 0, 4, 4] > 65535
    assert paper_scale(1e5) == 0.25 and paper_scale(1e3) == 25.0


def test_same_seed_same_bytes_whatever_the_chunks_workers_and_order():
    clean = simulate(SimulationConfig(scan=(9, 10), pattern=32, grains=3, seed=1))["data"].data
    results = []
    for chunks, workers in (((9, 10), 1), ((2, 3), 2), ((1, 1), 2), ((4, 5), 1)):
        with dask.config.set(scheduler="threads", num_workers=workers):
            results.append(
                add_noise(clean.rechunk((*chunks, 32, 32)), background=0.3, seed=5).compute()
            )
    noisy = add_noise(clean.rechunk((3, 4, 32, 32)), background=0.3, seed=5)
    blocks = {
        i: noisy.blocks[i].compute(scheduler="sync")
        for i in reversed(list(np.ndindex(noisy.numblocks)))
    }
    results.append(
        np.concatenate(
            [
                np.concatenate([blocks[(i, j, 0, 0)] for j in range(noisy.numblocks[1])], 1)
                for i in range(noisy.numblocks[0])
            ],
            0,
        )
    )
    assert all(r.tobytes() == results[0].tobytes() for r in results[1:])
    other = add_noise(clean, background=0.3, seed=6).compute()
    assert not np.array_equal(other, results[0])


def test_add_noise_builds_a_graph_without_computing():
    clean = simulate(SimulationConfig(scan=(8, 8), pattern=32, grains=2))["data"].data
    counter = ComputeCounter()
    with counter:
        add_noise(clean, background=0.5, seed=0)
        add_noise(clean * -1, background=0.5, seed=0)  # bad values are found per block, at compute
    assert counter.count == 0


def test_add_noise_takes_a_numpy_array_or_a_dataarray_and_returns_the_same_kind():
    """Regression: ``add_noise(simulate(...)["data"], ...)`` and ``add_noise(ndarray, ...)`` were
    AttributeErrors ('... has no attribute rechunk'); both give the bytes of the dask path."""
    sim = simulate(SimulationConfig(scan=(3, 4), pattern=32, grains=2, seed=1))
    expected = add_noise(sim["data"].data, background=0.3, seed=5).compute()
    counts = add_noise(sim["data"], background=0.3, seed=5)
    assert isinstance(counts.data, da.Array)  # lazy in, lazy out
    assert counts.dims == ("rx", "ry", "qx", "qy") and counts.attrs["units"] == "counts"
    np.testing.assert_array_equal(counts["qx"], sim["qx"])
    np.testing.assert_array_equal(counts.values, expected)
    in_memory = add_noise(sim["data"].values, background=0.3, seed=5)
    assert isinstance(in_memory, np.ndarray) and in_memory.tobytes() == expected.tobytes()
    with pytest.raises(InputError, match=r"patterns has dims \('qx', 'qy', 'rx', 'ry'\)"):
        add_noise(sim["data"].transpose("qx", "qy", "rx", "ry"), background=0.3, seed=5)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("noise") / "clean.zarr")
    write_simulation(
        SimulationConfig(scan=(6, 5), pattern=48, grains=3, seed=3, descan_px=(2.0, 1.0)), path
    )
    return path


def test_noise_store_records_provenance_and_carries_the_truth(source, tmp_path):
    result = noise_store(source, str(tmp_path / "n.zarr"), background=0.25, counts=1e5, seed=9)
    noisy = xr.open_zarr(tmp_path / "n.zarr")
    clean = xr.open_zarr(source)
    assert noisy["data"].dtype == np.uint32 and noisy["data"].attrs["units"] == "counts"
    assert result.shape == (6, 5, 48, 48)
    a = noisy.attrs
    assert (a["noise_model"], a["noise_background"], a["noise_counts"], a["noise_seed"]) == (
        "background",
        0.25,
        1e5,
        9,
    )
    assert a["paper_scale"] == 0.25 and a["noise_q0"] == 0.01 and a["noise_poisson"] is True
    assert a["source_content_sha256"] == clean.attrs["content_sha256"]
    assert a["source"] == source and a["origin_px"] == clean.attrs["origin_px"]
    assert a["truth_symmetry"] == 4 and "numpy" in a["software"]
    clean_truth, noisy_truth = open_truth(source), open_truth(str(tmp_path / "n.zarr"))
    xr.testing.assert_identical(clean_truth, noisy_truth)
    np.testing.assert_array_equal(noisy["origin_qx"].values, clean["origin_qx"].values)
    totals = noisy["data"].sum(dim=("qx", "qy")).values
    assert totals.mean() == pytest.approx(1e5, rel=0.01)
    # The same request gives the same bytes.
    again = noise_store(source, str(tmp_path / "again.zarr"), background=0.25, counts=1e5, seed=9)
    assert again.content_sha256 == result.content_sha256


#: Per-position maps besides the truth_* ones that a raw file's truth group keeps.
KEPT_MAPS = ("grain_id", "reference_mask")


def test_a_raw_scan_gets_the_noise_its_ingested_store_would(source, tmp_path, capsys):
    """A raw file is read as ``stemflow ingest`` reads it, and no clean store is written: the
    same counts and truth as noise on its ingested store, the file's key as the copy's
    fingerprint, and a rerun skips it."""
    stored = xr.open_zarr(source)
    truth = stored[[v for v in stored.data_vars if v.startswith("truth_") or v in KEPT_MAPS]]
    truth.attrs["truth_symmetry"] = stored.attrs["truth_symmetry"]
    raw = str(write_hdf5_scan(open_scan(source).data, tmp_path / "raw" / "scan.h5", truth=truth))
    ingest(raw, str(tmp_path / "scan.zarr"))
    kwargs = dict(background=0.25, counts=1e5, seed=9)
    via_store = noise_store(str(tmp_path / "scan.zarr"), str(tmp_path / "a.zarr"), **kwargs)
    direct = noise_store(raw, str(tmp_path / "b.zarr"), **kwargs)
    assert direct.status == "written" and direct.content_sha256 == via_store.content_sha256
    xr.testing.assert_identical(open_truth(str(tmp_path / "b.zarr")), open_truth(source))
    attrs = xr.open_zarr(tmp_path / "b.zarr").attrs
    assert attrs["source_key"] == source_key(locate(raw), IngestOptions())
    assert attrs["reader"].startswith("hdf5") and attrs["truth_symmetry"] == 4
    assert os.listdir(tmp_path / "raw") == ["scan.h5"]
    assert noise_store(raw, str(tmp_path / "b.zarr"), **kwargs).status == "skipped"
    # The command line takes the reading options of `stemflow ingest` for a raw SOURCE.
    command = ["noise", raw, str(tmp_path / "c.zarr"), "--background", "0.25", "--seed", "9"]
    assert main([*command, "--dataset", "/nowhere", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(
        f"stemflow noise: error: {raw} has no dataset /nowhere; pass --dataset with one of: "
    )
    assert main([*command, "--probe-step-nm", "0.5", "--quiet"]) == 0
    copy = open_scan(str(tmp_path / "c.zarr"))
    assert copy.attrs["content_sha256"] == direct.content_sha256
    assert copy.attrs["probe_step_nm"] == 0.5 and copy["rx"].attrs["units"] == "nm"


def test_zero_background_store_is_a_clean_copy(source, tmp_path):
    noise_store(source, str(tmp_path / "n0.zarr"), background=0.0)
    copy, clean = open_scan(str(tmp_path / "n0.zarr")), open_scan(source)
    assert copy.dtype == np.float32
    assert copy.values.tobytes() == clean.values.tobytes()
    assert copy.attrs["noise_poisson"] is False and copy.attrs["paper_scale"] == 1.0


def leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".zarr") or ".partial-" in p)


@pytest.fixture
def odd_stores(tmp_path):
    xr.Dataset({"data": (("a", "b"), np.zeros((3, 4)))}).to_zarr(
        tmp_path / "flat.zarr", zarr_format=3
    )
    negative = np.ones((2, 2, 8, 8), np.float32)
    negative[1, 0, 3, 3] = -1.0
    write_scan(da.from_array(negative), str(tmp_path / "negative.zarr"), calibration=Calibration())
    return tmp_path


BAD = [
    (
        "clean.zarr",
        dict(background=1.5),
        r"background=1.5 is outside \[0, 1\]; pass --background W with 0 <= W <= 1",
    ),
    ("clean.zarr", dict(background=-0.1), r"background=-0.1 is outside \[0, 1\]"),
    ("clean.zarr", dict(background=float("nan")), r"background=nan is outside \[0, 1\]"),
    (
        "clean.zarr",
        dict(background=0.5, counts=0),
        r"counts=0 is not a positive dose; pass --counts N > 0",
    ),
    ("clean.zarr", dict(background=0.5, counts=-5.0), r"counts=-5.0 is not a positive dose"),
    ("clean.zarr", dict(background=0.5, counts=float("inf")), r"counts=inf is not a positive dose"),
    (
        "clean.zarr",
        dict(background=0.5, model="dose"),
        r"the dose model has no background, got background=0.5; pass --background 0",
    ),
    (
        "missing.zarr",
        dict(background=0.5),
        r"missing\.zarr does not exist; check the path \(a scan store, or a raw scan in any",
    ),
    (
        "flat.zarr",
        dict(background=0.5),
        r"flat\.zarr is not a scan store: it needs a variable 'data' with dims \(rx, ry, qx, qy\)",
    ),
    (
        "negative.zarr",
        dict(background=0.5),
        r"the pattern at \(rx, ry\) = \(1, 0\) holds negative or non-finite values",
    ),
]


@pytest.mark.parametrize("name, kwargs, message", BAD)
def test_bad_input_is_one_sentence_and_publishes_nothing(source, odd_stores, name, kwargs, message):
    src = source if name == "clean.zarr" else str(odd_stores / name)
    before = leftovers(odd_stores)
    with pytest.raises(InputError, match=message):
        noise_store(src, str(odd_stores / "out.zarr"), **kwargs)
    assert leftovers(odd_stores) == before


def test_destination_equal_to_the_source_is_refused(source):
    with pytest.raises(InputError, match=r"clean\.zarr is the SOURCE; choose another destination"):
        noise_store(source, source, background=0.5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--background", "1.5"],
            "background=1.5 is outside [0, 1]; pass --background W with 0 <= W <= 1 (0.5 is the "
            "paper's 50 % background).",
        ),
        (
            ["--background", "0.5", "--counts", "0"],
            "counts=0.0 is not a positive dose; pass --counts N > 0 (the paper uses 1e5).",
        ),
        (
            ["--background", "0.5", "--seed", "-1"],
            "seed=-1 is not an integer >= 0; pass --seed S with S >= 0.",
        ),
        (
            ["--background", "0.2", "--model", "dose"],
            "the dose model has no background, got background=0.2; pass --background 0 with "
            "--model dose, or use --model background.",
        ),
    ],
)
def test_cli_bad_input_exits_non_zero_with_one_sentence(source, tmp_path, capsys, flags, message):
    code = main(["noise", source, str(tmp_path / "out.zarr"), *flags, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"stemflow noise: error: {message}\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["noise", "simulate"])
def test_cli_never_replaces_what_is_not_a_scan_store(source, tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("my notes")
    args = ["--background", "0.5"] if command == "noise" else ["--scan", "4,4", "--pattern", "32"]
    src = [source] if command == "noise" else []
    assert main([command, *src, str(tmp_path / "notes.txt"), *args, "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"stemflow {command}: error: {tmp_path / 'notes.txt'} already exists and is not a "
        "stemflow scan store, the only thing a run replaces; choose another destination or "
        "remove it.\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "my notes"


def test_cli_writes_the_noisy_store(source, tmp_path, capsys):
    assert (
        main(
            [
                "noise",
                source,
                str(tmp_path / "n.zarr"),
                "--background",
                "0.5",
                "--seed",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "background model, w = 0.5: uint32 counts, N = 100000, seed 4" in out
    assert xr.open_zarr(tmp_path / "n.zarr").attrs["noise_seed"] == 4


def test_a_rerun_skips_a_finished_copy_and_redoes_a_changed_one(tmp_path, capsys):
    """A rerun with the same source content and noise parameters keeps the store (not a byte
    written); another seed, or a source whose content changed, writes it again."""
    clean, dest = str(tmp_path / "clean.zarr"), str(tmp_path / "n.zarr")
    write_simulation(SimulationConfig(scan=(4, 4), pattern=32, grains=2, seed=1), clean)
    first = noise_store(clean, dest, background=0.5, seed=4)
    chunk = next(p for p in (tmp_path / "n.zarr" / "data").rglob("*") if p.is_file())
    stamp = chunk.stat().st_mtime_ns

    again = noise_store(clean, dest, background=0.5, seed=4)
    assert (first.status, again.status) == ("written", "skipped")
    assert again.as_dict() | {"status": "written"} == first.as_dict()
    assert chunk.stat().st_mtime_ns == stamp
    assert main(["noise", clean, dest, "--background", "0.5", "--seed", "4", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(
        f"{dest} already holds this noisy copy (same source content, model, w, N and seed): "
        "skipped."
    )

    other = noise_store(clean, dest, background=0.5, seed=5)
    assert other.status == "written" and other.content_sha256 != first.content_sha256
    write_simulation(SimulationConfig(scan=(4, 4), pattern=32, grains=2, seed=2), clean)
    changed = noise_store(clean, dest, background=0.5, seed=5)
    assert changed.status == "written" and changed.content_sha256 != other.content_sha256


@pytest.mark.s3
def test_simulate_and_noise_on_object_storage(s3):
    """Both steps read and write s3:// stores on a real S3-compatible server; truth travels."""
    clean, noisy = f"{s3}/bench/sim.zarr", f"{s3}/bench/sim-noise50.zarr"
    write_simulation(SimulationConfig(scan=(4, 5), pattern=48, grains=2, seed=2), clean)
    result = noise_store(clean, noisy, background=0.5, counts=1e4, seed=1)
    assert result.url == noisy and open_scan(noisy).dtype == np.uint16
    xr.testing.assert_identical(open_truth(noisy), open_truth(clean))
    assert xr.open_zarr(noisy).attrs["source"] == clean
