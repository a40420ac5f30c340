"""CC-ST-AE warps: the one conversion to PyTorch's frame, inverse warps, registration (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stemlib.ccstae.affine import affine_matrix, invert, rotation, torch_theta, warp
from stemlib.ccstae.refine import average_base, catmull_rom_upsample, refine_affine
from stemlib.masks import ring_mask


def _spot(shape: tuple[int, int], at: tuple[int, int]) -> torch.Tensor:
    x = torch.zeros(1, 1, *shape)
    x[0, 0, at[0], at[1]] = 1.0
    return x


def _blobs(
    shape: tuple[int, int], centres: list[tuple[float, float]], sigma: float = 2.5
) -> torch.Tensor:
    rows = torch.arange(shape[0], dtype=torch.float32)[:, None]
    cols = torch.arange(shape[1], dtype=torch.float32)[None, :]
    img = sum(torch.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2)) for r, c in centres)
    return img[None, None]


def _peak(img: torch.Tensor) -> tuple[int, int]:
    flat = int(img[0, 0].argmax())
    return flat // img.shape[-1], flat % img.shape[-1]


def test_shift_along_qx_moves_rows_not_columns():
    # warp(x, I, t)(u) = x(u + t): content moves by -t; t along qx (rows) must move rows only.
    x = _spot((20, 30), (12, 7))
    y = warp(x, torch.eye(2)[None], torch.tensor([[3.0, 0.0]]), center=(10.0, 15.0))
    assert _peak(y) == (9, 7)
    y = warp(x, torch.eye(2)[None], torch.tensor([[0.0, -2.0]]), center=(10.0, 15.0))
    assert _peak(y) == (12, 9)


def test_rotation_turns_from_qx_towards_qy():
    # Sampling at R(90 deg) u: a spot at +2 px along qy appears at +2 px along qx.
    x = _spot((21, 21), (10, 12))
    y = warp(x, rotation(torch.tensor([np.pi / 2])), torch.zeros(1, 2), center=(10.0, 10.0))
    assert _peak(y) == (12, 10)
    # and a spot at +3 px along qx appears at -3 px along qy.
    x = _spot((21, 21), (13, 10))
    y = warp(x, rotation(torch.tensor([np.pi / 2])), torch.zeros(1, 2), center=(10.0, 10.0))
    assert _peak(y) == (10, 7)


def test_scale_acts_on_its_own_axis_on_a_non_square_pattern():
    # A = diag(2, 1): the spot at +6 px along qx is sampled from u with 2 (u - c) = 6.
    x = _spot((24, 40), (18, 20))
    A = affine_matrix(
        torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    )
    y = warp(x, A, torch.zeros(1, 2), center=(12.0, 20.0))
    assert _peak(y) == (15, 20)
    A = affine_matrix(
        torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0])
    )
    x = _spot((24, 40), (12, 28))
    y = warp(x, A, torch.zeros(1, 2), center=(12.0, 20.0))
    assert _peak(y) == (12, 24)


def test_torch_theta_matches_scipy_affine_transform():
    # An independent implementation of u -> c + A (u - c) + t in (row, column) coordinates.
    rng = np.random.default_rng(3)
    img = rng.random((33, 47)).astype(np.float32)
    img = ndimage.gaussian_filter(img, 2.0)
    A = np.array([[1.03, 0.04], [-0.02, 0.97]]) @ np.array(
        [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    )
    t = np.array([1.5, -2.25])
    c = np.array([16.0, 23.0])
    expected = ndimage.affine_transform(
        img, A, offset=c - A @ c + t, order=1, mode="constant", cval=0.0
    )
    got = warp(
        torch.from_numpy(img)[None, None],
        torch.tensor(A, dtype=torch.float32)[None],
        torch.tensor(t, dtype=torch.float32)[None],
        center=tuple(c),
    )
    inner = (slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(got[0, 0].numpy()[inner], expected[inner], atol=1e-5)


def test_torch_theta_is_identity_for_the_identity_warp():
    theta = torch_theta(torch.eye(2)[None], torch.zeros(1, 2), shape=(64, 48), center=(32.0, 24.0))
    np.testing.assert_allclose(theta[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-7)


def test_warp_then_inverse_warp_is_identity_inside_the_mask():
    shape = (64, 64)
    x = _blobs(shape, [(20, 30), (44, 40), (30, 48), (36, 14)], sigma=4.0)
    A = affine_matrix(
        torch.tensor([1.03]), torch.tensor([0.98]), torch.tensor([0.02]), torch.tensor([0.7])
    )
    t = torch.tensor([[0.8, -1.3]])
    back = warp(warp(x, A, t, center=(32.0, 32.0)), *invert(A, t), center=(32.0, 32.0))
    mask = torch.from_numpy(ring_mask(shape, inner=6, outer=24))
    err = (back - x)[0, 0][mask].abs().max()
    assert float(err) < 0.03 * float(x.max())  # bilinear resampling, twice, of 4 px blobs


def _blobs_seen_through(
    shape: tuple[int, int],
    centres: list[tuple[float, float]],
    A: torch.Tensor,
    t: torch.Tensor,
    *,
    sigma: float,
    center: tuple[float, float],
) -> torch.Tensor:
    """``_blobs`` as patterns that hold the base's content at ``c + A v + t``, drawn exactly
    rather than resampled: pixel ``u`` shows the base at ``v = c + A^-1 (u - c - t)``.
    Shapes: ``A`` (B, 2, 2), ``t`` (B, 2); returns (B, 1, H, W)."""
    c = torch.tensor(center)
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    u = torch.stack([rows, cols], -1).float()
    v = c + (u - c - t[:, None, None]) @ torch.linalg.inv(A).transpose(1, 2)[:, None]
    dist2 = [((v - torch.tensor(p, dtype=torch.float32)) ** 2).sum(-1) for p in centres]
    return sum(torch.exp(-d / (2 * sigma**2)) for d in dist2)[:, None]


@pytest.mark.parametrize("poisson", [False, True])
def test_refine_recovers_a_known_warp(poisson):
    shape, center = (64, 64), (32.0, 32.0)
    centres = [(20, 30), (44, 40), (30, 48), (36, 14), (14, 44)]
    base = _blobs(shape, centres, sigma=3.0) + 0.05
    A = affine_matrix(
        torch.tensor([1.02, 0.99]),
        torch.tensor([0.985, 1.01]),
        torch.tensor([0.01, -0.015]),
        torch.tensor([0.04, -0.06]),
    )
    t = torch.tensor([[0.6, -0.4], [-1.0, 0.3]])
    x = _blobs_seen_through(shape, centres, A, t, sigma=3.0, center=center) + 0.05
    x = 1.5 * x + 0.1  # gain and offset
    mask = torch.from_numpy(ring_mask(shape, inner=5, outer=28)).float()
    start = (torch.eye(2).expand(2, 2, 2), torch.zeros(2, 2))
    fits = {
        upsample: refine_affine(
            x,
            base.expand(2, -1, -1, -1),
            *start,
            mask,
            center=center,
            steps=20,
            poisson=poisson,
            upsample=upsample,
        )
        for upsample in (2, 1)
    }
    fit = fits[2]
    error = float((fit["matrix"] - A).abs().max())
    assert error < 3e-4  # strain-equivalent 3e-4
    assert float((fit["shift"] - t).abs().max()) < 3e-3
    np.testing.assert_allclose(fit["gain"].numpy(), 1.5, atol=6e-3)
    assert bool((fit["error"] < fit["start_error"]).all())
    # The base sampled bilinearly on its own pixels is piecewise linear: 7e-4 here.
    assert float((fits[1]["matrix"] - A).abs().max()) > 2.5 * error


def test_a_batch_of_two_bases_fits_each_pattern_as_it_is_fitted_alone():
    """Patterns of two bases in one batch (each read from its own base) against each base's
    patterns alone (one base for the whole batch): the same warps, to float rounding."""
    shape, center = (64, 64), (32.0, 32.0)
    layouts = ([(20, 30), (44, 40), (30, 48), (36, 14)], [(16, 24), (40, 46), (48, 20)])
    A = affine_matrix(
        torch.tensor([1.02, 0.99, 1.01, 0.98]),
        torch.tensor([0.985, 1.01, 0.99, 1.02]),
        torch.tensor([0.01, -0.015, 0.0, 0.012]),
        torch.tensor([0.04, -0.06, 0.5, -1.1]),
    )
    t = torch.tensor([[0.6, -0.4], [-1.0, 0.3], [0.2, 0.5], [-0.3, -0.7]])
    bases = torch.cat([_blobs(shape, c, sigma=3.0) for c in layouts])
    x = torch.cat(
        [
            _blobs_seen_through(shape, c, A[i : i + 2], t[i : i + 2], sigma=3.0, center=center)
            for c, i in zip(layouts, (0, 2), strict=True)
        ]
    )
    which = torch.tensor([0, 0, 1, 1])
    start = (rotation(torch.tensor([0.04, -0.06, 0.5, -1.1])), torch.zeros(4, 2))
    mask = torch.from_numpy(ring_mask(shape, inner=5, outer=28)).float()
    run = dict(center=center, steps=8)
    mixed = refine_affine(x, bases[which], *start, mask, **run)
    for half in (slice(0, 2), slice(2, 4)):
        alone = refine_affine(
            x[half], bases[which[half]], start[0][half], start[1][half], mask, **run
        )
        torch.testing.assert_close(mixed["matrix"][half], alone["matrix"], atol=1e-5, rtol=0)
    assert float((mixed["matrix"] - A).abs().max()) < 1e-3


def test_catmull_rom_upsampling_keeps_pixel_centres_and_quadratics():
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    quadratic = lambda r, c: 0.3 * r**2 - 0.2 * r * c + 0.1 * c**2 + r - 2.0  # noqa: E731
    image = quadratic(rows, cols)[None, None]
    torch.testing.assert_close(catmull_rom_upsample(image, 1), image)
    fine = catmull_rom_upsample(image, 4)
    assert fine.shape == (1, 1, 48, 40)
    # Output pixel j lies at (j + 0.5) / 4 - 0.5 input pixels; away from the zero border
    # (two input pixels), the cubic reproduces the quadratic there.
    r, c = torch.meshgrid(
        (torch.arange(48.0) + 0.5) / 4 - 0.5, (torch.arange(40.0) + 0.5) / 4 - 0.5, indexing="ij"
    )
    inside = (slice(10, -10), slice(10, -10))
    torch.testing.assert_close(fine[0, 0][inside], quadratic(r, c)[inside], atol=1e-4, rtol=0)


def test_average_base_undoes_the_warps():
    shape = (64, 64)
    base = _blobs(shape, [(20, 30), (44, 40), (30, 48)], sigma=4.0)
    A = rotation(torch.tensor([0.3, -0.5, 1.2]))
    t = torch.zeros(3, 2)
    x = warp(base.expand(3, -1, -1, -1), *invert(A, t), center=(32.0, 32.0))
    num, den = average_base(
        2.0 * x, A, t, torch.full((3,), 2.0), torch.zeros(3), center=(32.0, 32.0)
    )
    mean = num / den.clamp_min(1e-6)
    mask = torch.from_numpy(ring_mask(shape, inner=6, outer=24))
    assert float((mean - base)[0, 0][mask].abs().max()) < 0.03  # two bilinear resamplings


def test_disk_gains_keep_the_geometry_when_disk_intensities_change():
    from stemlib.ccstae.refine import disk_regions

    shape = (64, 64)
    centres = [(20, 30), (44, 40), (30, 48), (36, 14), (14, 44), (50, 22)]
    base = _blobs(shape, centres, sigma=2.0)
    A = affine_matrix(
        torch.tensor([1.02]), torch.tensor([0.99]), torch.tensor([0.01]), torch.tensor([0.05])
    )
    # The pattern's disks have other intensities than the base's (as dynamical scattering gives).
    weights = [1.0, 0.6, 1.4, 0.8, 1.2, 0.5]
    uneven = sum(w * _blobs(shape, [c], sigma=2.0) for w, c in zip(weights, centres, strict=True))
    x = warp(uneven, *invert(A, torch.zeros(1, 2)), center=(32.0, 32.0))
    mask = torch.from_numpy(ring_mask(shape, inner=5, outer=28)).float()
    regions = disk_regions(base, center=(32.0, 32.0), inner=5, disk_radius=2.0)
    assert int(regions.max()) == len(centres)
    # The pattern was resampled bilinearly from the base: the fit samples the base so too.
    fit = dict(center=(32.0, 32.0), steps=20, upsample=1)
    start = (torch.eye(2)[None], torch.zeros(1, 2))
    one_gain = refine_affine(x, base, *start, mask, **fit)
    per_disk = refine_affine(x, base, *start, mask, regions=regions, **fit)
    assert float((per_disk["matrix"] - A).abs().max()) < 2e-4
    assert float((one_gain["matrix"] - A).abs().max()) > 3 * float(
        (per_disk["matrix"] - A).abs().max()
    )
    np.testing.assert_allclose(
        np.sort(per_disk["region_gains"][0, 1:].numpy()), np.sort(weights), atol=0.02
    )


def _disk_lattice(A: np.ndarray, *, size: int = 96) -> torch.Tensor:
    """A square lattice of soft disks (radius 3 px, spacing 14 px, fading with ``|g|``) about
    the centre of a (size, size) pattern, each disk a circle at ``A g``: (1, 1, size, size)."""
    c = size / 2
    rows = torch.arange(size, dtype=torch.float64)[:, None]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    img = torch.zeros(size, size, dtype=torch.float64)
    for i in range(-2, 3):
        for j in range(-2, 3):
            if (i, j) == (0, 0):
                continue
            g = np.array([14.0 * i, 14.0 * j])
            p = A @ g
            amp = np.exp(-((np.hypot(*g) / 20.0) ** 2))
            r = torch.sqrt((rows - c - p[0]) ** 2 + (cols - c - p[1]) ** 2)
            img += amp / (1 + torch.exp((r - 3.0) / 0.5))
    return img.float()[None, None]


def _lattice_disks(base: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    from stemlib.ccstae.refine import rigid_disk_model

    return rigid_disk_model(base, center=(c, c), inner=7, disk_radius=3.0)


def test_rigid_disks_recover_a_strain_that_moves_disks_without_stretching_them():
    shape, c = (96, 96), 48.0
    A = affine_matrix(
        torch.tensor([1.015]), torch.tensor([0.985]), torch.tensor([0.012]), torch.tensor([0.3])
    )[0]
    base = _disk_lattice(np.eye(2))
    x = _disk_lattice(A.double().numpy())  # disks at A g, each the same circle as in the base
    mask = torch.from_numpy(ring_mask(shape, inner=7, outer=40)).float()
    disks = _lattice_disks(base, c)
    assert int(disks[0].max()) >= 20  # all but the four faint corners
    start = (A[None] @ rotation(torch.tensor([0.02])), torch.zeros(1, 2))
    rigid = refine_affine(x, base, *start, mask, center=(c, c), steps=15, disks=disks)
    stretched = refine_affine(x, base, *start, mask, center=(c, c), steps=15)
    # Rigid disks are the model that made the pattern; stretched ones pull A towards I.
    rigid_error = float((rigid["matrix"][0] - A).abs().max())
    assert rigid_error < 2e-4  # bilinear interpolation of the base
    assert float((stretched["matrix"][0] - A).abs().max()) > 4 * rigid_error
    assert float(rigid["shift"].abs().max()) < 1e-2


@pytest.mark.parametrize("rigid", [True, False])
def test_solve_bases_recovers_the_base_the_patterns_were_drawn_from(rigid):
    """Reference patterns (A = I) and strained, turned ones, drawn exactly with rigid disks, and
    their true warps: from a blurred start, the base solved through the refinement's model (the
    finer Catmull-Rom grid; rigid or stretched disks) is the true base, and registers the
    strained patterns as well as the true base does."""
    from stemlib.ccstae.refine import solve_bases

    shape, c = (96, 96), 48.0
    strained = affine_matrix(
        torch.tensor([1.012, 0.99]),
        torch.tensor([0.992, 1.008]),
        torch.tensor([0.008, -0.01]),
        torch.tensor([0.05, 0.65]),
    )
    A = torch.cat([torch.eye(2).expand(4, 2, 2), strained.repeat(2, 1, 1)])
    t = torch.zeros(len(A), 2)
    x = torch.cat([_disk_lattice(a.double().numpy()) for a in A])
    truth = _disk_lattice(np.eye(2))
    blurred = torch.from_numpy(ndimage.gaussian_filter(truth[0, 0].numpy(), 1.0))[None, None]
    mask = torch.from_numpy(ring_mask(shape, inner=7, outer=40)).float()
    solved = solve_bases(
        x,
        blurred,
        torch.zeros(len(A), dtype=torch.long),
        A,
        t,
        {"gain": torch.ones(len(A)), "offset": torch.zeros(len(A))},
        mask,
        center=(c, c),
        disks=_lattice_disks(blurred, c) if rigid else None,
    )
    ring = mask > 0

    def rms(base: torch.Tensor) -> float:
        return float((base - truth)[0, 0][ring].pow(2).mean().sqrt())

    assert rms(solved) < 0.2 * rms(blurred)  # measured 0.13 (rigid) and 0.11
    error = {}
    for name, base in (("solved", solved), ("truth", truth)):
        fit = refine_affine(
            x[4:],
            base.expand(4, -1, -1, -1),
            A[4:],
            t[4:],
            mask,
            center=(c, c),
            steps=10,
            disks=tuple(d.expand(4, *d.shape[1:]) for d in _lattice_disks(base, c)),
        )
        error[name] = float((fit["matrix"] - A[4:]).abs().max())
    assert error["solved"] < max(1.5 * error["truth"], 2e-4), error


def test_radial_background_does_not_spread_the_direct_beam_into_a_dark_halo():
    from stemlib.ccstae.refine import radial_background

    shape = (64, 64)
    rows = torch.arange(64.0)[:, None]
    cols = torch.arange(64.0)[None, :]
    r = torch.hypot(rows - 32, cols - 32)
    beam = 5.0 / (1 + torch.exp((r - 3.2) / 0.6))  # a bright, sharp direct beam
    diffuse = 0.02 * torch.exp(-r / 20)  # a smooth isotropic background
    base = beam + diffuse + 0.1 * _blobs(shape, [(32, 48), (48, 32), (32, 16), (16, 32)])[0, 0]
    bg = radial_background(base[None, None], center=(32.0, 32.0))[0, 0]
    lattice = base - bg
    # Beyond the beam's edge the lattice part dips below zero by at most the spread of a 1 px
    # ring (0.2 % of the beam), not by the smoothed beam's edge...
    assert float(lattice[(r > 5) & (r < 12)].min()) > -0.01
    # ...and between the disks the background still follows the diffuse level.
    between = (r > 12) & (r < 20) & ((rows - 32).abs() > 6) & ((cols - 32).abs() > 6)
    np.testing.assert_allclose(bg[between].numpy(), diffuse[between].numpy(), atol=2e-3)


def test_disk_centres_are_not_pulled_by_the_level_a_disk_sits_on():
    from stemlib.ccstae.refine import disk_centres, disk_regions

    rows = torch.arange(64.0)[:, None]
    cols = torch.arange(64.0)[None, :]
    truth = [(20.3, 44.6), (44.7, 19.4)]
    disks = sum(
        1 / (1 + torch.exp((torch.hypot(rows - r, cols - c) - 3.0) / 0.5)) for r, c in truth
    )
    # A level the disks sit on: a plain centre of mass of each disk's region is pulled towards
    # the region's middle (the whole pixel of the peak), 0.1-0.2 px from the true centre.
    base = (disks + 0.3)[None, None]
    labels = disk_regions(base, center=(32.0, 32.0), inner=5, disk_radius=3.0)
    centres = disk_centres(base, labels, center=(32.0, 32.0), disk_radius=3.0)[0, 1:]
    found = centres.numpy() + 32.0
    for r, c in truth:
        assert float(np.hypot(*(found - (r, c)).T).min()) < 0.03
