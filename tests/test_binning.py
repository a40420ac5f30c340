"""Cropping and binning a scan as it is read: stemlib.binning, and --crop, --bin-scan, --bin-q."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from flows.cli import main
from stemlib.binning import binned, binned_calibration, binned_truth, summed_dtype
from stemlib.calibration import Calibration, scan_coords
from stemlib.errors import InputError
from stemlib.ingest import IngestOptions, ingest
from stemlib.io import open_scan
from stemlib.io.export import write_hdf5_scan
from stemlib.truth import open_truth, truth_dataset


def _block_sums(a: np.ndarray, scan: int, q: int) -> np.ndarray:
    """The sums of whole blocks, written out with NumPy (the trailing rest dropped)."""
    rx, ry, qx, qy = (n // f for n, f in zip(a.shape, (scan, scan, q, q), strict=True))
    a = a[: rx * scan, : ry * scan, : qx * q, : qy * q].astype(np.int64)
    return a.reshape(rx, scan, ry, scan, qx, q, qy, q).sum((1, 3, 5, 7))


@pytest.mark.parametrize(("scan", "q"), [(2, 1), (1, 3), (3, 2)])
def test_binning_sums_whole_blocks_lazily_in_a_type_that_holds_them(scan, q, dask_computes):
    # 65,535 is the largest uint16: four of them overflow it, so the sums must widen.
    a = np.random.default_rng(0).integers(0, 2**16, size=(7, 10, 11, 9), dtype=np.uint16)
    a[0, 0] = 2**16 - 1
    lazy = da.from_array(a, chunks=(3, 5, 11, 9))  # chunks that no block size divides
    with dask_computes as counter:
        out = binned(lazy, scan=scan, q=q)
    assert counter.count == 0  # a graph is built, nothing read
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out.compute(), _block_sums(a, scan, q))


@pytest.mark.parametrize(
    ("dtype", "count", "expected"),
    [
        (np.uint8, 4, np.uint16),
        (np.uint8, 1, np.uint8),
        (np.uint16, 4, np.uint32),
        (np.int16, 4, np.int32),
        (np.uint32, 4, np.uint64),
        (np.float16, 4, np.float32),
        (np.float64, 4, np.float64),
    ],
)
def test_summed_type(dtype, count, expected):
    assert summed_dtype(dtype, count) == np.dtype(expected)


@pytest.mark.parametrize("q", [2, 3, 4])
def test_a_binned_pixel_lies_at_the_mean_q_of_the_pixels_it_sums(q):
    """Each binned pixel's coordinate (q from the direct beam, 1/A) is the mean of those of the
    detector pixels it sums: the beam and the pixel size follow the binning."""
    cal = Calibration(q_pixel_size=0.0125, q_pixel_units="1/A", origin_px=(30.25, 27.5))
    fine = scan_coords((1, 1, 60, 60), cal)
    coarse = scan_coords((1, 1, 60 // q, 60 // q), binned_calibration(cal, q=q))
    for name in ("qx", "qy"):
        means = fine[name][1][: 60 // q * q].reshape(-1, q).mean(1)
        np.testing.assert_allclose(coarse[name][1], means, atol=1e-12)
    assert binned_calibration(Calibration(probe_step_nm=0.5), scan=3).probe_step_nm == 1.5


def test_binned_truth_is_kept_where_a_block_lies_in_one_grain():
    # Two grains side by side on a 4 x 6 scan; columns 0-2 grain 0, 3-5 grain 1; blocks of 2
    # put columns 2-3 together: that block spans both grains.
    grain = np.repeat([[0, 0, 0, 1, 1, 1]], 4, axis=0)
    # Grain 1 is turned by almost 45 degrees, either side of the 4-fold lattice's wrap.
    theta = np.where(grain == 1, np.pi / 4 - 0.01, 0.1)
    theta[::2, 4:] = -np.pi / 4 + 0.01
    truth = truth_dataset(
        exx=np.where(grain == 0, 0.01, -0.02),
        eyy=np.full(grain.shape, 0.005),
        exy=np.zeros(grain.shape),
        theta=theta,
        grain_id=grain,
        reference_mask=grain == 0,
        symmetry=4,
    )
    out = binned_truth(truth, 2)
    assert out["truth_exx"].shape == (2, 3)
    np.testing.assert_allclose(out["truth_exx"].values[:, [0, 2]], [[0.01, -0.02]] * 2)
    assert np.isnan(out["truth_exx"].values[:, 1]).all()  # the block across the boundary
    np.testing.assert_array_equal(out["grain_id"].values, [[0, -1, 1]] * 2)
    np.testing.assert_array_equal(out["reference_mask"].values, [[True, False, False]] * 2)
    # The circular mean over the symmetry: +-(pi/4 - 0.01) are 0.02 rad apart, not pi/2.
    turned = out["truth_theta"].values[:, 2]
    np.testing.assert_allclose(np.abs(turned), np.pi / 4, atol=1e-12)
    assert out.attrs["truth_symmetry"] == 4


def test_a_scan_binned_in_a_notebook_is_scored_against_its_binned_truth():
    """Maps of a scan binned with ``stemlib.binned_scan``, scored against the scan's truth, met
    NumPy's "operands could not be broadcast together with shapes (4,3) (8,6)"; strain_errors
    names the truth that fits, and binned_truth makes it from a simulation (its patterns left
    out) or from open_truth's plain names alike."""
    from stemlib import binned_truth as exported
    from stemlib.metrics import strain_errors
    from stemlib.results import strain_dataset
    from stemlib.simulate import SimulationConfig, simulate
    from stemlib.truth import as_truth

    sim = simulate(SimulationConfig(scan=(8, 6), pattern=32, grains=2, seed=1))
    binned = exported(sim, 2)
    assert "data" not in binned and binned["truth_exx"].shape == (4, 3)
    plain = binned_truth(as_truth(sim), 2)
    assert plain.attrs["symmetry"] == 4
    for c in ("exx", "eyy", "exy", "theta"):
        np.testing.assert_array_equal(plain[c].values, binned[f"truth_{c}"].values)
    parts = {c: np.nan_to_num(plain[c].values) for c in ("exx", "eyy", "exy", "theta")}
    maps = strain_dataset("py4dstem", **{**parts, "exx": parts["exx"] + 1e-3})
    assert strain_errors(maps, binned)["exx"] == pytest.approx(1e-3)
    assert strain_errors(maps, plain)["eyy"] == 0
    with pytest.raises(InputError) as info:
        strain_errors(maps, sim)
    assert str(info.value) == (
        "the maps cover 4 x 3 positions and the truth 8 x 6; score them against the truth of "
        "the same positions: stemlib.binned_truth(truth, 2) bins it as "
        "stemlib.binned_scan(scan, scan=2) binned the scan."
    )
    with pytest.raises(InputError, match=r"the truth 7 x 6; .*: crop or bin it as the scan was\.$"):
        strain_errors(maps, sim.isel(rx=slice(0, 7)))


