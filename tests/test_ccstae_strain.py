"""CC-ST-AE warps -> strain in CONVENTIONS.md's convention (issue 6).

Patterns of known deformation ``F`` are drawn here with an independent renderer (disks at
``F^-T g``); the rotation stage and the registration find each warp onto the unstrained
pattern; :func:`strain_from_affine` must return ``V - I`` and ``theta`` of ``F = V R``. Each case
moves one component with a sign, so a sign error or an x/y swap fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemlib.ccstae.affine import rotation
from stemlib.ccstae.refine import refine_affine
from stemlib.ccstae.rotation import correlate_angles, polar_features
from stemlib.ccstae.strain import (
    base_lattice_from_reference,
    deformation_from_affine,
    refine_correction,
    remove_ellipse,
    strain_from_affine,
    strain_from_warps,
    symmetric_correction,
)
from stemlib.ellipse import DetectorEllipse, ellipse_matrix
from stemlib.masks import ring_mask
from stemlib.strain import rotation_matrix, strain_from_deformation

N = 96
CENTER = (48.0, 48.0)


def render(F: np.ndarray, *, spacing: float = 13.0, radius: float = 3.0) -> np.ndarray:
    """A square-lattice pattern (N, N) with disks at ``F^-T g``, soft edges, |g|-falloff."""
    g_ref = np.array([[spacing, 0.0], [0.0, spacing]])
    g = np.linalg.inv(F).T @ g_ref
    rows, cols = np.indices((N, N), dtype=np.float64)
    out = np.zeros((N, N))
    for i in range(-5, 6):
        for j in range(-5, 6):
            q = g @ np.array([i, j])
            r = np.hypot(rows - CENTER[0] - q[0], cols - CENTER[1] - q[1])
            out += np.exp(-spacing * np.hypot(i, j) / 40) / (1 + np.exp((r - radius) / 0.4))
    return out


CASES = {
    "tensile along qx": np.diag([1.02, 1.0]),
    "compressive along qy": np.diag([1.0, 0.985]),
    "positive tensor shear": np.array([[1.0, 0.012], [0.012, 1.0]]),
    "rotation +20 deg": rotation_matrix(np.radians(20.0)),
    "rotation -35 deg with strain": rotation_matrix(np.radians(-35.0))
    @ np.array([[1.015, -0.008], [-0.008, 0.99]]),
    "rotation 95 deg folds to 5 deg": rotation_matrix(np.radians(95.0)) @ np.diag([0.99, 1.01]),
}


@pytest.fixture(scope="module")
def recovered():
    Fs = [np.eye(2), *CASES.values()]
    x = torch.tensor(np.stack([render(F) for F in Fs]), dtype=torch.float32)[:, None]
    base = x[:1]
    radii = (6.0, 44.0)
    # The rotation stage: the polar correlation with the reference finds any angle.
    template = polar_features(base, center=CENTER, radii=radii, n_angles=720)[0]
    theta, _ = correlate_angles(
        polar_features(x, center=CENTER, radii=radii, n_angles=720), template
    )
    mask = torch.from_numpy(ring_mask((N, N), inner=radii[0], outer=radii[1])).float()
    fit = refine_affine(
        x,
        base.expand(len(Fs), -1, -1, -1),
        rotation(theta),
        torch.zeros(len(Fs), 2),
        mask,
        center=CENTER,
        steps=15,
    )
    A = fit["matrix"].numpy()[None]  # a scan of shape (1, 1 + cases)
    reference = np.zeros((1, len(Fs)), bool)
    reference[0, 0] = True
    strain, F = strain_from_affine(A, reference=reference, symmetry=4)
    return strain, F, Fs


@pytest.mark.parametrize("index, name", list(enumerate(CASES, start=1)))
def test_known_deformation_is_recovered_with_every_sign(recovered, index, name):
    strain, _, Fs = recovered
    truth = strain_from_deformation(Fs[index], symmetry=4)
    for key in ("exx", "eyy", "exy"):
        # 4e-4: a disk cut by the ring's edge biases a registration by up to 2 % of the strain.
        assert abs(strain[key][0, index] - truth[key]) < 4e-4, (
            name,
            key,
            strain[key][0, index],
            truth[key],
        )
    assert abs(np.degrees(strain["theta"][0, index] - truth["theta"])) < 0.03, name


def test_signs_are_those_of_conventions_md(recovered):
    strain, _, _ = recovered
    # Tensile along qx: disks move towards the beam along rows -> exx > 0, eyy ~ 0.
    assert strain["exx"][0, 1] > 0.015 and abs(strain["eyy"][0, 1]) < 1e-3
    # Compression along qy -> eyy < 0 only.
    assert strain["eyy"][0, 2] < -0.01 and abs(strain["exx"][0, 2]) < 1e-3
    # Rotation from +qx towards +qy is positive, and 95 deg is 5 deg for a 4-fold lattice.
    assert np.degrees(strain["theta"][0, 4]) == pytest.approx(20.0, abs=0.03)
    assert np.degrees(strain["theta"][0, 6]) == pytest.approx(5.0, abs=0.03)


def test_reference_is_zero_strain(recovered):
    strain, F, _ = recovered
    np.testing.assert_allclose(F[0, 0], np.eye(2), atol=1e-12)
    assert all(abs(strain[k][0, 0]) < 1e-12 for k in ("exx", "eyy", "exy", "theta"))


def test_branches_of_a_symmetric_base_give_the_same_strain():
    # A pattern matched to the (unstrained, 4-fold) base through any symmetry S: A = F^-T S.
    rng = np.random.default_rng(0)
    # Any F with positive determinant: a rotation of a general (not symmetric) small stretch.
    F = rotation_matrix(rng.uniform(-np.pi, np.pi, (6, 7))) @ (
        np.eye(2) + rng.uniform(-0.02, 0.02, (6, 7, 2, 2))
    )
    S = rotation_matrix(np.pi / 2 * rng.integers(0, 4, (6, 7)))
    reference = np.zeros((6, 7), bool)
    reference[:2, :3] = True
    F[reference] = rotation_matrix(0.0)
    A = np.swapaxes(np.linalg.inv(F), -1, -2) @ S
    strain, _ = strain_from_affine(A, reference=reference, symmetry=4)
    truth = strain_from_deformation(F, symmetry=4)
    for key in ("exx", "eyy", "exy", "theta"):
        np.testing.assert_allclose(strain[key], truth[key], atol=1e-12)


def test_deformation_of_a_singular_warp_is_nan():
    A = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.5, 1.0]], [[np.nan, 0.0], [0.0, 1.0]]])
    F = deformation_from_affine(A)
    assert np.all(np.isfinite(F[0])) and np.all(np.isnan(F[1])) and np.all(np.isnan(F[2]))


def test_reference_without_valid_answer_is_an_input_error():
    from stemlib.errors import InputError

    A = np.full((2, 2, 2, 2), np.nan)
    with pytest.raises(InputError, match="reference region holds no position"):
        strain_from_affine(A, reference=np.ones((2, 2), bool), symmetry=4)


def _deformation(exx: float, eyy: float, exy: float, degrees: float) -> np.ndarray:
    """F = V R with V = I + e (CONVENTIONS.md): the truth written out."""
    return (np.eye(2) + np.array([[exx, exy], [exy, eyy]])) @ rotation_matrix(np.radians(degrees))


def test_the_reference_is_the_median_so_one_misfit_warp_in_it_moves_nothing():
    """CONVENTIONS.md: the reference is the median over its region. One of the region's six
    positions has a warp 5 % off (a misfit of the network): the others stay at zero strain and
    a strained, turned position keeps its known strain, sign by sign (a mean moves them by 8e-3)."""
    F = np.broadcast_to(np.eye(2), (3, 3, 2, 2)).copy()
    F[0, 0] = _deformation(0.05, -0.03, 0.02, 0.0)  # the misfit, inside the region
    F[2, 1] = _deformation(0.012, -0.007, 0.004, 10.0)
    reference = np.zeros((3, 3), bool)
    reference[:2] = True
    A = np.linalg.inv(F).swapaxes(-1, -2)  # base disks at g sit at F^-T g
    strain, _ = strain_from_affine(A, reference=reference, symmetry=4)
    on_lattice = reference.copy()
    on_lattice[0, 0] = False
    for key in ("exx", "eyy", "exy", "theta"):
        assert np.abs(strain[key][on_lattice]).max() < 1e-12, key
    got = [strain[key][2, 1] for key in ("exx", "eyy", "exy", "theta")]
    np.testing.assert_allclose(got, [0.012, -0.007, 0.004, np.radians(10.0)], rtol=0, atol=1e-12)


def test_a_reference_grain_on_the_branch_boundary_is_folded_about_its_own_rotation():
    """A square reference grain turned by 45 deg sits on the boundary of (-45, 45]: its
    positions' rotations, 44.6 to 45.4 deg, fold to both ends. Folded about the region's mean
    rotation (the module's promise) they stay one lattice: the region has zero strain and a
    grain turned 10 deg further keeps its known strain; folded about 0, their median is a
    lattice 0.17 % off, and that is on every position."""
    turns = [44.6, 44.8, 45.0, 45.2, 45.4]
    F = np.stack(
        [
            [_deformation(0.0, 0.0, 0.0, d) for d in turns],
            [_deformation(0.012, -0.007, 0.004, 55.0)] * 5,
        ]
    )
    reference = np.zeros((2, 5), bool)
    reference[0] = True
    strain, _ = strain_from_affine(
        np.linalg.inv(F).swapaxes(-1, -2), reference=reference, symmetry=4
    )
    for key in ("exx", "eyy", "exy"):
        assert np.abs(strain[key][0]).max() < 1e-12, key
    np.testing.assert_allclose(np.degrees(strain["theta"][0]), np.subtract(turns, 45.0), atol=1e-9)
    expected = {"exx": 0.012, "eyy": -0.007, "exy": 0.004, "theta": np.radians(10.0)}
    for key, value in expected.items():
        np.testing.assert_allclose(strain[key][1], value, rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("lattice, expected", [("square", 4), ("hexagonal", 6), ("rectangular", 2)])
def test_symmetry_is_detected_from_a_base(lattice, expected):
    from stemlib.ccstae.pipeline import _base_symmetry
    from stemlib.simulate import SimulationConfig, simulate

    config = SimulationConfig(
        scan=(2, 2), pattern=96, grains=1, lattice=lattice, max_strain=0.0, max_rot_deg=30.0, seed=1
    )
    pattern = np.sqrt(simulate(config)["data"][0, 0].values)
    noise = 0.05 * pattern.max() * np.random.default_rng(0).random(pattern.shape)
    for base in (pattern, pattern + noise):
        symmetry, _ = _base_symmetry(base, center=(48.0, 48.0), radii=(6.0, 44.0), beam=2.4)
        assert symmetry == expected


#: The demo's learned base: 1.4 % off square along a diagonal, which turns ``g1`` by 0.8 deg.
SKEWED = np.array([[1.0, 0.014], [0.014, 1.0]]) @ rotation_matrix(np.radians(0.3))
SQUARE = np.diag([15.8, 15.8])


def _warps(
    grains: list[np.ndarray], grain: np.ndarray, branch: np.ndarray, base: np.ndarray = SKEWED
) -> np.ndarray:
    """Warps ``A = F^-T R_k D^-1`` (base disks at ``D g0``, pattern disks at ``F^-T g0``, for any
    square ``g0``) of positions with the given grain and branch k, shape (RX, RY, 2, 2)."""
    F = np.stack(grains)[grain]
    R = rotation_matrix(np.pi / 2 * branch)
    return np.linalg.inv(F).swapaxes(-1, -2) @ R @ np.linalg.inv(base)


def test_a_distorted_base_gives_one_strain_on_every_branch():
    """A learned base that is 1 % off square (disks at ``B g0``) while the network puts the
    positions of one grain on different 90-degree branches: the warps ``A`` differ by the
    base's symmetry ``B S B^-1``. Uncorrected, the branches disagree by ~1 % strain; measured
    from the base's disks and refined on the scan, ``B`` brings every position to the truth."""
    rng = np.random.default_rng(3)
    B = np.array([[1.006, 0.004], [0.004, 0.994]])  # the base's distortion from square
    g0 = np.array([[14.0, 0.0], [0.0, 14.0]])  # ideal square reciprocal basis
    truth = {
        "left": rotation_matrix(np.radians(8.0)) @ np.array([[1.012, 0.004], [0.004, 0.995]]),
        "right": np.eye(2),  # the unstrained reference grain
    }
    grains = [truth["left"], truth["right"]]
    grain = np.broadcast_to(np.arange(12) >= 5, (12, 12)).astype(int)
    A = _warps(grains, grain, rng.integers(4, size=grain.shape), B)
    A += rng.normal(0, 2e-5, A.shape)
    F_true = np.stack(grains)[grain]
    reference = np.zeros((12, 12), bool)
    reference[:, 7:] = True
    expected = strain_from_deformation(F_true, symmetry=4)

    plain, _ = strain_from_affine(A, reference=reference, symmetry=4)
    assert np.abs(plain["exx"] - expected["exx"]).max() > 5e-3  # the failure this guards

    measured = symmetric_correction(B @ g0 + rng.normal(0, 0.03, (2, 2)), 4)
    refined = refine_correction(A, measured, np.ones((12, 12), bool), symmetry=4)
    strain, _ = strain_from_affine(A, reference=reference, symmetry=4, correction=refined)
    for c in ("exx", "eyy", "exy", "theta"):
        assert np.abs(strain[c] - expected[c]).max() < 2e-4, c


def test_a_refinement_larger_than_most_keeps_the_measured_correction():
    """On the simulator's hard scans a 3 % elliptic detector distortion, which no base
    distortion explains, led the refinement to a false 8 % B and grain errors of 4-19 %. A
    refinement beyond ``most`` is therefore not trusted: the measured B0 is kept."""
    rng = np.random.default_rng(3)
    B = np.array([[1.006, 0.004], [0.004, 0.994]])  # a real 0.6 % distortion of the base
    grains = [np.eye(2), rotation_matrix(np.radians(8.0)) @ np.diag([1.01, 0.99])]
    grain = np.broadcast_to(np.arange(12) >= 6, (12, 12)).astype(int)
    A = _warps(grains, grain, rng.integers(4, size=grain.shape), B)
    B0 = symmetric_correction(B @ np.diag([14.0, 14.0]) + rng.normal(0, 0.03, (2, 2)), 4)
    everywhere = np.ones((12, 12), bool)
    refined = refine_correction(A, B0, everywhere, symmetry=4)
    step = np.abs(np.linalg.solve(B0, refined) - np.eye(2)).max()
    assert 0 < step < 0.02  # a real refinement, within the default most
    np.testing.assert_array_equal(
        refine_correction(A, B0, everywhere, symmetry=4, most=step / 2), B0
    )


def test_grains_each_on_one_branch_keep_the_measured_correction():
    """When every grain sits on one branch, neighbours on different branches are grain
    boundaries: the refinement must not pull different grains' strains together."""
    B0 = np.array([[1.0001, 0.0], [0.0, 0.9999]])
    grains = [np.eye(2), rotation_matrix(np.radians(3.0)) @ np.diag([1.015, 0.99])]
    grain = np.broadcast_to(np.arange(8) >= 4, (8, 8)).astype(int)
    A = _warps(grains, grain, grain, B0)  # the second grain on the next branch
    np.testing.assert_array_equal(refine_correction(A, B0, np.ones((8, 8), bool), symmetry=4), B0)


def test_neighbour_starts_take_each_neighbour_on_the_positions_own_branch():
    """The second refinement starts from the median of the neighbours' warps, each turned by
    the lattice symmetry onto the branch nearest the position's own; missing neighbours (NaN)
    are ignored."""
    from stemlib.ccstae.infer import _neighbour_median

    warp = rotation_matrix(0.2) @ np.array([[1.01, 0.004], [0.004, 0.99]])
    field = np.repeat(np.repeat(warp[None, None], 3, 0), 3, 1).copy()
    field[0, 0] = field[0, 0] @ rotation_matrix(np.pi / 2)  # same lattice, another branch
    field[0, 1] = field[0, 1] @ rotation_matrix(np.pi / 3)
    field[2, 2] = field[2, 2] @ rotation_matrix(-np.pi)
    field[1, 2] = np.nan
    start = _neighbour_median(field)
    assert np.allclose(start[1, 1], warp, atol=1e-12)
    shifts = np.arange(18, dtype=float).reshape(3, 3, 1, 2)
    assert np.allclose(_neighbour_median(shifts)[1, 1, 0], [8.0, 9.0])  # median of the 8 around


def test_two_grains_turned_apart_do_not_refine_the_correction():
    """Neighbours on two branches whose stretches agree but whose rotations differ (modulo the
    branches) are two grains, not one lattice seen twice: they say nothing about ``B``."""
    A = np.empty((12, 12, 2, 2))
    for j in range(12):
        if j < 6:
            F, S = np.eye(2), np.eye(2)
        else:  # turned by 20 deg, on the next branch, with a stretch 3e-3 from the left's
            F = rotation_matrix(np.radians(20.0)) @ np.diag([1.003, 1.0])
            S = rotation_matrix(np.pi / 2)
        A[:, j] = np.linalg.inv(F).T @ np.linalg.inv(S)
    B0 = np.eye(2)
    everywhere = np.ones((12, 12), bool)
    np.testing.assert_array_equal(refine_correction(A, B0, everywhere, symmetry=4), B0)
    # counted as one lattice, the boundary's 12 pairs would have moved B
    moved = refine_correction(A, B0, everywhere, symmetry=4, turn=1.0)
    assert np.abs(moved - B0).max() > 5e-4


def test_the_ellipse_is_removed_in_each_base_frame():
    """A base is learned from patterns turned back onto it, so it sees the detector's ellipse
    turned by its warps' rotation: removed in that frame, its lattice is square again and a grain
    on every branch gets its strain back. Removed with ``E`` on both sides, the base keeps 3 % of
    distortion, beyond what a base correction is trusted with (1e-2 errors on the hard scans)."""
    E = ellipse_matrix(0.03, 25.0)
    L0 = np.diag([16.0, 16.0])
    R = rotation_matrix(np.radians(40.0))
    base = np.linalg.inv(R) @ E @ L0  # learned from the reference, turned by -40 deg
    grains = [
        np.eye(2),  # the reference
        (np.eye(2) + np.array([[0.01, 0.004], [0.004, -0.008]])) @ rotation_matrix(0.2),
        (np.eye(2) + np.array([[-0.006, 0.01], [0.01, 0.012]])) @ rotation_matrix(-0.6),
    ]
    A = np.empty((1, 3, 2, 2))
    for j, (F, k) in enumerate(zip(grains, (0, 0, 1), strict=True)):
        pattern = E @ np.linalg.inv(F).T @ L0  # what the detector shows
        M = np.linalg.inv(L0) @ rotation_matrix(np.pi / 2 * k) @ L0  # the branch, in indices
        A[0, j] = pattern @ np.linalg.inv(M) @ np.linalg.inv(base)
    classes, reference = np.zeros((1, 3), int), np.array([[True, False, False]])
    truth = strain_from_deformation(np.stack(grains), symmetry=4)

    matrix, (lattice,) = remove_ellipse(A, [base], classes, reference, E)
    B = symmetric_correction(lattice, 4)
    got, _ = strain_from_affine(matrix, reference=reference, symmetry=4, correction=B)
    for name in ("exx", "eyy", "exy", "theta"):
        np.testing.assert_allclose(got[name][0], truth[name], atol=1e-9)

    # With E on both sides the base keeps about e of shear: a correction beyond ``most``
    lengths = np.linalg.norm(np.linalg.inv(E) @ base, axis=0)
    assert abs(lengths[0] / lengths[1] - 1) > 0.02
    np.testing.assert_allclose(np.linalg.norm(lattice, axis=0), [16.0, 16.0], rtol=1e-12)


def test_a_detector_distortion_left_on_the_warps_is_the_same_on_every_branch():
    """A detector ellipse that was not removed sits on the left of every warp,
    ``A = E F^-T R_k``: folding each warp onto the reference's branch before dividing out the
    reference gives every position of a grain one strain, whatever its branch, and the
    reference none. (Dividing out first, unfolded, left ``E`` turned by the branch: 1.3 % of it
    gave 26e-3 of exy on the demo's scan.)"""
    rng = np.random.default_rng(5)
    E = ellipse_matrix(0.013, 30.0)
    grains = [np.eye(2), rotation_matrix(np.radians(12.0)) @ np.diag([1.01, 0.995])]
    A = np.empty((6, 8, 2, 2))
    for i in range(6):
        for j in range(8):
            S = rotation_matrix(np.pi / 2 * (i % 4))  # every branch in every grain
            A[i, j] = E @ np.linalg.inv(grains[j >= 4]).T @ S
    A += rng.normal(0, 1e-6, A.shape)
    reference = np.zeros((6, 8), bool)
    reference[:, :4] = True
    got, _ = strain_from_affine(A, reference=reference, symmetry=4)
    for name in ("exx", "eyy", "exy"):
        assert np.abs(got[name][:, :4]).max() < 1e-5, name
        assert np.ptp(got[name][:, 4:]) < 1e-5, name


def test_a_base_distortion_is_judged_by_its_stretch_alone():
    """The ideal lattice keeps ``g1``'s direction, so a distortion along a diagonal puts a
    rotation into ``B``: on the demo's base an element of ``B - I`` was 2.2 % for a 1.4 %
    stretch, and the correction was dropped (1e-2 strain on every grain). ``B`` carries the
    base's stretch, and a 5 % one is still a misfit."""
    B = symmetric_correction(SKEWED @ SQUARE, 4)
    assert np.abs(B - np.eye(2)).max() > 0.02
    turn = np.linalg.solve(SKEWED, B)  # B is the base's distortion, a rotation and a scale
    np.testing.assert_allclose(turn.T @ turn / np.linalg.det(turn), np.eye(2), atol=1e-12)
    misfit = np.array([[1.0, 0.05], [0.05, 1.0]])
    np.testing.assert_array_equal(symmetric_correction(misfit @ SQUARE, 4), np.eye(2))


def test_the_base_lattice_comes_from_a_reference_on_every_branch():
    """The network put the demo's unstrained reference grain on all four 90-degree branches.
    ``A^-1 = D R_k^-1`` keeps the base's stretch on every branch, ``F_b = A^-T`` turns it with
    the branch: folded by the latter, the median reversed the base's distortion."""
    rng = np.random.default_rng(2)
    branch = rng.integers(4, size=(8, 8))
    A = _warps([np.eye(2)], np.zeros((8, 8), int), branch) + rng.normal(0, 1e-6, (8, 8, 2, 2))
    got = base_lattice_from_reference(A, np.ones((8, 8), bool), SQUARE, 4)
    # the base's lattice, on one of the branches
    assert any(
        np.allclose(got, SKEWED @ rotation_matrix(np.pi / 2 * k) @ SQUARE, atol=1e-4)
        for k in range(4)
    ), got


@pytest.mark.parametrize(
    "base, disks",
    [
        pytest.param(SKEWED, SKEWED, id="a distorted base"),
        pytest.param(np.eye(2), np.diag([1.019, 1 / 1.019]), id="a square base, misfit disks"),
    ],
)
def test_the_demo_scan_s_warps_give_its_reference_and_strain(base, disks):
    """The demo's case: a large unstrained grain whose positions the network put on all four
    branches, a strained grain turned by 11.6 deg on two, and a learned base 1.4 % off square.
    The automatic reference must be the whole unstrained grain (not the strained one, whose
    anisotropy, taken for a 2.7 % detector ellipse, put 1e-2 on every grain), the base's
    distortion must come out of the reference's lattice, and every component must come back.
    So too when the base is square but its disks misfit by 1.9 %, as on multislice WS2."""
    rng = np.random.default_rng(4)
    grains = [
        np.eye(2),
        rotation_matrix(np.radians(11.6)) @ np.array([[1.010, -0.013], [-0.013, 1.014]]),
    ]
    grain = np.zeros((16, 16), int)
    grain[:, 10:] = 1
    # a few more on the odd branches than on the even ones, as on the demo (266 to 245)
    turns = rng.choice(4, size=grain.shape, p=[0.2, 0.3, 0.2, 0.3])
    branch = np.where(grain == 0, turns, 2 * (np.arange(16) % 2))
    A = _warps(grains, grain, branch, base) + rng.normal(0, 1e-6, grain.shape + (2, 2))
    classes, valid = np.zeros(grain.shape, int), np.ones(grain.shape, bool)

    def measure(region: np.ndarray) -> np.ndarray:  # the lattice of the region's one grain
        (g,) = np.unique(grain[region])
        return np.linalg.inv(grains[g]).T @ SQUARE

    strain, reference, record = strain_from_warps(
        A,
        classes,
        valid,
        [disks @ SQUARE + rng.normal(0, 0.02, (2, 2))],
        symmetry=4,
        reference=None,
        measure=measure,
        ellipse=DetectorEllipse(),
    )
    np.testing.assert_array_equal(reference, grain == 0)
    assert not record["removed"], record
    expected = strain_from_deformation(np.stack(grains)[grain], symmetry=4)
    for name in ("exx", "eyy", "exy", "theta"):
        assert np.abs(strain[name] - expected[name]).max() < 1e-4, name
