"""``angular_order``: Bragg disks against background alone (known answers are its doctests),
here its memory: CC-ST-AE scores a sample of 2,048 patterns with it, 537 MB as float32 at
256 px, and it used to hold about 10 float64 copies of them (6.4 GB)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import stemlib.angular
from stemlib.angular import angular_order

from .conftest import soft_edged_vacuum


def _patterns(n: int, size: int, disks: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    qx, qy = np.indices((size, size)) - size / 2
    halo = 1e3 / (1 + (qx**2 + qy**2) / 8.0)
    spots = sum(
        np.exp(-((qx - 20 * np.cos(a)) ** 2 + (qy - 20 * np.sin(a)) ** 2) / 4)
        for a in np.arange(4) * np.pi / 2
    )
    return rng.poisson(halo + disks * spots, (n, size, size)).astype(np.float32)


def test_patterns_are_scored_a_block_at_a_time_in_bounded_memory(monkeypatch):
    patterns = _patterns(1024, 128, disks=3.0)  # 67 MB
    tracemalloc.start()
    order = angular_order(patterns, center=(64, 64), radii=(4, 60))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.8 * patterns.nbytes, peak  # one float64 copy alone would be 2x
    # The same score as all patterns at once.
    monkeypatch.setattr(stemlib.angular, "_BLOCK_PIXELS", 2**40)
    assert angular_order(patterns, center=(64, 64), radii=(4, 60)) == order
    assert order > 3  # faint disks (3 counts at their centres on a halo of 1e3) are found


def test_identical_patterns_few_rings_and_one_pattern():
    """Patterns all alike (noise-free) score 0, a crystal's as a vacuum's: the order is told
    from their spread; an annulus of 2 rings (8 px patterns) met SciPy's cubic spline error;
    one pattern has no standard error."""
    alike = np.repeat(_patterns(1, 64, disks=300.0), 3, axis=0)
    assert angular_order(alike, center=(32, 32), radii=(4, 28)) == 0.0
    assert angular_order(np.zeros((3, 64, 64)), center=(32, 32), radii=(4, 28)) == 0.0
    noise = np.random.default_rng(1).poisson(5.0, (64, 8, 8))
    assert abs(angular_order(noise, center=(4, 4), radii=(2, 3.8))) < 4
    with pytest.raises(ValueError, match="needs 2 or more patterns for a standard error, got 1"):
        angular_order(alike[:1], center=(32, 32), radii=(4, 28))


def test_a_noisy_vacuum_of_a_soft_edged_beam_is_background():
    """A beam of radius 6 px with a 1 px soft edge, 1e5 electrons per pattern, nothing else:
    most rings of its far tail hold no counts, and their residual (the spline's wiggle about
    zero, 4-fold on the square grid) divided by its own power scored 147 standard errors, a
    crystal's order; CC-ST-AE then mapped a vacuum scan (99.6 % coverage, +-9 % strain)."""
    vacuum = soft_edged_vacuum((256,))
    assert abs(angular_order(vacuum, center=(32, 32), radii=(10, 30.7))) < 4
