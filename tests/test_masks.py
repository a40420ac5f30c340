"""Masks (issue 4): areas and radii against analytic values, sub-pixel centres, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from stemlib.errors import InputError
from stemlib.masks import MaskSchedule, disk_mask, multi_disk_mask, ring_mask


def distances(shape, center):
    rows, cols = np.indices(shape)
    return np.hypot(rows - center[0], cols - center[1])


@pytest.mark.parametrize("shape", [(200, 200), (201, 160), (128, 96)])
@pytest.mark.parametrize("center", [None, (60.5, 41.25), (70.3, 49.9)])
def test_ring_area_and_radii_match_the_analytic_ring(shape, center):
    inner, outer = 20.0, 35.5
    mask = ring_mask(shape, inner=inner, outer=outer, center=center)
    c = (shape[0] // 2, shape[1] // 2) if center is None else center
    r = distances(shape, c)
    # Area: pi (outer^2 - inner^2); pixel counting is within 1 % at these radii.
    assert mask.sum() == pytest.approx(math.pi * (outer**2 - inner**2), rel=0.01)
    # Radii: every pixel inside lies in [inner, outer] and every pixel in that range is inside.
    assert r[mask].min() >= inner and r[mask].max() <= outer
    np.testing.assert_array_equal(mask, (r >= inner) & (r <= outer))
    # The mask's centre of mass is the requested sub-pixel centre, to within the binarisation
    # (0.15 px; a centre rounded to whole pixels would miss (60.5, 41.25) by 0.25-0.5 px).
    rows, cols = np.nonzero(mask)
    assert rows.mean() == pytest.approx(c[0], abs=0.15) and cols.mean() == pytest.approx(
        c[1], abs=0.15
    )


def test_default_centre_is_the_direct_beam_of_fftshift():
    for shape in ((128, 128), (127, 130)):
        mask = disk_mask(shape, radius=0)
        assert np.argwhere(mask).tolist() == [[shape[0] // 2, shape[1] // 2]]
    assert (
        disk_mask((128, 128), radius=3).sum() == 29
    )  # 1 + 4 + 4 + 4 + 8 + 8 lattice points with r <= 3


def test_small_ring_pixel_by_pixel():
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 0, 1, 1, 0],
            [0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(ring_mask((7, 7), inner=1, outer=2), expected)


@pytest.mark.parametrize("radius", [4.0, 12.5, 30.0])
def test_disk_area_matches_pi_r_squared(radius):
    mask = disk_mask((100, 100), radius=radius, center=(49.3, 50.6))
    assert mask.sum() == pytest.approx(math.pi * radius**2, rel=0.06 if radius < 5 else 0.01)
    assert distances((100, 100), (49.3, 50.6))[mask].max() <= radius


def test_multi_disk_is_the_union_of_disks():
    rng = np.random.default_rng(3)  # 40 centres: more than one vectorised step of 16
    centers = rng.uniform(-5, 133, size=(40, 2))
    union = np.zeros((128, 120), bool)
    for c in centers:
        union |= disk_mask((128, 120), radius=4.5, center=tuple(c))
    np.testing.assert_array_equal(multi_disk_mask((128, 120), centers=centers, radius=4.5), union)
    assert not multi_disk_mask((16, 16), centers=np.zeros((0, 2)), radius=3).any()
    # Separate disks: the area is K pi r^2.
    grid = np.array([[i, j] for i in (20.0, 60.0, 100.0) for j in (20.5, 60.5)])
    assert multi_disk_mask((128, 128), centers=grid, radius=10).sum() == pytest.approx(
        6 * math.pi * 100, rel=0.01
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: ring_mask((64, 64), inner=10, outer=5),
            r"inner=10.0 is larger than outer=5.0; pass inner <= outer",
        ),
        (lambda: ring_mask((64, 64), inner=-1, outer=5), r"inner=-1 must be a finite radius >= 0"),
        (lambda: disk_mask((64, 64), radius=float("nan")), r"radius=nan must be a finite radius"),
        (lambda: disk_mask((0, 64), radius=3), r"shape=\(0, 64\) must be two positive integers"),
        (
            lambda: disk_mask((64, 64), radius=3, center=(1.0,)),
            r"center=\(1.0,\) must be two finite numbers",
        ),
        (
            lambda: multi_disk_mask((64, 64), centers=np.zeros((3, 3)), radius=2),
            r"centers has shape \(3, 3\)",
        ),
    ],
)
def test_bad_masks_are_refused_in_one_sentence(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize(
    "kind, epochs, step_every, expected",
    [
        # start (10, 60) -> end (4, 30) over 7 epochs (0..6); t = epoch / 6.
        ("linear", 7, 1, {0: (10, 60), 3: (7, 45), 6: (4, 30), 50: (4, 30)}),
        (
            "cosine",
            7,
            1,
            {
                0: (10, 60),
                3: (7, 45),
                1: (
                    10 - 6 * (1 - math.cos(math.pi / 6)) / 2,
                    60 - 30 * (1 - math.cos(math.pi / 6)) / 2,
                ),
                6: (4, 30),
            },
        ),
        # Steps of 2 epochs: blocks {0,1} {2,3} {4,5} {6} -> levels 0, 1/3, 2/3, 1.
        ("step", 7, 2, {0: (10, 60), 1: (10, 60), 2: (8, 50), 3: (8, 50), 5: (6, 40), 6: (4, 30)}),
        ("constant", 7, 1, {0: (10, 60), 6: (10, 60), 9: (10, 60)}),
        ("linear", 1, 1, {0: (4, 30), 3: (4, 30)}),
    ],
)
def test_schedule_radii_at_given_epochs(kind, epochs, step_every, expected):
    schedule = MaskSchedule(
        kind=kind, start=(10, 60), end=(4, 30), epochs=epochs, step_every=step_every
    )
    for epoch, radii in expected.items():
        assert schedule.radii(epoch) == pytest.approx(radii, abs=1e-12), (kind, epoch)


def test_cosine_is_slow_at_both_ends_and_linear_is_not():
    cosine = MaskSchedule(kind="cosine", start=(0, 100), end=(0, 0), epochs=11)
    linear = cosine.model_copy(update={"kind": "linear"})
    assert 100 - cosine.radii(1)[1] < 100 - linear.radii(1)[1]  # shrinks less in the first epoch
    assert cosine.radii(9)[1] < linear.radii(9)[1]  # and less in the last one
    assert cosine.radii(5)[1] == pytest.approx(50.0)


def test_schedule_mask_config_round_trip_and_validation():
    schedule = MaskSchedule(
        kind="step", start=(50, 85), end=(30, 60), epochs=20, step_every=5, recenter=True
    )
    again = MaskSchedule.model_validate(schedule.model_dump(mode="json"))
    assert again == schedule and again.radii(12) == schedule.radii(12)
    np.testing.assert_array_equal(
        schedule.mask((200, 200), 12, center=(99.5, 100.25)),
        ring_mask(
            (200, 200),
            inner=schedule.radii(12)[0],
            outer=schedule.radii(12)[1],
            center=(99.5, 100.25),
        ),
    )
    with pytest.raises(
        ValidationError, match=r"must be \(inner, outer\) in px with 0 <= inner <= outer"
    ):
        MaskSchedule(start=(60, 50), end=(10, 20), epochs=5)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        MaskSchedule(start=(10, 50), end=(10, 20), epochs=0)
    with pytest.raises(InputError, match="epoch=-1 is negative"):
        schedule.radii(-1)


def test_recentre_on_the_centre_of_mass_of_the_base_disks():
    # A base with smooth disks symmetric about (97.3, 102.6) on a faint background and a bright
    # artefact far out: the threshold keeps the disks, the radius drops the artefact.
    centre = np.array([97.3, 102.6])
    offsets = np.array([[0, 0], [20, 0], [-20, 0], [0, 20], [0, -20]], float)
    rows, cols = np.indices((200, 200))
    base = np.full((200, 200), 0.01)
    for c in centre + offsets:
        base += np.exp(-((rows - c[0]) ** 2 + (cols - c[1]) ** 2) / (2 * 3.0**2))
    base[5:9, 5:9] = 50.0
    schedule = MaskSchedule(start=(10, 60), end=(5, 40), epochs=3, recenter=True)
    found = schedule.center_from(base, radius=45)
    assert found == pytest.approx(tuple(centre), abs=0.05)
    assert (
        np.hypot(*(np.array(schedule.center_from(base)) - centre)) > 1
    )  # without the radius, pulled away
    assert schedule.model_copy(update={"recenter": False}).center_from(base) is None
    assert schedule.center_from(np.zeros((8, 8))) is None