def _raw_with_truth(path, *, shape=(10, 12, 16, 16)):
    """A raw HDF5 scan of Poisson counts with a truth group (two grains, a reference)."""
    rng = np.random.default_rng(1)
    data = rng.poisson(50, size=shape).astype(np.uint16)
    grain = (np.arange(shape[1])[None, :] >= 6).repeat(shape[0], 0).astype(int)
    truth = truth_dataset(
        exx=np.where(grain == 0, 0.0, 0.01),
        eyy=np.where(grain == 0, 0.0, -0.01),
        exy=np.zeros(shape[:2]),
        theta=np.where(grain == 0, 0.0, 0.3),
        grain_id=grain,
        reference_mask=grain == 0,
        symmetry=4,
    )
    write_hdf5_scan(da.from_array(data), path, truth=truth)
    return data


def test_ingest_crops_then_bins_a_raw_file_with_its_calibration_and_truth(tmp_path, capsys):
    data = _raw_with_truth(tmp_path / "raw.h5")
    dest = str(tmp_path / "s.zarr")
    command = ["ingest", str(tmp_path / "raw.h5"), dest, "--quiet"]
    shaping = ["--crop", "1:9,0:12", "--bin-scan", "2", "--bin-q", "3"]
    calibration = ["--origin", "7.0,8.5", "--probe-step-nm", "0.5", "--q-pixel-size", "0.01"]
    assert main([*command, *shaping, *calibration, "--q-pixel-units", "1/A"]) == 0
    out = capsys.readouterr().out
    assert "from the file's (10, 12, 16, 16): cropped to 1:9,0:12, positions binned 2 x 2" in out

    scan = open_scan(dest)
    assert scan.shape == (4, 6, 5, 5) and scan.dtype == np.uint32
    np.testing.assert_array_equal(scan.values, _block_sums(data[1:9], 2, 3))
    # --origin is given in the file's pixels; the store holds it in the binned ones.
    assert scan.attrs["origin_px"] == [2.0, 2.5]
    assert scan.attrs["probe_step_nm"] == 1.0 and scan.attrs["q_pixel_size"] == 0.03
    assert scan.attrs["reader_details"]["source_shape"] == [10, 12, 16, 16]
    truth = open_truth(dest)
    np.testing.assert_array_equal(truth["grain_id"].values, [[0, 0, 0, 1, 1, 1]] * 4)
    np.testing.assert_allclose(truth["theta"].values[:, 3:], 0.3)
    assert truth.attrs["symmetry"] == 4

    assert main([*command, *shaping, *calibration, "--q-pixel-units", "1/A"]) == 0
    assert "skipped" in capsys.readouterr().out
    # Another binning is another scan: not taken for the finished one.
    assert main([*command, "--bin-scan", "2"]) == 2
    assert "already holds a different scan" in capsys.readouterr().err


