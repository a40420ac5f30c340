"""Strain result stores: every block stored and counted, so that one lost after the store was
written (an interrupted copy, an object deleted on a bucket) is found, never read as positions
with no answer."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from stemlib.calibration import Calibration
from stemlib.errors import InputError
from stemlib.io.scan_store import write_scan
from stemlib.py4dstem.config import Py4DSTEMConfig
from stemlib.rerun import finished_step, run_key, store_identity
from stemlib.results import netcdf_ready, open_strain, strain_dataset, write_strain

COMPONENTS = ("exx", "eyy", "exy", "theta")


def no_answer_here() -> xr.Dataset:
    """A 3 x 4 result whose last row has no answer, and a class map of NaN only (zarr's fill
    value for float maps, a block its writer would skip unless told to store every block)."""
    maps = {k: np.arange(12.0).reshape(3, 4) * 1e-3 for k in ("exx", "eyy", "exy", "theta")}
    valid = np.ones((3, 4), bool)
    valid[2] = False
    nan = (np.full((3, 4), np.nan), {"units": "1", "long_name": "class"})
    ds = strain_dataset("ccstae", **maps, valid=valid, extras={"class_map": nan})
    return ds.assign_attrs(run_keys={"ccstae": "k1"})


def stored_blocks(store) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in store.glob("*/c/**/*") if p.is_file())


def test_every_block_is_stored_and_counted(tmp_path):
    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))
    assert "class_map/c/0/0/0" in stored_blocks(store)  # NaN only, stored all the same
    assert xr.open_zarr(store).attrs["stored_blocks"] == len(stored_blocks(store))
    assert np.isnan(open_strain(str(store))["class_map"]).all()


@pytest.mark.parametrize("lost", ["class_map/c/0/0/0", "exx/c/0/0/0", "rx/c/0"])
def test_a_result_that_lost_a_block_is_one_sentence_and_the_rerun_writes_it(tmp_path, caplog, lost):
    """A missing block of ``exx`` read as NaN beside ``valid = True``; a rerun took the store
    for finished work."""
    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))
    total = len(stored_blocks(store))
    assert finished_step(str(store), "k1")
    (store / lost).unlink()
    damage = (
        f"{store} lacks 1 of the {total} blocks that hold its maps (first missing: {lost}), "
        "which would read as positions with no answer"
    )
    with pytest.raises(InputError) as error:
        open_strain(str(store))
    assert str(error.value) == (
        f"{damage}; copy the store again from where it came from, or rerun the command that "
        "wrote it (stemflow strain or run) to write it again."
    )
    caplog.clear()
    assert not finished_step(str(store), "k1")
    assert [r.getMessage() for r in caplog.records] == [f"{damage}; writing it again."]


def test_a_result_written_before_blocks_were_counted_opens_unchecked(tmp_path):
    """Earlier writers stored no block of NaN only and recorded no count."""
    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))
    group = zarr.open_group(store, mode="r+")
    del group.attrs["stored_blocks"]
    zarr.consolidate_metadata(group.store)
    (store / "class_map/c/0/0/0").unlink()  # as an earlier writer left it
    assert np.isnan(open_strain(str(store))["class_map"]).all()
    assert finished_step(str(store), "k1")


@pytest.mark.parametrize("convention", ["stemflow-0", None])
def test_a_result_of_another_convention_is_one_sentence(tmp_path, convention):
    """A store with our variables but another convention (or none: not ours) would be read
    with the wrong signs or frame; it is refused, and a writer refuses it too."""
    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))
    group = zarr.open_group(store, mode="r+")
    if convention is None:
        del group.attrs["convention"]
    else:
        group.attrs["convention"] = convention
    zarr.consolidate_metadata(group.store)
    held = "records no convention" if convention is None else f"is in convention {convention!r}"
    sentence = (
        f"{store} {held}, not 'stemflow-1' (docs/CONVENTIONS.md), so the signs and frame of its "
        "strain are unknown to this stemflow; pass a store written by `stemflow strain`, or "
        "make its maps with stemlib.strain_dataset."
    )
    with pytest.raises(InputError) as error:
        open_strain(str(store))
    assert str(error.value) == sentence
    foreign = no_answer_here().assign_attrs(convention=convention)
    with pytest.raises(InputError, match="so the signs and frame"):
        write_strain(foreign, str(tmp_path / "other.zarr"))


def test_a_finished_result_is_finished_only_for_the_run_key_it_records(tmp_path):
    """A rerun with another parameter (another key) must write the store again: a check that
    took any recorded key for this run's would keep maps of the old parameters."""
    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))  # records run_keys {"ccstae": "k1"}
    assert finished_step(str(store), "k1")
    assert not finished_step(str(store), "k2")
    assert not finished_step(str(tmp_path / "absent.zarr"), "k1")


