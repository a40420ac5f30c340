"""Comparison of methods: difference maps, agreement and MAE against a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from stemlib.compare import compare_methods, statistics_table
from stemlib.errors import InputError
from stemlib.metrics import strain_errors
from stemlib.results import combine_methods, open_strain, strain_dataset, write_strain
from stemlib.simulate import SimulationConfig, simulate
from stemlib.truth import as_truth, truth_dataset


def maps(rng, scale=0.01):
    return {k: rng.normal(scale=scale, size=(6, 7)) for k in ("exx", "eyy", "exy", "theta")}


def test_differences_and_mae_against_a_known_truth():
    rng = np.random.default_rng(3)
    truth_maps = maps(rng)
    truth = truth_dataset(**truth_maps).rename({f"truth_{k}": k for k in truth_maps})
    a_maps = {k: v + 0.001 for k, v in truth_maps.items()}  # off by +1e-3 everywhere
    b_maps = {k: v - 0.002 for k, v in truth_maps.items()}  # off by -2e-3 everywhere
    b_valid = np.ones((6, 7), bool)
    b_valid[0, :] = False  # one row without an answer
    ds = combine_methods(
        [strain_dataset("ccstae", **a_maps), strain_dataset("py4dstem", **b_maps, valid=b_valid)]
    )
    out, stats = compare_methods(ds, truth=truth, symmetry=4)
    np.testing.assert_allclose(out["diff_exx"].values[1:], 0.003)
    assert np.isnan(out["diff_exx"].values[0]).all()
    assert stats["coverage"] == {"ccstae": 1.0, "py4dstem": pytest.approx(35 / 42)}
    assert stats["mae"]["ccstae"]["exx"] == pytest.approx(0.001)
    assert stats["mae"]["py4dstem"]["eyy"] == pytest.approx(0.002)
    assert stats["mae"]["py4dstem"]["coverage"] == pytest.approx(35 / 42)
    assert stats["agreement"]["exy"]["positions"] == 35
    assert stats["agreement"]["exy"]["correlation"] == pytest.approx(1.0)
    np.testing.assert_allclose(out["truth_exx"].values, truth_maps["exx"])
    table = statistics_table(stats)
    assert "| MAE exx vs truth (1e-3) | 1.000 | 2.000 |" in table
    assert "| coverage | 100.0% | 83.3% |" in table


def test_the_spread_in_the_reference_region_is_a_robust_standard_deviation():
    """Known answer: normal scatter of 1e-3 over a 30 x 30 reference region, with 5 % failed
    fits reading 5e-2 and positions without an answer; the spread is the 1e-3, the failed fits
    do not move it by more than 10 %, and the other positions (strained by 1e-2) do not count."""
    rng = np.random.default_rng(0)
    region = np.zeros((40, 40), bool)
    region[:30, :30] = True
    scatter = {c: rng.normal(0, 1e-3, (40, 40)) for c in ("exx", "eyy", "exy", "theta")}
    scatter = {c: np.where(region, v, v + 1e-2) for c, v in scatter.items()}
    failed = rng.random((40, 40)) < 0.05
    scatter["exx"] = np.where(failed, 5e-2, scatter["exx"])
    valid = rng.random((40, 40)) > 0.1
    extras = {"reference_region": (region, {"units": "1"})}
    ds = strain_dataset("a", **scatter, valid=valid, extras=extras)
    spread = ds.attrs["methods"]["a"]["reference_spread"]
    assert spread["positions"] == int((region & valid).sum())
    for name in ("exx", "eyy", "exy", "theta"):
        assert spread[name] == pytest.approx(1e-3, rel=0.1), name
    # A region with fewer than five answers gives no figure, and says how many it had.
    few = np.zeros((40, 40), bool)
    few[0, :4] = True
    small = strain_dataset("b", **scatter, extras={"reference_region": (few, {"units": "1"})})
    spread = small.attrs["methods"]["b"]["reference_spread"]
    assert np.isnan(spread["exx"]) and spread["positions"] == 4
    # Both in the statistics table, theta in degrees.
    _, stats = compare_methods(combine_methods([ds, small]), symmetry=4)
    table = statistics_table(stats)
    assert (
        f"| exx spread in the reference (1e-3) | {stats['spread']['a']['exx'] * 1e3:.3f} | nan |"
        in table
    )
    assert "| theta spread in the reference (deg) | 0.05" in table


def test_variables_of_one_method_are_nan_for_the_other_once_written(tmp_path):
    zero = np.zeros((2, 3))
    stored = []
    for method, extra, value in (("ccstae", "class_map", np.int32(1)), ("py4dstem", "n_disks", 7)):
        ds = strain_dataset(method, exx=zero, eyy=zero, exy=zero, theta=zero)
        ds[extra] = ds["exx"].copy(data=np.full((1, 2, 3), value))
        ds["reference_mask"] = ds["valid"].copy(data=np.ones((1, 2, 3), bool))
        if method == "py4dstem":
            ds = ds.drop_vars("reference_mask")
        write_strain(ds, str(tmp_path / f"{method}.zarr"))
        stored.append(open_strain(str(tmp_path / f"{method}.zarr")))
    write_strain(combine_methods(stored), str(tmp_path / "both.zarr"))
    both = open_strain(str(tmp_path / "both.zarr"))
    assert both["class_map"].sel({"method": "ccstae"}).values.tolist() == [[1, 1, 1]] * 2
    assert np.isnan(both["class_map"].sel({"method": "py4dstem"})).all()
    assert np.isnan(both["n_disks"].sel({"method": "ccstae"})).all()
    assert (both["n_disks"].sel({"method": "py4dstem"}) == 7).all()
    assert (both["reference_mask"].sel({"method": "ccstae"}) == 1).all()
    assert np.isnan(both["reference_mask"].sel({"method": "py4dstem"})).all()
    assert both["valid"].dtype == bool and both["valid"].all()


def test_rotation_differences_wrap_by_the_symmetry():
    zero = np.zeros((2, 2))
    a = strain_dataset(
        "ccstae", exx=zero, eyy=zero, exy=zero, theta=np.full((2, 2), np.radians(44.0))
    )
    b = strain_dataset(
        "py4dstem", exx=zero, eyy=zero, exy=zero, theta=np.full((2, 2), np.radians(-45.0))
    )
    out, stats = compare_methods(combine_methods([a, b]), symmetry=4)
    np.testing.assert_allclose(np.degrees(out["diff_theta"].values), -1.0)
    assert "mae" not in stats


def test_without_a_symmetry_rotations_are_compared_by_the_one_recorded():
    """compare_methods(ds, truth=t) without ``symmetry`` compared rotations as if the lattice
    had none: 44 deg against a truth of -45 deg on a 4-fold lattice scored 89 deg, where
    strain_errors (which takes the truth's) said 1. It takes the truth's, else the methods'."""
    zero, four = np.zeros((2, 2)), {"symmetry": 4}
    parts = {"exx": zero, "eyy": zero, "exy": zero}
    ds = combine_methods(
        [
            strain_dataset(m, **parts, theta=np.full((2, 2), np.radians(d)), method_attrs=four)
            for m, d in (("ccstae", 44.0), ("py4dstem", -44.5))
        ]
    )
    truth = truth_dataset(**parts, theta=np.full((2, 2), np.radians(-45.0)), symmetry=4)
    _, stats = compare_methods(ds, truth=truth)  # as a simulated scan carries it
    mae = {m: np.degrees(stats["mae"][m]["theta"]) for m in ("ccstae", "py4dstem")}
    assert mae == {"ccstae": pytest.approx(1.0), "py4dstem": pytest.approx(0.5)}
    out, _ = compare_methods(ds)  # no truth: the symmetry the methods record
    np.testing.assert_allclose(np.degrees(out["diff_theta"].values), -1.5)
    out, _ = compare_methods(ds, symmetry=1)  # given, it decides
    np.testing.assert_allclose(np.degrees(out["diff_theta"].values), 88.5)


@pytest.mark.parametrize(
    ("symmetry", "estimate", "truth", "error"),
    [(4, 44.0, -45.0, 1.0), (4, -44.5, 45.0, 0.5), (6, 29.0, -30.0, 1.0), (2, -89.0, 90.0, 1.0)],
)
def test_rotation_errors_against_the_truth_wrap_by_the_symmetry(symmetry, estimate, truth, error):
    """Rotations are defined modulo the lattice's symmetry: an estimate of 44 deg against a
    truth of -45 deg on a 4-fold lattice is 1 deg off, not 89."""
    zero = np.zeros((2, 3))
    parts = {"exx": zero, "eyy": zero, "exy": zero}
    result = strain_dataset("ccstae", **parts, theta=np.full((2, 3), np.radians(estimate)))
    truth_maps = truth_dataset(**parts, theta=np.full((2, 3), np.radians(truth)))
    errors = strain_errors(
        result.sel({"method": "ccstae"}),
        truth_maps.rename({f"truth_{k}": k for k in ("exx", "eyy", "exy", "theta")}),
        symmetry=symmetry,
    )
    assert np.degrees(errors["theta"]) == pytest.approx(error)
    assert errors["exx"] == 0.0 and errors["coverage"] == 1.0


def test_the_simulated_dataset_is_a_truth_as_it_comes():
    """Regression: scoring against ``simulate(...)`` itself (its truth named ``truth_exx``, ...)
    was a KeyError 'No variable named exx' in strain_errors and compare_methods."""
    sim = simulate(SimulationConfig(scan=(4, 5), pattern=32, grains=2, seed=3))
    parts = {c: sim[f"truth_{c}"].values for c in ("exx", "eyy", "exy", "theta")}
    off = strain_dataset("py4dstem", **{**parts, "theta": parts["theta"] - 2e-3})
    errors = strain_errors(off, sim)  # the symmetry too comes from the simulation (4)
    assert errors["theta"] == pytest.approx(2e-3) and errors["exx"] == 0.0
    assert errors == strain_errors(off, as_truth(sim), symmetry=4)
    out, stats = compare_methods(off, truth=sim, symmetry=4)
    assert stats["mae"]["py4dstem"] == errors
    np.testing.assert_array_equal(out["truth_exy"].values, parts["exy"])
    # A published result holds a method's exx beside the truth's truth_exx: the truth is scored.
    assert strain_errors(off, out, symmetry=4) == errors
    with pytest.raises(InputError, match=r"the truth has variables \[.data.\], not exx"):
        strain_errors(off, sim[["data"]], symmetry=4)
    with pytest.raises(InputError, match=r"records no lattice symmetry; pass symmetry=n"):
        strain_errors(off, truth_dataset(**parts))


def method_with_reference(name: str, rows: slice) -> object:
    """A zero strain result of ``name`` whose reference region is ``rows`` of a 6 x 7 scan."""
    region = np.zeros((6, 7), bool)
    region[rows] = True
    zero = np.zeros((6, 7))
    extras = {"reference_region": (region, {"units": "1", "long_name": "reference region"})}
    return strain_dataset(name, exx=zero, eyy=zero, exy=zero, theta=zero, extras=extras)


@pytest.mark.parametrize(
    ("py4dstem_rows", "warned"),
    [(slice(0, 2), False), (slice(1, 3), False), (slice(2, 6), True), (slice(4, 6), True)],
)
def test_methods_measured_against_different_references_are_not_comparable(py4dstem_rows, warned):
    """Each method finds --reference auto on its own maps; where their regions share less than
    half of the smaller one, the comparison says so (multislice Si at 1,000 electrons: CC-ST-AE
    took 135 positions of one grain, py4DSTEM 20 of another, and they differed by 2-3e-2)."""
    ds = combine_methods(
        [
            method_with_reference("ccstae", slice(0, 2)),
            method_with_reference("py4dstem", py4dstem_rows),
        ]
    )
    _, stats = compare_methods(ds)
    if not warned:
        assert stats["warnings"] == []
        return
    (sentence,) = stats["warnings"]
    shared = 0 if py4dstem_rows.start >= 2 else 7
    assert sentence.startswith(
        "the two methods measured their strain against different reference regions "
        f"(ccstae 14 positions, py4dstem {7 * (py4dstem_rows.stop - py4dstem_rows.start)}, "
        f"{shared} in common)"
    )
    assert "pass one --reference region known to be unstrained" in sentence


def _publish(tmp_path, request: str | None = None) -> dict:
    """publish-strain, in a flow, of two methods measured against different reference regions
    on a scan of zeros: ``tmp_path/strain.zarr``."""
    import dask.array as da
    from prefect import flow

    from stemlib.calibration import Calibration
    from stemlib.io.scan_store import write_scan
    from tasks.publish import publish_strain

    scan = str(tmp_path / "scan.zarr")
    write_scan(da.zeros((6, 7, 8, 8), dtype="u2"), scan, calibration=Calibration())
    stores = {
        "ccstae": write_strain(method_with_reference("ccstae", slice(0, 2)), str(tmp_path / "a")),
        "py4dstem": write_strain(
            method_with_reference("py4dstem", slice(4, 6)), str(tmp_path / "b")
        ),
    }

    @flow
    def publish() -> dict:
        dest = str(tmp_path / "strain.zarr")
        return publish_strain(scan, stores, dest, run_keys={}, request=request)

    return publish()


@pytest.mark.usefixtures("prefect_harness")
def test_the_published_result_and_the_run_carry_the_comparisons_warning(tmp_path):
    """publish-strain returns the comparison's warning under both methods' names (which
    `stemflow run` prints and the flow's artifact lists) and stores it in the statistics."""
    published = _publish(tmp_path)
    (sentence,) = published["warnings"]["ccstae and py4dstem"]
    assert "different reference regions (ccstae 14 positions, py4dstem 14, 0 in common)" in sentence
    assert published["warnings"]["ccstae"] == published["warnings"]["py4dstem"] == []
    stored = open_strain(str(tmp_path / "strain.zarr"))
    assert stored.attrs["statistics"]["warnings"] == [sentence]


@pytest.mark.usefixtures("prefect_harness")
def test_a_rerun_reads_the_published_summary_back(tmp_path, caplog):
    """What a rerun of the same request returns without computing: publish-strain's summary,
    read back from the dataset (its statistics as JSON: the agreement's correlations, NaN on
    these maps, as None; the table the same); nothing for another request, or for a
    publication that lost a PNG map, which the rerun publishes again."""
    from tasks.publish import published_result

    published = _publish(tmp_path, request="r1")
    dest = str(tmp_path / "strain.zarr")
    assert published["statistics"]["agreement"]["exx"]["correlation"] is None
    assert "| exx | " in published["table"] and "| nan |" in published["table"]
    assert published_result(dest, "r1") == published
    assert published_result(dest, "r2") is None
    assert published_result(str(tmp_path / "elsewhere.zarr"), "r1") is None
    assert _rerun_warnings(caplog) == []
    (tmp_path / "strain-virtual.png").unlink()
    assert published_result(dest, "r1") is None
    missing = f"{tmp_path}/strain-virtual.png is missing; publishing {dest} again."
    assert _rerun_warnings(caplog) == [missing]


def _rerun_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stemlib.rerun"]


@pytest.mark.parametrize(("ccstae", "py4dstem", "warned"), [(4, 4, False), (4, 2, True)])
def test_methods_that_took_different_symmetries_are_not_comparable(ccstae, py4dstem, warned):
    """Multislice Si at 1,000 electrons per pattern, reference auto (a strained grain): both
    methods took the same 141 positions, but py4DSTEM read the lattice as 2-fold and CC-ST-AE
    as 4-fold (removing a 4 % ellipse); their maps differed by 2e-2 with correlation near 0,
    and only py4DSTEM's own warning hinted at it."""
    zero = np.zeros((6, 7))
    ds = combine_methods(
        [
            strain_dataset(
                m, exx=zero, eyy=zero, exy=zero, theta=zero, method_attrs={"symmetry": n}
            )
            for m, n in (("ccstae", ccstae), ("py4dstem", py4dstem))
        ]
    )
    _, stats = compare_methods(ds)
    expected = (
        "the two methods took the lattice for different symmetries (ccstae 4-fold, py4dstem "
        "2-fold), so they fold rotations and measure the detector's ellipse differently and "
        "their maps cannot be compared; pass --symmetry"
    )
    assert [s[: len(expected)] for s in stats["warnings"]] == ([expected] if warned else [])
