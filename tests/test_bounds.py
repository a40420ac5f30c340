"""The Cramér-Rao bound of stemlib.bounds against closed forms for Gaussian spots."""

import numpy as np
import pytest

from stemlib.bounds import affine_information, bound_mae, least_errors, strain_bound

SIZE, CENTRE, WIDTH = 96, 48.0, 2.5


def _spots(points, counts_each):
    """Pattern of isotropic Gaussian spots (px) around the centre, with a direct beam."""
    q = np.indices((SIZE, SIZE), dtype=float) - CENTRE
    image = np.zeros((SIZE, SIZE))
    for (gx, gy), n in zip(points, counts_each, strict=True):
        spot = np.exp(-((q[0] - gx) ** 2 + (q[1] - gy) ** 2) / (2 * WIDTH**2))
        image += n * spot / spot.sum()
    return image


SQUARE = [(24.0 * i, 24.0 * j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]


def test_information_matches_the_closed_form_for_gaussian_spots():
    """Each spot of n counts at G gives A_xx the information n (G_x^2 / s^2 + 3): its position,
    plus the rescaling of the spot itself (the 3), whatever the other spots."""
    counts = [100.0 * (k + 1) for k in range(len(SQUARE))]
    pattern = _spots(SQUARE, counts)
    info = affine_information(pattern, counts=sum(counts), origin=(CENTRE, CENTRE))
    expected_xx = sum(n * (gx**2 / WIDTH**2 + 3) for (gx, _), n in zip(SQUARE, counts, strict=True))
    expected_yy = sum(n * (gy**2 / WIDTH**2 + 3) for (_, gy), n in zip(SQUARE, counts, strict=True))
    assert info[0, 0] == pytest.approx(expected_xx, rel=0.03)
    assert info[3, 3] == pytest.approx(expected_yy, rel=0.03)
    # A_xy moves qx by q_y: n (G_y^2 / s^2 + 1).
    expected_xy = sum(n * (gy**2 / WIDTH**2 + 1) for (_, gy), n in zip(SQUARE, counts, strict=True))
    assert info[1, 1] == pytest.approx(expected_xy, rel=0.03)
    assert abs(info[0, 3]) < 0.05 * info[0, 0]


def test_a_point_spread_widens_each_spot_in_the_closed_form():
    """A Gaussian point spread of sigma turns spots of width s into spots of width
    sqrt(s^2 + sigma^2): the information is the closed form above at that width."""
    counts = [100.0] * len(SQUARE)
    sigma = 2.0
    info = affine_information(_spots(SQUARE, counts), counts=sum(counts), psf=sigma)
    wide = WIDTH**2 + sigma**2
    expected_xx = sum(n * (gx**2 / wide + 3) for (gx, _), n in zip(SQUARE, counts, strict=True))
    assert info[0, 0] == pytest.approx(expected_xx, rel=0.03)
    assert affine_information(_spots(SQUARE, counts), counts=sum(counts))[0, 0] > 1.5 * info[0, 0]


def test_the_bound_falls_as_one_over_the_root_of_the_dose():
    pattern = _spots(SQUARE, [1.0] * len(SQUARE))
    low = strain_bound(pattern, counts=1e3)
    high = strain_bound(pattern, counts=4e3)
    for k in ("exx", "eyy", "exy", "theta"):
        assert high[k] == pytest.approx(low[k] / 2, rel=1e-9)


def test_background_and_a_turned_lattice():
    """Background only adds noise; a lattice turned by 90 deg swaps exx and eyy."""
    rect = [(20.0 * i, 12.0 * j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    turned = [(gy, -gx) for gx, gy in rect]
    a = strain_bound(_spots(rect, [1.0] * 8), counts=1e4)
    b = strain_bound(_spots(turned, [1.0] * 8), counts=1e4)
    assert a["exx"] < a["eyy"]  # the longer vector along qx pins exx better
    assert b["exx"] == pytest.approx(a["eyy"], rel=1e-6)
    assert b["eyy"] == pytest.approx(a["exx"], rel=1e-6)
    noisy = strain_bound(_spots(rect, [1.0] * 8), counts=1e4, background=0.5)
    assert all(noisy[k] > a[k] * np.sqrt(2) * 0.99 for k in a)  # half the signal, plus noise


def test_least_errors_excludes_the_beam_and_averages_the_patterns():
    pattern = _spots(SQUARE, [1.0] * len(SQUARE))
    q = np.indices((SIZE, SIZE), dtype=float) - CENTRE
    beam = 1.0 / (1.0 + np.exp((np.hypot(q[0], q[1]) - 4.0) / 0.2))
    stack = np.stack([pattern + 20.0 * beam / beam.sum()] * 3)
    bounds = least_errors(stack, counts=1e4)
    alone = strain_bound(pattern, counts=1e4 * pattern.sum() / stack[0].sum())
    # Without the beam's counts, each pattern bounds the same as its spots alone.
    assert bounds["exx"] == pytest.approx(bound_mae(np.full(3, alone["exx"])), rel=0.02)


@pytest.mark.parametrize(
    ("pattern", "kwargs", "message"),
    [
        (np.full((8, 8), np.nan), {}, "finite 2D array"),
        (np.zeros((8, 8)), {}, "positive sum"),
        (np.ones((8, 8)), {"background": 1.5}, r"background=1.5 is not in \[0, 1\]"),
        (np.ones((8, 8)), {"psf": -1.0}, "psf=-1.0 px is negative; give 0 for no point spread"),
    ],
)
def test_bad_input(pattern, kwargs, message):
    with pytest.raises(ValueError, match=message):
        affine_information(pattern, counts=10.0, **kwargs)


def test_a_pattern_without_disks_or_signal_has_no_bound():
    flat = np.ones((32, 32))
    assert strain_bound(flat, counts=100.0)["exx"] == np.inf
    spots = _spots(SQUARE, [1.0] * len(SQUARE))
    assert strain_bound(spots, counts=100.0, background=1.0)["exx"] == np.inf
