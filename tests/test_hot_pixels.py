"""Hot pixels: found on a sample of the scan, named in a warning, repaired with --hot-pixels."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest

import stemlib
from flows.cli import main
from stemlib.hot_pixels import find_hot_pixels, repair_hot_pixels
from stemlib.io import open_scan
from stemlib.io.export import write_hdf5_scan
from stemlib.simulate import SimulationConfig, simulate
from stemlib.truth import open_truth

#: Hot pixels of the tests: in the background, on the detector's edge and corner, and two
#: side by side (qx, qy) of 64 px patterns.
HOT = [(10, 40), (50, 20), (0, 17), (63, 63), (33, 5), (33, 6)]


def _noisy(lattice: str = "square", seed: int = 3) -> tuple[np.ndarray, object]:
    """A simulated 16 x 16 scan of 64 px (counts at 2e4 electrons, 50 % background), its sim."""
    sim = simulate(
        SimulationConfig(scan=(16, 16), pattern=64, grains=3, lattice=lattice, seed=seed)
    )
    counts = stemlib.add_noise(sim["data"].data, background=0.5, counts=2e4, seed=0)
    return np.asarray(counts.compute()), sim


def _with_hot(counts: np.ndarray, level: int) -> np.ndarray:
    out = counts.astype(np.int64)
    for qx, qy in HOT:
        out[..., qx, qy] += level
    return out.astype(np.uint16)


@pytest.mark.parametrize("level", [20, 500])
def test_hot_pixels_are_found_on_the_edge_side_by_side_and_nowhere_else(level):
    counts, _ = _noisy()
    found = find_hot_pixels(da.from_array(_with_hot(counts, level), chunks=(4, 16, 64, 64)))
    assert sorted(map(tuple, found.tolist())) == sorted(HOT)


@pytest.mark.parametrize(
    ("lattice", "pattern", "noisy"),
    list(itertools.product(("square", "hexagonal"), (64, 128), (0, 1))),
)
def test_no_bragg_disk_or_direct_beam_is_taken_for_a_hot_pixel(lattice, pattern, noisy):
    """The simulator's peaked direct beam (3.2 times its neighbours) and its disks, clean (tails
    of nothing at the detector's edge) and with the paper's noise."""
    sim = simulate(SimulationConfig(scan=(12, 12), pattern=pattern, grains=4, lattice=lattice))
    data = sim["data"].data
    if noisy:
        data = stemlib.add_noise(data, background=0.5, seed=1)
    assert find_hot_pixels(data).tolist() == []


def test_no_pixel_of_the_multislice_scans_is_hot():
    """Realistic patterns (abTEM multislice; clean, noisy, and 1,000 electrons per pattern)."""
    from stemlib.devdata import abtem_dev_path, read_abtem_dev
    from stemlib.errors import InputError

    names = [
        f"dev_{s}_32x32_128px_12grains_{seed}_{kind}"
        for s, seed in (("si001", "seed11"), ("ws2", "seed12"))
        for kind in ("clean", "auto4dstem50")
    ] + ["dev_si001_32x32_128px_12grains_seed11_dose1000"]
    for name in names:
        try:
            path = abtem_dev_path(name)
        except InputError:  # a clone outside the workplace, without ../shared/data
            pytest.skip(f"{name} is not in the shared data folder")
        assert find_hot_pixels(da.asarray(read_abtem_dev(path).data)).tolist() == [], name


def test_only_the_sampled_chunks_are_read():
    """A scan of 1,024 chunks of 16 patterns: the mean of 256 patterns reads 16 of them."""
    read = []

    def chunk(block_info=None):
        read.append(block_info[None]["chunk-location"])
        return np.random.default_rng(len(read)).poisson(3.0, (4, 4, 16, 16)).astype(np.uint16)

    scan = da.map_blocks(chunk, chunks=((4,) * 32, (4,) * 32, (16,), (16,)), dtype=np.uint16)
    find_hot_pixels(scan)
    assert len(read) == 16 and len(set(read)) == 16


def test_repair_takes_the_median_of_the_neighbours_that_are_not_hot():
    block = np.arange(2 * 5 * 5, dtype=np.uint16).reshape(2, 1, 5, 5)
    block[..., 2, 2] = block[..., 2, 3] = 60000  # two hot pixels side by side
    block[..., 0, 0] = 60000  # and one in the corner
    hot = np.array([[2, 2], [2, 3], [0, 0]])
    fixed = repair_hot_pixels(da.from_array(block, chunks=(1, 1, 5, 5)), hot).compute()
    assert fixed.dtype == np.uint16
    for p in range(2):
        image = block[p, 0].astype(float)
        # (2, 2): its neighbours but (2, 3); the median of 7 values.
        near = [image[i, j] for i in (1, 2, 3) for j in (1, 2, 3) if (i, j) not in ((2, 2), (2, 3))]
        assert fixed[p, 0, 2, 2] == np.rint(np.median(near))
        # (0, 0): the three neighbours inside the detector.
        assert fixed[p, 0, 0, 0] == np.rint(np.median([image[0, 1], image[1, 0], image[1, 1]]))
        untouched = np.ones((5, 5), bool)
        untouched[[2, 2, 0], [2, 3, 0]] = False
        np.testing.assert_array_equal(fixed[p, 0][untouched], block[p, 0][untouched])


def test_hot_pixels_spoil_the_strain_and_repaired_they_do_not(tmp_path, capsys):
    """Known answer: py4DSTEM on simulated grains with six hot pixels of 500 counts (the
    direct beam reads about 1,100 at its centre) against the same scan without them; ingested
    with --hot-pixels the error is the clean scan's. Without it, a warning names them."""
    counts, sim = _noisy()
    names = [
        v for v in sim.data_vars if v.startswith("truth_") or v in ("grain_id", "reference_mask")
    ]
    truth = sim[names]
    truth.attrs["truth_symmetry"] = sim.attrs["truth_symmetry"]
    errors = {}
    for case, data, flags in (
        ("clean", counts.astype(np.uint16), []),
        ("hot", _with_hot(counts, 500), []),
        ("repaired", _with_hot(counts, 500), ["--hot-pixels"]),
    ):
        raw, dest = tmp_path / f"{case}.h5", str(tmp_path / f"{case}.zarr")
        write_hdf5_scan(da.from_array(data), raw, truth=truth)
        assert main(["ingest", str(raw), dest, "--quiet", *flags]) == 0
        out, err = capsys.readouterr()
        known = open_truth(dest)
        result = stemlib.py4dstem_strain(open_scan(dest), reference=known["reference_mask"].values)
        errors[case] = stemlib.strain_errors(result.sel({"method": "py4dstem"}), known)
        details = open_scan(dest).attrs["reader_details"]
        if case == "hot":
            assert (
                f"stemflow ingest: warning: {raw}: 6 detector pixels read over five times their "
                "neighbours in the mean pattern (hot pixels, at qx, qy (0, 17), (10, 40), (33, 5), "
                "(33, 6), (50, 20), ...); pass --hot-pixels to replace them by their neighbours' "
                "median in every pattern."
            ) in err
            assert details["hot_pixels_repaired"] is False and len(details["hot_pixels"]) == 6
        else:
            assert "warning" not in err
        if case == "repaired":
            assert "repaired 6 hot pixels, at qx, qy (0, 17), (10, 40)" in out
            assert details["hot_pixels_repaired"] is True
    # Measured: exx/eyy/exy 1.10/1.07/0.82e-3 clean, several times that with the hot pixels.
    for name in ("exx", "eyy", "exy"):
        assert errors["hot"][name] > 2 * errors["clean"][name], (name, errors)
        assert errors["repaired"][name] == pytest.approx(errors["clean"][name], rel=0.05), name
