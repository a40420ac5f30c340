"""The reference region: ``--reference auto|RX0:RX1,RY0:RY1|mask.npy`` and the automatic choice
(issue 5)."""

from __future__ import annotations

import numpy as np
import pytest

from stemlib.errors import InputError
from stemlib.reference import auto_reference, describe_reference, parse_reference


def test_auto_is_none():
    assert parse_reference("auto", (8, 6)) is None
    assert parse_reference(" AUTO ", (8, 6)) is None


@pytest.mark.parametrize(
    ("spec", "rows", "cols"),
    [
        ("0:2,1:3", (0, 2), (1, 3)),
        ("5:8,0:6", (5, 8), (0, 6)),
        (":3,4:", (0, 3), (4, 6)),
        (" 1 : 2 , 2 : 5 ", (1, 2), (2, 5)),
    ],
)
def test_rectangle_is_half_open(spec, rows, cols):
    mask = parse_reference(spec, (8, 6))
    expected = np.zeros((8, 6), bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert mask.dtype == bool and mask.shape == (8, 6)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("spec", ["0:9,0:2", "0:2,4:7", "-1:2,0:2", "0:2,-3:-1"])
def test_rectangle_outside_the_scan(spec):
    with pytest.raises(
        InputError, match=r"lies outside the scan of 8 x 6 positions; give RX0:RX1,RY0:RY1"
    ):
        parse_reference(spec, (8, 6))


@pytest.mark.parametrize("spec", ["3:3,0:2", "4:2,0:2", "0:2,5:1"])
def test_empty_rectangle(spec):
    with pytest.raises(InputError, match="is an empty region; give RX0:RX1,RY0:RY1 with RX0 < RX1"):
        parse_reference(spec, (8, 6))


def test_unknown_spec():
    with pytest.raises(
        InputError,
        match=r"is not understood; use auto, RX0:RX1,RY0:RY1 \(e.g. 0:8,0:8\) or a mask.npy",
    ):
        parse_reference("centre", (8, 6))


def test_mask_file(tmp_path):
    mask = np.zeros((8, 6), bool)
    mask[2:4, 1:5] = True
    np.save(tmp_path / "ref.npy", mask)
    np.testing.assert_array_equal(parse_reference(str(tmp_path / "ref.npy"), (8, 6)), mask)
    np.save(tmp_path / "ints.npy", mask.astype(np.uint8))
    np.testing.assert_array_equal(parse_reference(str(tmp_path / "ints.npy"), (8, 6)), mask)


def test_mask_of_the_wrong_shape(tmp_path):
    np.save(tmp_path / "ref.npy", np.ones((6, 8), bool))
    with pytest.raises(
        InputError, match=r"has shape \(6, 8\); it must have the scan shape \(8, 6\)"
    ):
        parse_reference(str(tmp_path / "ref.npy"), (8, 6))


def test_bad_mask_files(tmp_path):
    with pytest.raises(InputError, match="does not exist; pass an existing .npy file"):
        parse_reference(str(tmp_path / "missing.npy"), (8, 6))
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(InputError, match="is not a readable .npy array"):
        parse_reference(str(tmp_path / "text.npy"), (8, 6))
    np.save(tmp_path / "floats.npy", np.full((8, 6), 0.5))
    with pytest.raises(InputError, match="values other than 0 and 1; save a boolean mask"):
        parse_reference(str(tmp_path / "floats.npy"), (8, 6))
    np.save(tmp_path / "empty.npy", np.zeros((8, 6), bool))
    with pytest.raises(InputError, match="selects no position; mark the reference region True"):
        parse_reference(str(tmp_path / "empty.npy"), (8, 6))


def _lattice(shape, value):
    return np.broadcast_to(np.asarray(value, float), shape + (2, 2)).copy()


def test_auto_reference_takes_the_largest_consistent_region():
    rng = np.random.default_rng(3)  # noise well inside the tolerance
    g = _lattice((10, 12), [[20.0, 0.0], [0.0, 20.0]])
    g[:, 7:] = [[20.4, 1.0], [-1.0, 19.8]]  # a second grain, 2-5 % away: 10 x 5 positions
    g[:3, :3] = [[19.0, 3.0], [-3.0, 19.0]]  # a third, small grain
    g += rng.normal(0, 0.01, g.shape)
    mask = auto_reference(g, np.ones((10, 12), bool))
    expected = np.zeros((10, 12), bool)
    expected[:, :7] = True
    expected[:3, :3] = False
    np.testing.assert_array_equal(mask, expected)


def test_auto_reference_ignores_invalid_positions_and_nan():
    g = _lattice((6, 6), np.eye(2) * 10)
    g[:, 3:] *= 1.1
    valid = np.ones((6, 6), bool)
    valid[:, 0] = False  # the left grain loses a column: 12 positions against 18
    g[0, 4] = np.nan
    mask = auto_reference(g, valid)
    assert mask.sum() == 17 and mask[:, 3:].sum() == 17 and not mask[0, 4]


def test_auto_reference_does_not_drift_along_a_gradient():
    # 1 % steps between neighbours link everything; the median cut keeps the middle.
    g = _lattice((4, 9), np.eye(2) * 10)
    g *= (1 + 0.008 * np.arange(9))[None, :, None, None]
    mask = auto_reference(g, np.ones((4, 9), bool), rtol=0.01)
    assert (
        0 < mask.sum() < 36 and mask[:, 4].all() and not mask[:, 0].any() and not mask[:, 8].any()
    )


def test_auto_reference_without_a_region():
    g = _lattice((3, 3), np.eye(2))
    g *= (1 + 0.1 * np.arange(9)).reshape(3, 3, 1, 1)  # every position its own lattice
    with pytest.raises(
        InputError,
        match="no region of at least 4 neighbouring positions shares one lattice; pass --reference",
    ):
        auto_reference(g, np.ones((3, 3), bool))
    with pytest.raises(InputError, match="no position has a lattice"):
        auto_reference(g, np.zeros((3, 3), bool))


def test_describe_reference():
    assert describe_reference("0:2,0:3", np.ones((2, 3), bool)) == "0:2,0:3: 6 positions"


def test_auto_reference_finds_whole_grains_in_noisy_maps():
    """Lattices as noisy as py4DSTEM's at 1,000 electrons per pattern (neighbours about 2 %
    apart): a fixed 1 % tolerance broke the grains into pieces of a few positions (there: 20
    of 104); now most of the larger grain, and nothing of the other."""
    rng = np.random.default_rng(5)
    g = _lattice((8, 12), [[20.0, 0.0], [0.0, 20.0]])
    g[:, 7:] = [[19.0, 6.0], [-6.0, 19.0]]  # a grain turned by about 17 deg: 8 x 5 positions
    g += rng.normal(0, 0.22, g.shape)  # 1.1 % of the lattice per component
    mask = auto_reference(g, np.ones((8, 12), bool))
    assert mask[:, :7].sum() >= 0.8 * 56 and not mask[:, 7:].any(), mask.astype(int)
