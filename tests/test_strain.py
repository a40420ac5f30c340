"""stemlib.strain's known answers that no method's test reaches: the reference lattice is the
median over its region (CONVENTIONS.md section 2), and a strain re-expressed in turned axes."""

from __future__ import annotations

import numpy as np
import pytest

from stemlib.strain import (
    reference_lattice,
    rotate_strain,
    rotation_matrix,
    strain_from_lattice,
    strain_in_scan_frame,
)

SQUARE = np.array([[20.0, 0.0], [0.0, 20.0]])


def test_the_reference_lattice_is_the_median_so_one_misfit_position_does_not_move_it():
    lattices = np.broadcast_to(SQUARE, (3, 4, 2, 2)).copy()
    lattices[0, 0] = [[22.0, 3.0], [-1.0, 18.0]]  # one misindexed pattern inside the region
    lattices[0, 1] = np.nan  # no answer inside the region: left out
    lattices[2, 3] = SQUARE * 1.25  # outside the region: disks 25 % further out
    region = np.zeros((3, 4), bool)
    region[:2, :3] = True  # 6 positions: 4 on the lattice, 1 misfit, 1 without an answer
    g_ref = reference_lattice(lattices, region)
    np.testing.assert_array_equal(g_ref, SQUARE)  # a mean would be 2 % off in g1
    strain = strain_from_lattice(lattices, g_ref, symmetry=4)
    for key in ("exx", "eyy", "exy", "theta"):
        assert strain[key][1, 2] == pytest.approx(0.0, abs=1e-15), key
    # disks 25 % further out: compressive, 1 / 1.25 - 1 = -0.2 along both axes
    assert strain["exx"][2, 3] == pytest.approx(-0.2) and strain["eyy"][2, 3] == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("strain", "degrees", "expected"),
    [
        # 1 % tensile along qx, seen in axes turned by +30 deg (x' = (cos, sin) in (qx, qy)):
        # exx' = 0.01 cos^2, eyy' = 0.01 sin^2, exy' = -0.01 sin cos.
        ((0.01, 0.0, 0.0), 30.0, (0.0075, 0.0025, -0.01 * np.sin(np.pi / 6) * np.cos(np.pi / 6))),
        # a pure tensor shear is tension along the +45 deg diagonal, compression across it
        ((0.0, 0.0, 0.01), 45.0, (0.01, -0.01, 0.0)),
        ((0.0, 0.0, 0.01), -45.0, (-0.01, 0.01, 0.0)),
    ],
)
def test_strain_in_axes_turned_from_qx_towards_qy(strain, degrees, expected):
    got = rotate_strain(*strain, np.radians(degrees))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("degrees", [30.0, -75.0])
def test_the_scan_frame_strain_is_that_of_the_lattice_seen_in_the_scan_frame(degrees, flip):
    """Turning the strain tensor into the scan's axes (strain_in_scan_frame) gives what the
    lattice itself gives once its disks are put in the scan's axes as py4DSTEM's calibrated
    Bragg vectors are: R (qx, qy), or R (qy, qx) with the flip."""
    rng = np.random.default_rng(4)
    g_ref = np.array([[21.0, -3.0], [2.0, 19.0]])
    F = (np.eye(2) + rng.uniform(-0.03, 0.03, (5, 2, 2))) @ rotation_matrix(
        rng.uniform(-0.5, 0.5, 5)
    )
    g_local = np.linalg.inv(F).swapaxes(-1, -2) @ g_ref  # disks at F^-T g
    R = rotation_matrix(np.radians(degrees))
    to_scan = R @ np.array([[0.0, 1.0], [1.0, 0.0]]) if flip else R
    seen = strain_from_lattice(to_scan @ g_local, to_scan @ g_ref, symmetry=1)
    detector = strain_from_lattice(g_local, g_ref, symmetry=1)
    turned = strain_in_scan_frame(**detector, qr_rotation_deg=degrees, qr_flip=flip)
    for key in ("exx", "eyy", "exy", "theta"):
        np.testing.assert_allclose(turned[key], seen[key], rtol=0, atol=1e-12, err_msg=key)
    assert np.abs(turned["exy"] - detector["exy"]).max() > 1e-3  # the axes did turn


def test_the_scan_frame_follows_py4dstems_qr_rotation():
    """Tension along a direction of the detector is tension along the direction py4DSTEM's
    get_Rvector_from_Qvector gives for it in real space, at its QR rotation."""
    from py4DSTEM.process.calibration.rotation import get_Rvector_from_Qvector

    along = np.array([np.cos(0.3), np.sin(0.3)])  # (qx, qy)
    e = 0.01 * np.outer(along, along)
    turned = strain_in_scan_frame(e[0, 0], e[1, 1], e[0, 1], 0.0, qr_rotation_deg=25.0)
    vx_r, vy_r, _, _ = get_Rvector_from_Qvector(along[0], along[1], 25.0)
    expected = 0.01 * np.outer([vx_r, vy_r], [vx_r, vy_r])
    got = [[turned["exx"], turned["exy"]], [turned["exy"], turned["eyy"]]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
