"""``write_hdf5_scan``: the scan as a plain HDF5 file, whole or not at all."""

from __future__ import annotations

import os

import dask.array as da
import h5py
import numpy as np
import pytest

from stemlib.errors import InputError
from stemlib.io.export import write_hdf5_scan

from .conftest import file_writer


def scan() -> da.Array:
    data = np.random.default_rng(0).integers(0, 500, (4, 5, 16, 12)).astype("uint16")
    return da.from_array(data, chunks=(2, 5, 16, 12))


def test_the_file_reads_back(tmp_path):
    path = write_hdf5_scan(scan(), tmp_path / "raw" / "s.h5", attrs={"description": "test"})
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["data"][()], scan().compute())
        assert f["data"].chunks == (1, 1, 16, 12) and f.attrs["description"] == "test"
    assert os.listdir(tmp_path / "raw") == ["s.h5"]


def test_a_failed_export_leaves_no_file(tmp_path):
    def full_disk(block, block_info=None):
        if block_info[None]["chunk-location"][0] == 1:
            raise OSError(28, "No space left on device")
        return block

    with pytest.raises(InputError) as full:
        write_hdf5_scan(scan().map_blocks(full_disk, dtype="uint16"), tmp_path / "s.h5")
    assert str(full.value) == (
        f"{tmp_path / 's.h5'}: its disk is full; free space on it, or write to another disk."
    )
    assert os.listdir(tmp_path) == []


def test_an_export_removes_what_killed_writers_left(tmp_path):
    """An export killed while writing (kill -9, out of memory) left its temporary file for ever
    (and ``make demo`` writes a whole scan so). The next export to that file removes it; a
    running writer's is kept, and so are one written on another machine (a shared disk) and
    one that an earlier stemflow named."""
    path = str(tmp_path / "s.h5")
    others = [".s.h5.partial-0123456789ab-1-0123abcd", ".s.h5.partial"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    # the running writer first: the killed one's would otherwise be removed when it starts
    with file_writer(path, killed=False) as running, file_writer(path, killed=True) as killed:
        assert os.path.isfile(killed) and os.path.isfile(running)
        write_hdf5_scan(scan(), path)
        left = sorted(os.listdir(tmp_path))
    assert left == sorted([*others, os.path.basename(running), "s.h5"])
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["data"][()], scan().compute())
