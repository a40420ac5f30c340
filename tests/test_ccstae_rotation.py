"""The rotation stage's per-pattern search (:mod:`stemlib.ccstae.rotation`), in blocks."""

from __future__ import annotations

import numpy as np
import torch

from stemlib.ccstae.rotation import centred_features, correlate_angles

SIZE = 64
CENTER = (32.0, 32.0)
RADII = (8.0, 20.0)


def _pattern(beam: tuple[float, float], theta: float) -> np.ndarray:
    """A bright direct beam at ``beam`` (qx, qy) px and a square lattice of 12 px turned by
    ``theta`` (rad) about it: Gaussian disks of 1.5 px."""
    qx, qy = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    image = 4 * np.exp(-((qx - beam[0]) ** 2 + (qy - beam[1]) ** 2) / (2 * 1.5**2))
    c, s = np.cos(theta), np.sin(theta)
    for i in range(-2, 3):
        for j in range(-2, 3):
            if (i, j) != (0, 0):
                gx, gy = 12 * (c * i - s * j), 12 * (s * i + c * j)
                image += np.exp(
                    -((qx - beam[0] - gx) ** 2 + (qy - beam[1] - gy) ** 2) / (2 * 1.5**2)
                )
    return image.astype(np.float32)


def test_beams_and_rotations_are_found_the_same_in_any_blocks():
    rng = np.random.default_rng(3)
    shifts = rng.uniform(-3, 3, (10, 2))
    thetas = rng.uniform(-np.pi / 4, np.pi / 4, 10)
    patterns = torch.from_numpy(
        np.stack(
            [
                _pattern((CENTER[0] + a, CENTER[1] + b), t)
                for (a, b), t in zip(shifts, thetas, strict=True)
            ]
        )
    )[:, None]
    search = dict(center=CENTER, radius=8.0, radii=RADII, n_angles=720)
    beams, features = centred_features(patterns, **search, block=4)
    whole = centred_features(patterns, **search, block=len(patterns))
    assert torch.equal(beams, whole[0]) and torch.equal(features, whole[1])
    assert beams.shape == (10, 2) and features.shape == (10, 13, 720)
    np.testing.assert_allclose(beams.numpy() - np.array(CENTER), shifts, atol=0.05)
    reference = centred_features(torch.from_numpy(_pattern(CENTER, 0.0))[None, None], **search)
    theta, _ = correlate_angles(features, reference[1][0])
    # the square lattice's angle is defined modulo 90 deg
    turn = np.angle(np.exp(4j * (theta.numpy() - thetas))) / 4
    np.testing.assert_allclose(turn, 0, atol=np.radians(0.3))
