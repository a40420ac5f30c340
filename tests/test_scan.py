"""A scan held in memory, as a notebook user has it: both strain methods take a NumPy or dask
array of shape (RX, RY, QX, QY) or a DataArray with those dims and no stemflow attributes, and
refuse anything else in one sentence before any work starts."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from stemlib.baseline_py4dstem import py4dstem_strain
from stemlib.ccstae import CCSTAEConfig, ccstae_strain
from stemlib.errors import InputError
from stemlib.metrics import strain_errors
from stemlib.scan import as_scan
from stemlib.simulate import SimulationConfig, simulate

#: The smallest CC-ST-AE that runs every stage to the end (5 s on two cores): its answer is
#: not scored here, only its form.
TINY = CCSTAEConfig.preset(
    "cpu",
    epochs=0,
    refine_steps=0,
    template_rounds=0,
    search_angles=72,
    channels=8,
    search_patterns=36,
    batch_size=16,
    neighbour_starts=False,
)


@pytest.fixture(scope="module")
def simulated():
    return simulate(SimulationConfig(scan=(8, 8), pattern=64, grains=2, seed=1))


def _truth(ds):
    return ds.rename({f"truth_{c}": c for c in ("exx", "eyy", "exy", "theta")})


@pytest.mark.parametrize("kind", ["numpy", "dask", "bare DataArray"])
def test_py4dstem_takes_an_array_in_memory(simulated, kind):
    patterns = simulated["data"].values
    scan = {
        "numpy": patterns,
        "dask": da.from_array(patterns, chunks=(4, 4, 64, 64)),
        "bare DataArray": xr.DataArray(patterns, dims=("rx", "ry", "qx", "qy")),
    }[kind]
    ds = py4dstem_strain(scan, reference="0:8,4:8")
    assert ds["exx"].dims == ("method", "rx", "ry") and ds["exx"].attrs["units"] == "1"
    errors = strain_errors(ds, _truth(simulated), symmetry=4)
    # Known answer, every sign: grain 1 (23 of 64 positions) has exx 7e-4, eyy 9e-3, exy 8e-3,
    # theta -0.74 rad. Measured MAE 0.09/0.08/0.007e-3 and 8e-6 rad; exx with its sign
    # flipped scores 0.5e-3, which the tolerance (1e-3 before) must refuse.
    assert errors["coverage"] == 1.0
    assert max(errors[c] for c in ("exx", "eyy", "exy", "theta")) < 2.5e-4, errors


def test_ccstae_takes_a_numpy_array(simulated):
    """Regression: CC-ST-AE trained on a NumPy array, then failed on its missing ``attrs``."""
    ds = ccstae_strain(simulated["data"].values, config=TINY, device="cpu", progress=False)
    assert ds["method"].values.tolist() == ["ccstae"]
    assert ds["theta"].dims == ("method", "rx", "ry") and ds.attrs["source"] == "the scan"


def _strain(method: str, scan) -> xr.Dataset:
    """``method``'s strain of ``scan`` (CC-ST-AE with the smallest config)."""
    if method == "py4dstem":
        return py4dstem_strain(scan)
    return ccstae_strain(scan, config=TINY, device="cpu", progress=False)


def _turned(simulated, degrees: float) -> xr.DataArray:
    """The simulated scan as a DataArray whose attrs give the scan-to-detector rotation, as a
    scan store's calibration does."""
    dims = ("rx", "ry", "qx", "qy")
    return xr.DataArray(simulated["data"].values, dims=dims, attrs={"qr_rotation_deg": degrees})


def test_a_scan_turned_by_90_degrees_gives_the_strain_along_its_axes(simulated):
    """Where the scan-to-detector rotation is known, the result also holds the strain along rx
    and ry. At 90 deg, rx runs along qy: exx_scan is eyy, eyy_scan is exx, the shear changes
    sign and the rotation does not."""
    ds = py4dstem_strain(_turned(simulated, 90.0)).sel({"method": "py4dstem"})
    assert ds.attrs["scan_frame"] == {"qr_rotation_deg": 90.0, "qr_flip": False}
    for scan_name, expected in (("exx", "eyy"), ("eyy", "exx"), ("theta", "theta")):
        np.testing.assert_allclose(ds[f"{scan_name}_scan"], ds[expected], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ds["exy_scan"], -ds["exy"], rtol=0, atol=1e-15)
    assert float(np.abs(ds["exx"] - ds["eyy"]).max()) > 1e-3  # the grains are strained