def test_the_run_key_sees_the_reference_mask_by_its_bytes_and_the_whole_config(tmp_path):
    """An edited mask saved at the same path, or another configuration, is another run: a key
    that missed either would have the rerun skip it and keep the old maps. The same mask bytes
    at another path are the same run."""
    scan = store_identity({"content_sha256": "ab" * 32, "origin_px": [8.0, 8.0]})
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    here, there = tmp_path / "ref.npy", tmp_path / "copy" / "ref.npy"
    there.parent.mkdir()
    np.save(here, mask)
    np.save(there, mask)

    def key(reference, config=None):
        config = config or Py4DSTEMConfig()
        return run_key(scan, "py4dstem", reference=str(reference), config=config)

    before = key(here)
    assert key(there) == before  # the mask by its content, not its path
    assert key(here, Py4DSTEMConfig(corr_power=0.3)) != before
    assert key(here, Py4DSTEMConfig(corr_power=0.3)) == key(here, Py4DSTEMConfig(corr_power=0.3))
    mask[0, 0] = True
    np.save(here, mask)  # edited in place: same path, same size
    assert key(here) != before


def test_a_result_and_a_scan_go_to_netcdf_through_netcdf_ready(tmp_path):
    """``ds.to_netcdf`` refused the stores' dict, bool and None attributes (``methods``,
    ``software``, ``complete``, ...): an analyst could not hand a result on as netCDF."""
    strain = tmp_path / "strain.zarr"
    ds = no_answer_here().assign_attrs(software={"stemflow": "0.1.0"}, request_key=None)
    write_strain(ds, str(strain))
    opened = xr.open_zarr(strain)
    with pytest.raises(TypeError, match="Invalid value for attr 'methods'"):
        opened.to_netcdf(tmp_path / "refused.nc")
    netcdf_ready(opened).to_netcdf(tmp_path / "strain.nc")
    back = xr.open_dataset(tmp_path / "strain.nc")
    xr.testing.assert_equal(back.load(), opened.load())  # values, NaN, dims, coords
    assert back["valid"].dtype == bool and back["theta"].attrs["units"] == "rad"
    assert back["rx"].attrs["units"] == "px"
    assert json.loads(back.attrs["methods"]) == {"ccstae": {"coverage": 2 / 3}}
    assert json.loads(back.attrs["software"]) == {"stemflow": "0.1.0"}
    assert back.attrs["request_key"] == "null"
    assert back.attrs["stored_blocks"] == opened.attrs["stored_blocks"]
    back.close()

    scan = tmp_path / "scan.zarr"
    data = da.from_array(np.arange(2 * 3 * 4 * 5, dtype="uint16").reshape(2, 3, 4, 5))
    write_scan(data, str(scan), calibration=Calibration(origin_px=(2.0, 2.0)))
    store = xr.open_zarr(scan).assign_attrs(source_bytes=17 * 2**30)  # a 17 GiB source file
    netcdf_ready(store).to_netcdf(tmp_path / "scan.nc")
    with xr.open_dataset(tmp_path / "scan.nc") as back:
        np.testing.assert_array_equal(back["data"].values, data.compute())
        assert back.attrs["complete"] == "true" and back.attrs["source_bytes"] == "18253611008"
        assert list(back.attrs["origin_px"]) == [2.0, 2.0]


