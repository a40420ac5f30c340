"""Simulated scans (issue 4): disk positions against F^-T g, strain and rotation recovered by an
independent measurement, determinism, truth stored with the scan, streaming and bad input."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from pydantic import ValidationError
from scipy import ndimage

from flows.cli import main
from stemlib.errors import InputError
from stemlib.io.scan_store import intact_scan, open_scan, read_store_attrs
from stemlib.io.storage import locate
from stemlib.metrics import strain_errors
from stemlib.results import combine_methods, strain_dataset
from stemlib.simulate import SimulationConfig, simulate, write_simulation
from stemlib.truth import open_truth

from .conftest import ComputeCounter

# --- an independent measurement: disk centres by iterated, windowed centre of mass ----------


def disk_centre(pattern: np.ndarray, guess, window: float, iterations: int = 8) -> np.ndarray:
    """Centre of mass of the pixels within ``window`` px of the current estimate, iterated: for a
    symmetric disk it converges on the disk's geometric centre, wherever it starts inside."""
    rows, cols = np.indices(pattern.shape, dtype=np.float64)
    c = np.asarray(guess, dtype=np.float64)
    for _ in range(iterations):
        w = pattern * (np.hypot(rows - c[0], cols - c[1]) <= window)
        c = np.array([(w * rows).sum(), (w * cols).sum()]) / w.sum()
    return c


def measured_disks(pattern: np.ndarray, window: float) -> np.ndarray:
    """Centres (K, 2) of every disk found by thresholding, away from the pattern's border."""
    labels, count = ndimage.label(pattern > 0.05 * pattern.max())
    coarse = ndimage.center_of_mass(pattern, labels, range(1, count + 1))
    n = pattern.shape[0]
    keep = [c for c in coarse if min(c) > window + 2 and max(c) < n - window - 3]
    return np.array([disk_centre(pattern, c, window) for c in keep])