def test_ccstae_gives_the_strain_along_the_scan_axes_too(simulated):
    from stemlib.strain import strain_in_scan_frame

    ds = ccstae_strain(_turned(simulated, 30.0), config=TINY, device="cpu", progress=False)
    assert ds.attrs["scan_frame"] == {"qr_rotation_deg": 30.0, "qr_flip": False}
    one = ds.sel({"method": "ccstae"})
    turned = strain_in_scan_frame(
        *(one[c].values for c in ("exx", "eyy", "exy", "theta")), qr_rotation_deg=30.0
    )
    for name, value in turned.items():
        np.testing.assert_array_equal(one[f"{name}_scan"].values, value)


@pytest.mark.parametrize(
    ("scan", "match"),
    [
        (np.zeros((64, 32, 32)), r"shape \(64, 32, 32\); expected 4 dims .* reshape"),
        (
            xr.DataArray(np.zeros((32, 32, 4, 4)), dims=("qx", "qy", "rx", "ry")),
            r"transpose it: scan.transpose\('rx', 'ry', 'qx', 'qy'\)",
        ),
        (
            xr.DataArray(np.zeros((4, 4, 32, 32)), dims=("x", "y", "kx", "ky")),
            r"rename them: scan.rename\(\{'x': 'rx', 'y': 'ry', 'kx': 'qx', 'ky': 'qy'\}\)",
        ),
        ([[[[0.0]]]], r"scan is a list; pass a NumPy or dask array"),
    ],
    ids=["3-D", "transposed", "other names", "list"],
)
@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_a_scan_of_another_shape_is_one_sentence(scan, match, method):
    with pytest.raises(InputError, match=match):
        _strain(method, scan)


def test_as_scan_keeps_a_scan_of_the_right_dims():
    scan = xr.DataArray(np.zeros((2, 3, 8, 8)), dims=("rx", "ry", "qx", "qy"), attrs={"a": 1})
    assert as_scan(scan) is scan
    lazy = as_scan(da.zeros((2, 3, 8, 8), chunks=(1, 3, 8, 8)))
    assert isinstance(lazy.data, da.Array) and lazy.dims == ("rx", "ry", "qx", "qy")


def _with_nan(patterns, rx, ry):
    bad = patterns.copy()
    bad[rx, ry, 3, 5] = np.nan
    return bad


@pytest.mark.parametrize(
    ("scan", "match"),
    [
        (np.zeros((0, 8, 32, 32), np.float32), r"shape \(0, 8, 32, 32\), with no probe positions"),
        (np.ones((4, 4, 32, 32), np.complex64), r"dtype complex64; .* np.abs\(scan\)"),
        (
            _with_nan(np.ones((4, 4, 32, 32), np.float32), 2, 3),
            r"NaN or Inf, first in the pattern at \(rx, ry\) = \(2, 3\); .*np.nan_to_num\(scan\)",
        ),
    ],
    ids=["empty", "complex", "NaN"],
)
@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_unusable_values_are_one_sentence_before_any_work(scan, match, method):
    """Regression: an empty scan was a ZeroDivisionError (py4DSTEM) or an IndexError (CC-ST-AE),
    a complex one ran on its real part, and a NaN pixel failed deep inside CC-ST-AE's refinement
    after training ('cannot convert float NaN to integer')."""
    with pytest.raises(InputError, match=match):
        _strain(method, scan)


def test_a_lazy_scan_is_checked_per_block_when_computed(dask_computes):
    patterns = _with_nan(np.ones((4, 6, 8, 8), np.float32), 3, 4)
    with dask_computes as counter:
        scan = as_scan(da.from_array(patterns, chunks=(2, 3, 8, 8)))
    assert counter.count == 0
    np.testing.assert_array_equal(scan[:2].values, patterns[:2])
    with pytest.raises(InputError, match=r"first in the pattern at \(rx, ry\) = \(3, 4\)"):
        scan.compute()