def _strict(text: str) -> dict:
    """``text`` parsed as JSON is: RFC 8259 has no NaN or Infinity (Python's json reads them)."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_stored_attributes_are_strict_json_with_null_for_nan(tmp_path):
    """zarr.json held bare ``NaN`` tokens where a method's reference region had too few
    positions for its spread (and ``Infinity`` where it could have one): JavaScript, Julia and
    Rust readers refuse the whole file. Now null, in results, scan stores and netCDF copies."""
    maps = {k: np.zeros((3, 4)) for k in COMPONENTS}
    one = np.zeros((3, 4), bool)
    one[0, 0] = True  # a region of one position: no spread
    region = (one, {"units": "1", "long_name": "reference region"})
    ds = strain_dataset(
        "py4dstem", **maps, extras={"reference_region": region}, method_attrs={"x": np.inf}
    )
    assert np.isnan(ds.attrs["methods"]["py4dstem"]["reference_spread"]["exx"])
    write_strain(ds, str(tmp_path / "strain.zarr"))
    stored = _strict((tmp_path / "strain.zarr" / "zarr.json").read_text())["attributes"]
    record = stored["methods"]["py4dstem"]
    assert record["reference_spread"]["exx"] is None and record["x"] is None
    assert record["reference_spread"]["positions"] == 1
    assert open_strain(str(tmp_path / "strain.zarr")).attrs["methods"] == stored["methods"]
    assert _strict(netcdf_ready(ds).attrs["methods"]) == stored["methods"]

    details = {"exposure_s": float("nan"), "gain": np.float32("inf"), "hot_pixels": [[1, 2]]}
    data = da.zeros((2, 2, 4, 4), dtype="uint16")
    attrs = {"reader_details": details}
    write_scan(data, str(tmp_path / "scan.zarr"), calibration=Calibration(), attrs=attrs)
    stored = _strict((tmp_path / "scan.zarr" / "zarr.json").read_text())
    assert stored["attributes"]["reader_details"] == {
        "exposure_s": None,
        "gain": None,
        "hot_pixels": [[1, 2]],
    }


def test_coordinates_of_a_result_from_plain_arrays_are_labelled(tmp_path):
    """Maps computed from arrays (no scan store's coordinates) had ``rx``/``ry`` with units and
    no ``long_name``: their plots' axes read ``ry [px]`` where a store's read ``probe
    position ry [px]``. ``method`` had no ``long_name`` either."""
    from matplotlib.figure import Figure

    store = tmp_path / "strain.zarr"
    write_strain(no_answer_here(), str(store))
    ds = xr.open_zarr(store)
    for d in ("rx", "ry"):
        assert ds[d].attrs == {"units": "px", "long_name": f"probe position {d}"}
    assert ds["method"].attrs == {"long_name": "strain method"}
    ax = Figure().add_subplot()
    ds["exx"].sel({"method": "ccstae"}).plot(ax=ax)
    assert (ax.get_xlabel(), ax.get_ylabel()) == (
        "probe position ry [px]",
        "probe position rx [px]",
    )


def test_a_position_without_an_answer_is_nan_in_every_component_and_not_valid():
    """CONVENTIONS.md: no answer is NaN with ``valid = False``, never a number. A position the
    method marks invalid loses its finite values; one with a NaN component is invalid whatever
    the method says; coverage counts what is left."""
    maps = {k: np.arange(1.0, 5.0).reshape(2, 2) * 1e-3 * (i + 1) for i, k in enumerate(COMPONENTS)}
    maps["exx"][1, 1] = np.nan  # a NaN component at a position said to be valid
    said = np.array([[True, False], [True, True]])  # (0, 1) invalid, its values finite
    result = strain_dataset("py4dstem", **maps, valid=said).sel({"method": "py4dstem"})
    valid = np.array([[True, False], [True, False]])
    np.testing.assert_array_equal(result["valid"].values, valid)
    for name in COMPONENTS:
        assert np.isnan(result[name].values[~valid]).all(), name
        np.testing.assert_array_equal(result[name].values[valid], maps[name][valid])
    assert result.attrs["methods"]["py4dstem"]["coverage"] == 0.5
