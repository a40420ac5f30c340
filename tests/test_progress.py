"""Progress over a scan's patterns: a line per quarter, on Dask's local scheduler and on a
cluster alike (py4DSTEM's disk detection said nothing for the 31 minutes of a 256 x 256 scan)."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from stemlib.progress import Counter, computed_by_blocks

from .conftest import IN_PROCESS_CLUSTER


def _records() -> da.Array:
    """(8, 6, 3) records of 48 patterns, in blocks of 3 x 4 (6 blocks of 12, 6 or 8 patterns)."""
    return da.from_array(np.arange(144.0).reshape(8, 6, 3), chunks=(3, 4, 3)) * 2


def _lines() -> list[str]:
    lines: list[str] = []
    got = computed_by_blocks(_records(), Counter(lines.append, "py4dstem: Bragg disks", 48))
    np.testing.assert_array_equal(got, 2 * np.arange(144.0).reshape(8, 6, 3))
    assert all(
        re.fullmatch(r"py4dstem: Bragg disks \d+/48 patterns \(\d+ patterns/s\)", x) for x in lines
    )
    quarters = [4 * int(line.split()[3].split("/")[0]) // 48 for line in lines]
    assert len(lines) >= 2 and quarters == sorted(set(quarters)) and quarters[-1] == 4, lines
    return lines


def test_each_quarter_of_the_patterns_is_a_line_on_the_local_scheduler():
    _lines()


def test_each_quarter_of_the_patterns_is_a_line_on_a_cluster_and_a_failure_is_raised():
    def fail(block: np.ndarray) -> np.ndarray:
        if block[0, 0, 0] > 100:
            raise ValueError("a block that fails")
        return block

    with LocalCluster(**IN_PROCESS_CLUSTER) as cluster, Client(cluster):
        _lines()
        with pytest.raises(ValueError, match="a block that fails"):
            computed_by_blocks(_records().map_blocks(fail), Counter(None, "x", 48))