def test_an_opened_scan_binned_in_a_notebook_is_the_scan_ingest_bins(tmp_path):
    """``stemlib.binned_scan`` of a store, against the store ``ingest --bin-scan --bin-q`` writes
    from the same file: the same counts, type, calibration and coordinates (xarray's own
    ``coarsen(...).sum()`` keeps the unbinned calibration: the beam centre of the file's
    pixels, its probe step)."""
    import xarray as xr

    from stemlib import binned_scan

    _raw_with_truth(tmp_path / "raw.h5", shape=(10, 12, 17, 16))
    calibration = ["--origin", "8.0,7.5", "--probe-step-nm", "0.5", "--q-pixel-size", "0.01"]
    for name, shaping in (("plain", []), ("binned", ["--bin-scan", "2", "--bin-q", "3"])):
        command = ["ingest", str(tmp_path / "raw.h5"), str(tmp_path / f"{name}.zarr"), "--quiet"]
        assert main([*command, *shaping, *calibration, "--q-pixel-units", "1/A"]) == 0
    expected = open_scan(str(tmp_path / "binned.zarr"))
    plain = open_scan(str(tmp_path / "plain.zarr"))
    got = binned_scan(plain, scan=2, q=3)
    assert isinstance(got.data, da.Array) and got.dtype == expected.dtype == np.uint32
    xr.testing.assert_identical(got.coords.to_dataset(), expected.coords.to_dataset())
    np.testing.assert_array_equal(got.values, expected.values)
    for key in ("origin_px", "probe_step_nm", "q_pixel_size", "q_pixel_units"):
        assert got.attrs[key] == expected.attrs[key], key
    assert plain.coarsen(qx=3, qy=3, boundary="trim").sum().attrs["origin_px"] == [8.0, 7.5]
    in_memory = binned_scan(plain.values, scan=5)
    assert isinstance(in_memory.data, np.ndarray) and in_memory.shape == (2, 2, 17, 16)
    for factors, message in (
        (dict(scan=11), r"scan=11 cannot bin the scan of 10 x 12; give 1 to 10\."),
        (dict(q=0), r"q=0 cannot bin the patterns of 17 x 16; give 1 to 16\."),
    ):
        with pytest.raises(InputError, match=message):
            binned_scan(plain, **factors)


def test_plain_reading_options_fingerprint_as_before_cropping_and_binning_existed():
    """Stores and results written before these options (cropping, binning, hot and dead
    pixels) keep their keys: a rerun skips them."""
    fields = {
        "format",
        "dataset",
        "scan_shape",
        "dtype",
        "frame_shape",
        "header_bytes",
        "frame_header_bytes",
        "frame_footer_bytes",
        "calibration",
        "allow_nonfinite",
        "overwrite",
    }
    assert set(IngestOptions().model_dump(mode="json")) == fields
    given = {"crop": "0:4,0:4", "bin_q": 2, "hot_pixels": True, "dead_pixels": True}
    shaped = IngestOptions(**given).model_dump(mode="json")
    assert {k: shaped[k] for k in given} == given and "bin_scan" not in shaped
    assert IngestOptions.model_validate(shaped) == IngestOptions(**given)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--crop", "0:20,0:4"],
            "--crop 0:20,0:4 lies outside {src}'s scan of 10 x 12 positions; give RX0:RX1,RY0:RY1 "
            "with 0 <= RX0 < RX1 <= 10 and 0 <= RY0 < RY1 <= 12.",
        ),
        (
            ["--crop", "0:4,0:4", "--bin-scan", "5"],
            "--bin-scan 5 leaves nothing of {src}'s scan of 4 x 4 (after --crop); give at most 4.",
        ),
        (
            ["--bin-q", "17"],
            "--bin-q 17 leaves nothing of {src}'s patterns of 16 x 16; give at most 16.",
        ),
        (["--crop", "4:2,0:4"], "argument --crop: expected RX0:RX1,RY0:RY1 with RX0 < RX1"),
        (["--bin-q", "0"], "argument --bin-q: expected a whole number of at least 1, got '0'"),
    ],
)
def test_a_crop_or_bin_the_scan_cannot_take_is_one_sentence(tmp_path, capsys, flags, message):
    src = str(tmp_path / "raw.h5")
    _raw_with_truth(src)
    try:
        status = main(["ingest", src, str(tmp_path / "s.zarr"), "--quiet", *flags])
    except SystemExit as stop:  # argparse's own refusal of a flag's form
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert message.format(src=src) in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