@pytest.mark.parametrize("kind", ["numpy", "DataArray"])
def test_the_reference_region_can_be_a_mask_in_memory(simulated, kind):
    """A simulated scan's ``reference_mask`` (or any boolean array of the scan's shape) is a
    reference as it is: it took a ``.npy`` file written for the purpose."""
    mask = simulated["reference_mask"]
    ds = py4dstem_strain(simulated["data"], reference=mask.values if kind == "numpy" else mask)
    np.testing.assert_array_equal(ds["reference_region"][0].values, mask.values)
    assert ds.attrs["reference"].startswith("mask sha256:")
    assert strain_errors(ds, _truth(simulated), symmetry=4)["exx"] < 2.5e-4  # as above
    with pytest.raises(InputError, match=r"the reference mask has shape \(4, 4\); it must have"):
        ccstae_strain(simulated["data"], reference=np.ones((4, 4), bool), config=TINY)


def test_ccstae_resumes_only_from_the_same_mask(simulated, tmp_path):
    mask = simulated["reference_mask"].values
    run = dict(config=TINY, device="cpu", progress=False, workdir=str(tmp_path))
    ds = ccstae_strain(simulated["data"], reference=mask, **run)
    np.testing.assert_array_equal(ds["reference_region"][0].values, mask)
    with pytest.raises(InputError, match=r"started from reference 'mask sha256:.*', not 'auto'"):
        ccstae_strain(simulated["data"], reference="auto", **run)


def test_a_store_known_by_its_hash_only_as_read(simulated, tmp_path):
    """xarray keeps a DataArray's attributes, the store's content hash among them, through
    selections, binning and arithmetic. Regression: CC-ST-AE knew a noisy copy or a crop of an
    opened store by the store's hash, so a workdir trained on the store was taken as trained
    for them (it only inferred), results recorded the store's hash as their input, and a float
    copy holding NaN was not checked. The hash now holds for the store's values as read."""
    from stemlib.calibration import Calibration
    from stemlib.ccstae.data import data_fingerprint
    from stemlib.io import open_scan, write_scan
    from stemlib.noise import add_noise
    from stemlib.scan import stored_content

    write_scan(simulated["data"].data, str(tmp_path / "scan.zarr"), calibration=Calibration())
    scan = open_scan(str(tmp_path / "scan.zarr"))
    content = scan.attrs["content_sha256"]
    derived = {
        "noisy": add_noise(scan, background=0.5, seed=0),
        "crop": scan.isel(rx=slice(0, 6)),
        "binned": scan.coarsen(qx=2, qy=2).sum(),
        "scaled": scan * 2,
    }
    assert stored_content(scan) == data_fingerprint(scan) == content
    assert stored_content(scan.rename("patterns").assign_attrs(note="kept")) == content
    for name, other in derived.items():
        assert content in other.attrs.values(), name  # the attribute is still there ...
        assert stored_content(other) is None, name  # ... and no longer describes the values
        assert data_fingerprint(other) != content, name
    run = dict(reference=simulated["reference_mask"].values, config=TINY, device="cpu")
    kept = ccstae_strain(scan, workdir=str(tmp_path / "work"), progress=False, **run)
    assert kept.attrs["input_content_sha256"] == content
    with pytest.raises(InputError, match="holds a checkpoint trained on another scan"):
        ccstae_strain(derived["noisy"], workdir=str(tmp_path / "work"), progress=False, **run)
    noisy = py4dstem_strain(derived["noisy"], reference=run["reference"])
    assert noisy.attrs["input_content_sha256"] is None
    with pytest.raises(
        InputError, match=r"holds NaN or Inf, first in the pattern at \(rx, ry\) = \(0, 0\)"
    ):
        py4dstem_strain(scan.where(scan.rx > 0), reference=run["reference"])


def test_the_entry_points_are_found_from_stemlib_and_import_their_libraries_when_used():
    """``stemlib.<tab>`` in a notebook lists both methods, the scores and the plots; ``import
    stemlib`` itself does not import PyTorch, py4DSTEM or matplotlib's pyplot (seconds more)."""
    import subprocess
    import sys

    script = (
        "import sys, stemlib\n"
        "heavy = ('torch', 'py4DSTEM', 'matplotlib.pyplot')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "print(sorted(n for n in stemlib.__all__ if not hasattr(stemlib, n)))\n"
        "print('ccstae_strain' in dir(stemlib), stemlib.ccstae_strain.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == ["[]", "[]", "True stemlib.ccstae.pipeline"]
    import stemlib

    assert stemlib.py4dstem_strain is py4dstem_strain and stemlib.as_scan is as_scan
    with pytest.raises(AttributeError, match="module 'stemlib' has no attribute 'nope'"):
        stemlib.nope  # noqa: B018