def measured_basis(pattern: np.ndarray, window: float, near: np.ndarray) -> np.ndarray:
    """Reciprocal basis (columns g1, g2 as (qx, qy) px) fitted by least squares to all disks.

    The direct beam is the disk nearest the pattern centre; g1, g2 start as the first-order disk
    vectors nearest the columns of ``near`` (this picks the symmetry branch closest to ``near``).
    """
    centres = measured_disks(pattern, window)
    n = pattern.shape[0]
    beam = centres[np.argmin(np.hypot(*(centres - n // 2).T))]
    vectors = centres - beam
    lengths = np.hypot(*vectors.T)
    first = vectors[(lengths > 0) & (lengths < 1.35 * lengths[lengths > 0].min())]
    guess = np.stack([first[np.argmin(np.hypot(*(first - near[:, k]).T))] for k in (0, 1)], 1)
    index = np.rint(vectors @ np.linalg.inv(guess).T)
    basis_t, *_ = np.linalg.lstsq(index, vectors, rcond=None)
    return basis_t.T


def strain_of(F: np.ndarray) -> tuple[float, float, float, float]:
    """exx, eyy, exy, theta of F = V R, written out here (eigen-decomposition of F F^T)."""
    values, vectors = np.linalg.eigh(F @ F.T)
    V = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    R = np.linalg.inv(V) @ F
    return V[0, 0] - 1, V[1, 1] - 1, V[0, 1], math.atan2(R[1, 0], R[0, 0])


def F_from_truth(truth, rx: int, ry: int) -> np.ndarray:
    """F = V R from the stored truth (V = I + e, R the rotation by theta)."""
    e = [float(truth[k][rx, ry]) for k in ("exx", "eyy", "exy", "theta")]
    V = np.array([[1 + e[0], e[2]], [e[2], 1 + e[1]]])
    c, s = math.cos(e[3]), math.sin(e[3])
    return V @ np.array([[c, -s], [s, c]])


# --- known answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("lattice", ["square", "hexagonal", "rectangular"])
def test_disk_centres_match_F_inverse_transpose_g(lattice):
    """Every disk sits at origin + E F^-T g (descan and elliptic distortion on) to < 0.05 px."""
    config = SimulationConfig(
        scan=(6, 6),
        pattern=96,
        grains=4,
        lattice=lattice,
        seed=4,
        descan_px=(3.0, -2.5),
        ellipticity=0.04,
        ellipse_angle_deg=30.0,
    )
    ds = simulate(config)
    truth = ds.rename({f"truth_{k}": k for k in ("exx", "eyy", "exy", "theta")})
    g_ref = np.array(ds.attrs["reciprocal_basis_px"])
    E = np.array(ds.attrs["ellipse_matrix"])
    radius = ds.attrs["disk_radius_px"] * (1 + config.ellipticity / 2)
    worst, checked = 0.0, 0
    for rx, ry in [(0, 0), (5, 5), (0, 5), (2, 3), (4, 1)]:
        pattern = ds["data"][rx, ry].values.astype(np.float64)
        origin = np.array([float(ds["origin_qx"][rx, ry]), float(ds["origin_qy"][rx, ry])])
        g_local = np.linalg.inv(F_from_truth(truth, rx, ry)).T @ g_ref
        for n in np.ndindex(7, 7):
            expected = origin + E @ g_local @ (np.array(n) - 3)
            if min(expected) < radius + 4 or max(expected) > config.pattern - radius - 5:
                continue
            found = disk_centre(pattern, expected + [0.7, -0.6], radius + 2.0)  # start off-centre
            worst = max(worst, float(np.hypot(*(found - expected))))
            checked += 1
    assert checked > 60
    assert worst < 0.05, f"worst disk centre off by {worst:.3f} px"


@pytest.mark.parametrize(
    "lattice, max_rot", [("square", 45.0), ("hexagonal", 30.0), ("rectangular", 30.0)]
)
def test_strain_and_rotation_are_recovered_by_fitting_disk_centres(lattice, max_rot):
    """exx, eyy, exy and theta of every grain, from lattices fitted to measured disk centres."""
    config = SimulationConfig(
        scan=(12, 12), pattern=128, grains=10, lattice=lattice, max_rot_deg=max_rot, seed=7
    )
    ds = simulate(config)
    window = ds.attrs["disk_radius_px"] + 2.0
    reference = np.argwhere(ds["reference_mask"].values)[0]
    g_ref = measured_basis(
        ds["data"][tuple(reference)].values, window, np.array(ds.attrs["reciprocal_basis_px"])
    )
    tol = {"exx": 5e-4, "eyy": 5e-4, "exy": 5e-4, "theta": 5e-4}  # rad for theta
    seen = set()
    for rx, ry in np.ndindex(*config.scan):
        grain = int(ds["grain_id"][rx, ry])
        if grain in seen:
            continue
        seen.add(grain)
        g_local = measured_basis(ds["data"][rx, ry].values, window, g_ref)
        F = np.linalg.inv(g_local @ np.linalg.inv(g_ref)).T  # g_local = F^-T g_ref
        measured = dict(zip(("exx", "eyy", "exy", "theta"), strain_of(F), strict=True))
        for name, value in measured.items():
            true = float(ds[f"truth_{name}"][rx, ry])
            assert value == pytest.approx(true, abs=tol[name]), (grain, name)
            if abs(true) > 3 * tol[name]:
                assert np.sign(value) == np.sign(true), (grain, name)
    assert len(seen) == config.grains
    truths = np.stack([ds[f"truth_{k}"].values.ravel() for k in ("exx", "eyy", "exy", "theta")])
    assert (truths.min(axis=1) < -0.002).all() and (
        truths.max(axis=1) > 0.002
    ).all()  # both signs seen


def test_positive_rotation_turns_the_lattice_from_qx_towards_qy():
    ds = simulate(
        SimulationConfig(scan=(8, 8), pattern=96, grains=5, max_strain=0.0, max_rot_deg=20, seed=2)
    )
    theta = ds["truth_theta"].values
    window = ds.attrs["disk_radius_px"] + 2.0
    for pick in (np.argmax(theta), np.argmin(theta)):
        rx, ry = np.unravel_index(pick, theta.shape)
        assert abs(theta[rx, ry]) > math.radians(5)
        g1 = measured_basis(
            ds["data"][rx, ry].values, window, np.array(ds.attrs["reciprocal_basis_px"])
        )[:, 0]
        # The disk that sat on +qx has moved towards +qy when theta > 0, towards -qy when < 0.
        assert math.atan2(g1[1], g1[0]) == pytest.approx(theta[rx, ry], abs=1e-3)
        assert np.sign(g1[1]) == np.sign(theta[rx, ry])


def test_tensile_strain_moves_disks_towards_the_direct_beam():
    # seed 9: grains with exx from -0.017 to +0.019 (the reference has 0)
    ds = simulate(SimulationConfig(scan=(8, 8), pattern=96, grains=5, max_rot_deg=0.0, seed=9))
    window = ds.attrs["disk_radius_px"] + 2.0
    g_ref = np.array(ds.attrs["reciprocal_basis_px"])
    exx = ds["truth_exx"].values
    for pick, sign in ((np.argmax(exx), 1), (np.argmin(exx), -1)):
        rx, ry = np.unravel_index(pick, exx.shape)
        assert sign * exx[rx, ry] > 0.005
        g1 = measured_basis(ds["data"][rx, ry].values, window, g_ref)[:, 0]
        # Tensile along qx (exx > 0): the first disk along qx is closer to the beam, and
        # compressive (exx < 0) further.
        assert sign * (g_ref[0, 0] - g1[0]) > 0.5 * abs(exx[rx, ry]) * g_ref[0, 0]


def test_hard_settings_take_effect():
    config = SimulationConfig.hard(scan=(10, 10), pattern=96, grains=4, seed=5)
    ds = simulate(config)
    vacuum = ds["grain_id"].values == -1
    assert ds["grain_id"].attrs["long_name"] == "grain index (-1 in vacuum)"
    assert vacuum.sum() == 10  # 10 % of the positions, as one band
    assert (
        np.isnan(ds["truth_exx"].values[vacuum]).all()
        and not ds["reference_mask"].values[vacuum].any()
    )
    assert np.isfinite(ds["truth_exx"].values[~vacuum]).all()
    # In vacuum only the direct beam is left, at the descan-shifted origin.
    rx, ry = np.argwhere(vacuum)[0]
    pattern = ds["data"][rx, ry].values.astype(np.float64)
    origin = np.array([float(ds["origin_qx"][rx, ry]), float(ds["origin_qy"][rx, ry])])
    assert disk_centre(pattern, origin, 8.0) == pytest.approx(origin, abs=0.05)
    span = ds["origin_qx"].values.max() - ds["origin_qx"].values.min()
    assert span == pytest.approx(3.0) and ds["origin_qy"].values[0, 0] - ds["origin_qy"].values[
        0, -1
    ] == pytest.approx(2.0)
    # The gradient inside the disks pulls a disk's centre of mass off its geometric centre.
    smooth = simulate(config.model_copy(update={"gradient": 0.0}))
    crystal = np.argwhere(~vacuum)[0]
    a, b = ds["data"][tuple(crystal)].values, smooth["data"][tuple(crystal)].values
    g = np.array(ds.attrs["reciprocal_basis_px"])
    origin = np.array(
        [float(ds["origin_qx"][tuple(crystal)]), float(ds["origin_qy"][tuple(crystal)])]
    )
    guess = (
        origin
        + np.array(ds.attrs["ellipse_matrix"])
        @ np.linalg.inv(
            F_from_truth(
                ds.rename({f"truth_{k}": k for k in ("exx", "eyy", "exy", "theta")}), *crystal
            )
        ).T
        @ g[:, 0]
    )
    shift = disk_centre(a, guess, 6.0) - disk_centre(b, guess, 6.0)
    assert np.hypot(*shift) > 0.1


def test_vacuum_is_not_scored(tmp_path):
    """A method that answers the truth everywhere it can scores 0 error and full coverage, the
    vacuum (truth NaN) left out; one off by 1e-3 in exx scores exactly that."""
    path = str(tmp_path / "hard.zarr")
    write_simulation(SimulationConfig.hard(scan=(10, 10), pattern=96, grains=4, seed=5), path)
    truth = open_truth(path)
    parts = {k: truth[k].values for k in ("exx", "eyy", "exy", "theta")}
    perfect = strain_dataset("py4dstem", **parts).sel({"method": "py4dstem"})
    errors = strain_errors(perfect, truth, symmetry=truth.attrs["symmetry"])
    assert errors == {"coverage": 1.0, "exx": 0.0, "eyy": 0.0, "exy": 0.0, "theta": 0.0}
    shifted = strain_dataset("py4dstem", **{**parts, "exx": parts["exx"] + 1e-3})
    scored = strain_errors(shifted.sel({"method": "py4dstem"}), truth, symmetry=4)
    assert scored["exx"] == pytest.approx(1e-3) and scored["coverage"] == 1.0
    # ds.sel(method=...) is xarray's matching option and selects nothing: two methods are
    # refused rather than scored together.
    both = combine_methods([perfect.expand_dims(method=["ccstae"]), shifted])
    with pytest.raises(ValueError, match=r"select one first, e.g. ds.sel\(\{\"method\": "):
        strain_errors(both.sel(method="ccstae"), truth, symmetry=4)
    assert strain_errors(both.sel({"method": "ccstae"}), truth, symmetry=4) == errors


# --- truth, storage, determinism, streaming ---------------------------------------------------


@pytest.mark.parametrize("lattice, symmetry", [("square", 4), ("hexagonal", 6), ("rectangular", 2)])
def test_truth_is_stored_with_the_scan(tmp_path, lattice, symmetry):
    config = SimulationConfig(
        scan=(9, 7), pattern=64, grains=5, lattice=lattice, max_rot_deg=180, seed=1
    )
    result = write_simulation(config, str(tmp_path / "sim.zarr"))
    scan = open_scan(str(tmp_path / "sim.zarr"))
    assert scan.shape == (9, 7, 64, 64) and scan.dtype == np.float32 and result.shape == scan.shape
    np.testing.assert_allclose(scan.sum(dim=("qx", "qy")).values, 1.0, atol=2e-6)
    truth = open_truth(str(tmp_path / "sim.zarr"))
    assert truth.attrs["symmetry"] == symmetry
    assert set(truth.data_vars) == {"exx", "eyy", "exy", "theta", "grain_id", "reference_mask"}
    assert truth["exx"].attrs["units"] == "1" and truth["theta"].attrs["units"] == "rad"
    # Rotations are folded into (-pi/n, pi/n]; every grain is present; the reference is unstrained.
    assert (np.abs(truth["theta"].values) <= math.pi / symmetry + 1e-12).all()
    assert sorted(np.unique(truth["grain_id"].values)) == list(range(5))
    ref = truth["reference_mask"].values
    assert ref.any() and len(np.unique(truth["grain_id"].values[ref])) == 1
    for name in ("exx", "eyy", "exy", "theta"):
        assert (truth[name].values[ref] == 0).all()
        assert np.abs(truth[name].values[~ref]).max() > 0
    assert (
        np.abs(np.stack([truth[k].values for k in ("exx", "eyy", "exy")])).max()
        <= 0.02 * (1 + math.sqrt(2)) + 1e-9
    )
    again = simulate(config)
    np.testing.assert_array_equal(truth["exx"].values, again["truth_exx"].values)
    stored = xr.open_zarr(tmp_path / "sim.zarr")
    assert stored.attrs["simulation"]["seed"] == 1 and stored.attrs["origin_px"] == [32.0, 32.0]
    assert stored.attrs["truth_symmetry"] == symmetry and "numpy" in stored.attrs["software"]


def test_a_rerun_skips_a_finished_simulation_and_redoes_a_changed_one(tmp_path, capsys):
    """The same configuration at the same destination is kept, whatever the chunking (it
    changes no byte); another seed is simulated again."""
    dest = str(tmp_path / "sim.zarr")
    config = SimulationConfig(scan=(5, 4), pattern=32, grains=2, seed=1)
    first = write_simulation(config, dest)
    metadata = tmp_path / "sim.zarr" / "zarr.json"
    stamp = metadata.stat().st_mtime_ns
    again = write_simulation(config, dest, chunks=(2, 2))
    assert (first.status, again.status) == ("written", "skipped")
    assert again.as_dict() | {"status": "written"} == first.as_dict()
    assert metadata.stat().st_mtime_ns == stamp
    flags = ["--scan", "5,4", "--pattern", "32", "--grains", "2", "--seed", "1", "--quiet"]
    assert main(["simulate", dest, *flags]) == 0
    assert capsys.readouterr().out.startswith(
        f"{dest} already holds this simulation (same settings and seed): skipped."
    )
    other = write_simulation(config.model_copy(update={"seed": 2}), dest)
    assert other.status == "written" and other.content_sha256 != first.content_sha256


def test_a_simulation_that_lost_a_block_of_its_truth_is_one_sentence_and_written_again(
    tmp_path, caplog
):
    """Zarr reads a missing chunk of a truth map as NaN: a simulated scan whose truth_exx lost
    its chunk (an interrupted copy, an object deleted on a bucket) opened as a good scan, a
    rerun skipped it, and strain was scored against holes in its truth. Every block of every
    array is stored, also one of the fill value only (one grain: grain_id all 0), so that a lost
    one is told apart; the store is refused, and a rerun writes it again."""
    store, config = tmp_path / "sim.zarr", SimulationConfig(scan=(5, 4), pattern=32, grains=1)
    write_simulation(config, str(store))
    truth = open_truth(str(store))
    assert (truth["grain_id"].values == 0).all()  # zarr's fill value for int32, stored
    open_scan(str(store))
    (store / "truth_exx/c/0/0").unlink()
    lost = (
        f"{store} lacks 1 of the 1 blocks that hold its truth_exx (first missing: "
        "truth_exx/c/0/0), which would read as NaN"
    )
    for reader in (open_scan, open_truth):  # the truth is read on its own by scores
        with pytest.raises(InputError) as error:
            reader(str(store))
        assert str(error.value) == (
            f"{lost}; copy the store again from its source, or rerun the command that wrote it "
            "(stemflow ingest, simulate or noise) to write it again."
        )
    location = locate(str(store))
    with caplog.at_level(logging.WARNING, logger="stemlib.io"):
        assert not intact_scan(location, read_store_attrs(location))
    assert caplog.messages == [f"{lost}; writing it again."]
    assert write_simulation(config, str(store)).status == "written"
    xr.testing.assert_identical(open_truth(str(store)), truth)


def test_a_simulation_written_before_every_array_was_counted_checks_only_its_data(tmp_path):
    """Earlier writers stored every block of ``data`` only (``data_blocks``) and no block of a
    map holding only its fill value: their stores open as before, with their data checked."""
    store = tmp_path / "sim.zarr"
    write_simulation(SimulationConfig(scan=(5, 4), pattern=32, grains=1), str(store))
    group = zarr.open_group(store, mode="r+")
    del group.attrs["stored_blocks"]
    zarr.consolidate_metadata(group.store)
    (store / "grain_id/c/0/0").unlink()  # zeros only, which an earlier writer did not store
    location = locate(str(store))
    assert intact_scan(location, read_store_attrs(location))
    assert (open_truth(str(store))["grain_id"].values == 0).all()
    (store / "data/c/0/0/0/0").unlink()
    with pytest.raises(InputError, match=r"lacks 1 of the 1 blocks that hold its patterns"):
        open_scan(str(store))


def test_same_seed_same_bytes_whatever_the_chunks_workers_and_order():
    config = SimulationConfig.hard(scan=(9, 10), pattern=72, grains=4, seed=11)
    with dask.config.set(scheduler="threads", num_workers=1):
        one = simulate(config, chunks=(9, 10))["data"].values
    with dask.config.set(scheduler="threads", num_workers=2):
        two = simulate(config, chunks=(2, 3))["data"].values
    # Chunks computed one by one, last first, then put together.
    data = simulate(config, chunks=(4, 4))["data"].data
    blocks = {
        index: data.blocks[index].compute(scheduler="sync")
        for index in reversed(list(np.ndindex(data.numblocks)))
    }
    rows = [
        np.concatenate([blocks[(i, j, 0, 0)] for j in range(data.numblocks[1])], axis=1)
        for i in range(data.numblocks[0])
    ]
    reversed_order = np.concatenate(rows, axis=0)
    assert one.tobytes() == two.tobytes() == reversed_order.tobytes()
    other = simulate(config.model_copy(update={"seed": 12}))
    assert not np.array_equal(other["truth_exx"].values, simulate(config)["truth_exx"].values)


def test_simulate_is_lazy_and_a_256_cube_is_chunked_for_streaming():
    counter = ComputeCounter()
    with counter:
        ds = simulate(SimulationConfig(scan=(256, 256), pattern=256, grains=40))
    assert counter.count == 0
    data = ds["data"].data
    assert data.shape == (256, 256, 256, 256) and data.nbytes == 2**34
    assert (
        max(np.prod(c) for c in [tuple(max(x) for x in data.chunks)]) * 4 <= 64 * 2**20
    )  # <= 64 MB per chunk
    assert (
        len(data.dask) < 3 * data.npartitions
    )  # one render task (and one parameter slice) per chunk


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import dask
    from stemlib.resources import peak_rss as peak
    from stemlib.simulate import SimulationConfig, write_simulation

    before = peak()
    config = SimulationConfig.hard(scan=(256, 64), pattern=128, grains=6)
    with dask.config.set(scheduler="threads", num_workers=2):
        write_simulation(config, sys.argv[1])
    print(json.dumps({"before": before, "after": peak()}))
    """
)


@pytest.mark.slow
def test_writing_streams_with_a_few_chunks_in_memory(tmp_path):
    """A 1.07 GB simulated scan is written with a few 32 MB blocks in memory at a time (about
    400 MB on 2 threads, the same for a scan 4 times smaller or larger), never the whole scan."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big.zarr")],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    size = 256 * 64 * 128 * 128 * 4
    grew = rss["after"] - rss["before"]
    assert grew < size / 2, f"peak RSS grew by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB scan"
    assert open_scan(str(tmp_path / "big.zarr")).shape == (256, 64, 128, 128)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(scan=(4, 4), grains=17),
            r"grains=17 is more than the 16 probe positions of scan=4,4; use --grains <= 16 or a "
            r"larger --scan\.",
        ),
        (
            dict(scan=(4, 4), pattern=20),
            r"pattern=20 px is too small for the lattice: its disks would \(nearly\) overlap; use "
            r"--pattern >= 29\.",
        ),
        (
            dict(scan=(4, 4), pattern=64, spacing_px=40),
            r"pattern=64 px is too small for the lattice: its first-order disks reach .* px from "
            r"the direct beam and only 31 px fit; use --pattern >= \d+ or a smaller spacing_px\.",
        ),
        (
            dict(scan=(4, 4), spacing_px=10, disk_radius_px=5),
            r"disk_radius_px=5 with edge_px=0.25 is too large for spacing_px=10: neighbouring "
            r"disks would \(nearly\) overlap; use a radius below 3.\d\d px or a larger spacing\.",
        ),
    ],
)
def test_bad_configurations_are_one_sentence(tmp_path, config, message):
    with pytest.raises(InputError, match=message):
        write_simulation(SimulationConfig(**config), str(tmp_path / "bad.zarr"))
    assert list(tmp_path.iterdir()) == []  # nothing published, no partial store


def test_suggested_pattern_size_works():
    # 29 px, the size the error above suggests, is the smallest that holds the lattice.
    with pytest.raises(InputError, match=r"pattern=28 px is too small .* use --pattern >= 29\.$"):
        simulate(SimulationConfig(scan=(4, 4), pattern=28))
    data = simulate(SimulationConfig(scan=(4, 4), pattern=29))["data"].values
    assert data.shape == (4, 4, 29, 29)
    np.testing.assert_allclose(data.sum(axis=(2, 3)), 1.0, rtol=1e-5)  # rendered


def test_field_constraints():
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SimulationConfig(scan=(0, 4))
    with pytest.raises(
        ValidationError, match="Input should be 'square', 'hexagonal' or 'rectangular'"
    ):
        SimulationConfig(lattice="cubic")
    with pytest.raises(ValidationError, match="less than or equal to 0.1"):
        SimulationConfig(max_strain=0.5)
