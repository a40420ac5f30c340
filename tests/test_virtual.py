"""Virtual bright-field and annular dark-field images (stemlib.virtual): known answers on a scan
of vacuum and crystal with the beam off the detector's centre, chunked against in-memory, and
the figure. A stored scan's dead pixels read as zero counts (tests/test_strain_cli.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from stemlib.beam import direct_beam
from stemlib.errors import InputError
from stemlib.plots import virtual_figure
from stemlib.results import strain_dataset
from stemlib.virtual import virtual_images, with_virtual_images

SIZE = 96
BEAM = (40.0, 44.0)  # (qx, qy) px, off the detector's centre
RADIUS = 6


def _disk(center: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices((SIZE, SIZE))
    return (np.hypot(rows - center[0], cols - center[1]) <= radius).astype(np.float32)


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    """A 6 x 8 scan: vacuum (the beam alone, 10 counts per pixel) in columns 0-3, a crystal in
    columns 4-7 that keeps 6 per pixel in the beam and scatters 2 per pixel into four Bragg
    disks 24 px out; the crystal at rows 3-5 twice as strongly. Returns the scan and the
    crystal's scattering strength per position."""
    beam = _disk(BEAM, RADIUS)
    bragg = sum(
        _disk((BEAM[0] + dx, BEAM[1] + dy), 4) for dx, dy in [(24, 0), (-24, 0), (0, 24), (0, -24)]
    )
    strength = np.zeros((6, 8))
    strength[:, 4:] = 1.0
    strength[3:, 4:] = 2.0
    data = (10 - 2 * strength)[..., None, None] * beam + strength[..., None, None] * 2 * bragg
    return data.astype(np.float32), strength


def test_the_beam_is_found_where_it_is(scan):
    data, _ = scan
    center, radius = direct_beam(data[0, 0])
    assert np.allclose(center, BEAM, atol=0.01) and radius == RADIUS


def test_bright_and_dark_field_are_the_beam_and_the_scattering(scan):
    data, strength = scan
    images = virtual_images(data)
    beam_pixels, disk_pixels = _disk(BEAM, RADIUS).sum(), _disk((48, 48), 4).sum()
    np.testing.assert_allclose(images["virtual_bf"], (10 - 2 * strength) * beam_pixels)
    np.testing.assert_allclose(images["virtual_adf"], strength * 4 * 2 * disk_pixels)
    assert images["virtual_bf"].dims == ("rx", "ry")
    attrs = images["virtual_adf"].attrs
    assert attrs["beam_center_px"] == [40.0, 44.0] and attrs["beam_radius_px"] == 6.0
    assert attrs["annulus_px"] == [12.0, 40.0]  # 2 R out to the nearest edge (qx = 0)


def test_a_chunked_scan_gives_the_same_images_and_keeps_its_labels(scan):
    data, _ = scan
    coords = {"rx": ("rx", np.arange(6) * 0.5, {"units": "nm"}), "ry": np.arange(8) * 0.5}
    lazy = xr.DataArray(
        da.from_array(data, chunks=(2, 3, SIZE, SIZE)),
        dims=("rx", "ry", "qx", "qy"),
        coords=coords,
        attrs={"units": "electrons"},
    )
    chunked, whole = virtual_images(lazy), virtual_images(data)
    for name in ("virtual_bf", "virtual_adf"):
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6)
        assert chunked[name].attrs["units"] == "electrons"
    assert chunked["rx"].attrs["units"] == "nm" and float(chunked["ry"][-1]) == 3.5


def test_added_to_a_strain_dataset_and_drawn_with_the_reference(scan, tmp_path):
    data, strength = scan
    zero = np.zeros((6, 8))
    reference = strength == 0
    ds = strain_dataset(
        "py4dstem",
        exx=zero,
        eyy=zero,
        exy=zero,
        theta=zero,
        coords={"rx": np.arange(6) * 2.0, "ry": np.arange(8) * 2.0},  # labels unlike the scan's
        extras={"reference_region": (reference, {"units": "1"})},
    )
    added = with_virtual_images(ds, data)
    assert np.isfinite(added["virtual_bf"]).all() and added["virtual_bf"].dims == ("rx", "ry")
    figure = virtual_figure(added)
    assert figure.axes[0].get_legend_handles_labels()[1] == ["py4dstem reference"]
    with pytest.raises(InputError, match="pass the scan that the strain was measured on"):
        with_virtual_images(ds, data[:5])
    with pytest.raises(InputError, match="has no virtual_bf or virtual_adf"):
        virtual_figure(ds)
