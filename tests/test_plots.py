"""PNG maps of strain results (issue 5): the four panels, NaN where no answer, atomic save to a
path or an S3 URL, and the sibling name beside a store."""

from __future__ import annotations

import numpy as np
import pytest

from stemlib.errors import InputError
from stemlib.plots import png_url, save_png, strain_figure
from stemlib.results import strain_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dataset():
    rx, ry = np.meshgrid(np.arange(6), np.arange(7), indexing="ij")
    exx = 0.01 * (rx - 3) / 3
    theta = np.radians(2.0) * (ry - 3) / 3
    valid = np.ones((6, 7), bool)
    valid[0, 0] = False
    return strain_dataset("py4dstem", exx=exx, eyy=-exx, exy=0.5 * exx, theta=theta, valid=valid)


def test_strain_figure_has_the_four_maps_in_shown_units():
    fig = strain_figure(_dataset(), "py4dstem")
    panels = fig.axes[::2]  # each panel is followed by its colour bar
    assert [ax.get_title() for ax in panels] == [
        "exx (along qx)",
        "eyy (along qy)",
        "exy (tensor shear)",
        "theta (rotation)",
    ]
    exx = panels[0].images[0].get_array()
    # Percent, rows = rx; the invalid position is masked, not 0.
    assert (
        exx.shape == (6, 7)
        and exx[5, 0] == pytest.approx(2 / 3)
        and exx[0, 1] == pytest.approx(-1.0)
    )
    assert np.ma.is_masked(exx[0, 0])
    theta = panels[3].images[0].get_array()
    assert theta[0, 6] == pytest.approx(2.0) and theta[0, 1] == pytest.approx(-2.0 / 3 * 2)
    lo, hi = panels[0].images[0].get_clim()
    assert lo == -hi and hi > 0  # symmetric about 0
    assert "coverage 97.6 %" in fig.get_suptitle()


def test_strain_figure_unknown_method():
    with pytest.raises(InputError, match=r"holds methods \['py4dstem'\], not 'ccstae'; pick one"):
        strain_figure(_dataset(), "ccstae")


def test_save_png_local(tmp_path):
    url = save_png(strain_figure(_dataset(), "py4dstem"), str(tmp_path / "sub" / "maps.png"))
    assert url == str(tmp_path / "sub" / "maps.png")
    assert (tmp_path / "sub" / "maps.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.s3
def test_save_png_to_s3(s3):
    import fsspec

    url = save_png(strain_figure(_dataset(), "py4dstem"), f"{s3}/runs/strain-py4dstem.png")
    assert url == f"{s3}/runs/strain-py4dstem.png"
    from stemlib.io.storage import locate

    location = locate(url)
    with location.fs.open(location.path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert isinstance(location.fs, fsspec.AbstractFileSystem)


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("out/strain.zarr", "out/strain-py4dstem.png"),
        ("out/strain.zarr/", "out/strain-py4dstem.png"),
        ("/abs/strain", "/abs/strain-py4dstem.png"),
        ("strain.zarr", "strain-py4dstem.png"),
        ("s3://bucket/a/b.zarr", "s3://bucket/a/b-py4dstem.png"),
    ],
)
def test_png_url(dest, expected):
    assert png_url(dest, "py4dstem") == expected


def test_png_url_needs_a_store():
    with pytest.raises(InputError, match="names no store; pass DEST such as out/strain.zarr"):
        png_url("/", "py4dstem")