def test_run_checks_the_reference_against_the_cropped_scan_and_refuses_to_bin_a_store(
    tmp_path, capsys
):
    src = str(tmp_path / "raw.h5")
    _raw_with_truth(src)
    dest = str(tmp_path / "strain.zarr")
    # The file's scan is 10 x 12; cropped, 4 x 4: a reference of 6 x 6 no longer fits.
    args = ["run", src, dest, "--crop", "0:4,0:4", "--reference", "0:6,0:6"]
    assert main(args) == 2
    assert "--reference 0:6,0:6 lies outside the scan of 4 x 4 positions" in capsys.readouterr().err

    assert main(["ingest", src, str(tmp_path / "s.zarr"), "--quiet"]) == 0
    store = str(tmp_path / "s.zarr")
    expected = (
        f"{store} is a scan store: --crop, --bin-scan, --bin-q, --hot-pixels and --dead-pixels "
        "apply as a raw file is read; pass the raw file as SOURCE, or ingest it with them."
    )
    for command in (
        ["run", store, dest],
        ["noise", store, str(tmp_path / "n.zarr"), "--background", "0.5"],
    ):
        assert main([*command, "--bin-scan", "2"]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "n.zarr").exists() and not (tmp_path / "strain.zarr").exists()


def test_the_form_refuses_an_empty_crop_in_one_sentence():
    """The Prefect form's (and the API's) ``ingest.crop`` is checked as it is read, with the
    sentence the command line gives."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        IngestOptions(crop="8:4,0:8")
    assert (
        "--crop 8:4,0:8 is an empty region; give RX0:RX1,RY0:RY1 with RX0 < RX1 and RY0 < RY1."
        in caught.value.errors()[0]["msg"]
    )


@pytest.mark.parametrize("command", ["run", "reprocess"])
def test_commands_that_keep_a_scan_store_can_replace_one_read_with_other_options(command):
    """A run binned by 2 and then by 4 into the same folder finds its scan store holding the
    other reading: the refusal says to pass --overwrite, which these commands take."""
    from flows.cli import build_parser
    from flows.commands.ingest import options_from_args

    args = build_parser().parse_args([command, "in.h5", "out", "--bin-scan", "4", "--overwrite"])
    assert options_from_args(args) == IngestOptions(bin_scan=4, overwrite=True)


def test_binning_positions_halves_the_strain_error_at_a_low_dose(tmp_path):
    """Known answer: simulated grains (+-2 % strain, turned freely) at 2e4 electrons per pattern
    and 50 % background. Summing 2 x 2 positions quadruples the counts of each pattern, which
    should halve the noise of each strain value; py4DSTEM's error against the binned truth
    (blocks inside one grain) falls accordingly, on every component, with every sign right."""
    import stemlib

    sim = stemlib.simulate(stemlib.SimulationConfig(scan=(16, 16), pattern=64, grains=3, seed=3))
    noisy = stemlib.add_noise(sim["data"].data, background=0.5, counts=2e4, seed=0)
    names = [
        v for v in sim.data_vars if v.startswith("truth_") or v in ("grain_id", "reference_mask")
    ]
    truth = sim[names]
    truth.attrs["truth_symmetry"] = sim.attrs["truth_symmetry"]
    write_hdf5_scan(noisy, tmp_path / "sim.h5", truth=truth)
    errors = {}
    for n in (1, 2):
        dest = str(tmp_path / f"bin{n}.zarr")
        ingest(str(tmp_path / "sim.h5"), dest, IngestOptions(bin_scan=n))
        scan, known = open_scan(dest), open_truth(dest)
        result = stemlib.py4dstem_strain(scan, reference=known["reference_mask"].values)
        ours = result.sel({"method": "py4dstem"})
        errors[n] = stemlib.strain_errors(ours, known)
        assert errors[n]["coverage"] == 1.0
        one = np.isfinite(known["exx"].values)
        for name in ("exx", "eyy", "exy"):  # the sign of every strained grain's component
            big = one & (np.abs(known[name].values) > 0.005)
            assert (np.sign(ours[name].values[big]) == np.sign(known[name].values[big])).all()
    # Measured: exx/eyy/exy/theta 1.10/1.07/0.82/0.74e-3 unbinned, 0.53/0.51/0.42/0.39e-3 binned.
    for name in ("exx", "eyy", "exy", "theta"):
        assert errors[2][name] < 0.65 * errors[1][name], (name, errors)
        assert errors[2][name] < 0.8e-3, (name, errors)
