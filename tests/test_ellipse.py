"""The detector's elliptic distortion: measured on a reference lattice, removed from the strain.

Known answers: lattices drawn through a known ``E`` (any rotation, scale and choice of basis)
must give back its ellipticity and angle; a grain of known strain and rotation seen through
``E`` must give back that strain once ``E`` is removed, and a wrong sign or transpose in the
removal must fail.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest

from stemlib.ellipse import (
    DetectorEllipse,
    detector_distortion,
    ellipse_matrix,
    first_star,
    fit_ellipse,
    undistort,
    undistort_lattice,
)
from stemlib.errors import InputError
from stemlib.reference import region_mean
from stemlib.strain import (
    deformation_from_lattice,
    rotation_matrix,
    strain_from_deformation,
    strain_from_lattice,
)

SQUARE = np.array([[20.0, 0.0], [0.0, 20.0]])
HEXAGONAL = np.array([[20.0, 10.0], [0.0, 10.0 * np.sqrt(3.0)]])


@pytest.mark.parametrize("lattice, n", [(SQUARE, 4), (HEXAGONAL, 6)], ids=["square", "hex"])
@pytest.mark.parametrize("ellipticity", [0.005, 0.03, 0.1])
def test_fit_recovers_a_known_ellipse_at_any_rotation_scale_and_basis(lattice, n, ellipticity):
    rng = np.random.default_rng(3)
    for angle in (-80.0, -25.0, 0.0, 25.0, 61.0, 90.0):
        E = ellipse_matrix(ellipticity, angle)
        for _ in range(4):
            turn = rotation_matrix(rng.uniform(-np.pi, np.pi))
            unimodular = np.array([[1, rng.integers(-2, 3)], [0, 1]]) @ np.array([[0, 1], [1, 0]])
            measured = E @ turn @ lattice * rng.uniform(0.5, 2.0) @ unimodular
            e, a = fit_ellipse(measured, n)
            assert e == pytest.approx(ellipticity, abs=1e-9)
            # the long axis, modulo 180 deg, in (-90, 90]
            assert -90 < a <= 90
            assert np.cos(np.radians(2 * (a - angle))) == pytest.approx(1.0, abs=1e-9)


def test_a_round_lattice_has_no_ellipse():
    e, _ = fit_ellipse(rotation_matrix(0.4) @ HEXAGONAL, 6)
    assert e == pytest.approx(0.0, abs=1e-12)


def test_a_two_fold_lattice_does_not_show_the_ellipse():
    with pytest.raises(InputError, match="a 2-fold lattice does not show the detector's ellipse"):
        first_star(np.diag([20.0, 25.0]), 2)


@pytest.mark.parametrize("lattice, n", [(SQUARE, 4), (HEXAGONAL, 6)], ids=["square", "hex"])
def test_removing_the_ellipse_gives_back_a_known_strain_and_rotation(lattice, n):
    E = ellipse_matrix(0.03, 25.0)
    e = np.array([[0.004, -0.002], [-0.002, -0.003]])
    F = (np.eye(2) + e) @ rotation_matrix(np.radians(25.0))  # a turned, strained grain
    g_ref = rotation_matrix(np.radians(-3.0)) @ lattice  # the reference grain, unstrained
    g = np.linalg.inv(F).T @ g_ref  # g' = F^-T g
    seen, seen_ref = E @ g, E @ g_ref  # both on the elliptic detector
    # Not removed, the ellipse is a strain of several 1e-3
    wrong = strain_from_lattice(seen, seen_ref, symmetry=n)
    assert abs(wrong["exy"] - e[0, 1]) > 3e-3
    # Removed from the lattices or from the deformation, every component comes back
    out = strain_from_lattice(
        undistort_lattice(seen, E), undistort_lattice(seen_ref, E), symmetry=n
    )
    again = strain_from_deformation(undistort(deformation_from_lattice(seen, seen_ref), E))
    for got in (out, again):
        assert got["exx"] == pytest.approx(e[0, 0], abs=1e-12)
        assert got["eyy"] == pytest.approx(e[1, 1], abs=1e-12)
        assert got["exy"] == pytest.approx(e[0, 1], abs=1e-12)
    assert np.degrees(out["theta"]) == pytest.approx(25.0, abs=1e-9)
    # the inverse removal (E^-1 F E) does not give it back
    backwards = strain_from_deformation(
        undistort(deformation_from_lattice(seen, seen_ref), np.linalg.inv(E))
    )
    assert abs(backwards["exy"] - e[0, 1]) > 3e-3


def test_distortion_given_measured_small_or_unmeasurable():
    lattice = ellipse_matrix(0.02, -40.0) @ SQUARE
    E, record = detector_distortion(DetectorEllipse(), 4, lambda: lattice)
    assert record["removed"] and record["how"] == "measured on the reference lattice"
    assert record["ellipticity"] == pytest.approx(0.02) and record["angle_deg"] == pytest.approx(
        -40.0
    )
    np.testing.assert_allclose(E, ellipse_matrix(0.02, -40.0), atol=1e-12)

    E, record = detector_distortion(DetectorEllipse(least=0.05), 4, lambda: lattice)
    assert not record["removed"] and "below least=0.05: not removed" in record["how"]
    np.testing.assert_array_equal(E, np.eye(2))

    def never() -> np.ndarray:
        raise AssertionError("a given ellipse is not measured")

    E, record = detector_distortion(DetectorEllipse(ellipticity=0.01, angle_deg=10.0), 2, never)
    assert record == {"ellipticity": 0.01, "angle_deg": 10.0, "removed": True, "how": "given"}
    np.testing.assert_allclose(E, ellipse_matrix(0.01, 10.0))

    def no_lattice() -> np.ndarray:
        raise InputError("the mean pattern shows no lattice of Bragg disks.")

    E, record = detector_distortion(DetectorEllipse(), 6, no_lattice)
    assert record == {
        "ellipticity": 0.0,
        "angle_deg": 0.0,
        "removed": False,
        "how": "not measured: the mean pattern shows no lattice of Bragg disks.",
    }
    np.testing.assert_array_equal(E, np.eye(2))

    E, record = detector_distortion(DetectorEllipse(), 2, never)
    assert not record["removed"] and record["how"].startswith("not measured: a 2-fold lattice")
    np.testing.assert_array_equal(E, np.eye(2))


def test_region_mean_reads_only_the_chunks_of_the_region():
    import dask.array as da

    values = np.random.default_rng(0).poisson(5.0, (8, 8, 4, 4)).astype(np.uint16)
    data = da.from_array(values, chunks=(4, 4, 4, 4))
    mask = np.zeros((8, 8), bool)
    mask[1:3, 5:7] = True  # inside chunk (0, 1) alone
    reads = []

    def spy(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][:2])
        return block

    with dask.config.set(scheduler="synchronous"):
        mean = region_mean(data.map_blocks(spy, dtype=data.dtype), mask)
    np.testing.assert_allclose(mean, values[mask].mean(axis=0))
    assert reads == [(0, 1)]
