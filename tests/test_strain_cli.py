"""``stemflow strain SCAN DEST --method py4dstem|ccstae`` and the Prefect task (issues 5 and 6): a
published strain store with its PNGs, and one clear sentence, a non-zero exit and nothing
published for each kind of bad input."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import dask
import numpy as np
import pytest

from flows.cli import main
from stemlib.baseline_py4dstem import py4dstem_strain
from stemlib.calibration import Calibration
from stemlib.io import open_scan
from stemlib.io.scan_store import write_scan
from stemlib.metrics import strain_errors
from stemlib.plots import save_png, virtual_figure
from stemlib.results import open_strain
from stemlib.simulate import SimulationConfig, write_simulation
from stemlib.truth import open_truth
from stemlib.virtual import virtual_images


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 12 x 12 scan of 64 px patterns, 4 square grains within +-45 deg, with its truth."""
    store = str(tmp_path_factory.mktemp("scan") / "scan.zarr")
    with dask.config.set(scheduler="threads"):
        write_simulation(SimulationConfig(scan=(12, 12), pattern=64, grains=4, seed=3), store)
    return store


@pytest.fixture(scope="module")
def warm_cluster():
    """One real local cluster for the module's runs, which name it by DASK_SCHEDULER_ADDRESS as
    a facility names its own: a run on a cluster of its own spent about 10 s starting it and
    importing py4DSTEM in its workers. test_cli_publishes_to_object_storage runs on a cluster
    of its own, as the command does by default."""
    from flows.runners import local_cluster

    with local_cluster() as cluster:
        yield cluster.scheduler_address


@pytest.fixture(autouse=True)
def _on_the_warm_cluster(warm_cluster, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", warm_cluster)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("stemflow strain: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _nothing_published(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith("strain") or ".partial-" in p]


def test_cli_writes_the_strain_store_and_the_maps(scan, tmp_path, capsys):
    (tmp_path / "py4dstem.yaml").write_text(
        "threshold_sigma: 6.0\nmin_disks: 5\nellipse: {ellipticity: 0.0}\n"
    )
    dest = str(tmp_path / "strain.zarr")
    args = [
        "strain",
        scan,
        dest,
        "--method",
        "py4dstem",
        "--config",
        str(tmp_path / "py4dstem.yaml"),
    ]
    assert main(args) == 0  # reference auto, symmetry auto, a LocalCluster on all cores
    out, err = capsys.readouterr()
    assert f"wrote {dest}: py4dstem strain of 12 x 12 positions, coverage 100.0 %" in out
    assert re.search(r"^py4dstem: Bragg disks 144/144 patterns \(\d+ patterns/s\)$", err, re.M)
    assert "symmetry 4" in out and str(tmp_path / "strain-py4dstem.png") in out
    ds = open_strain(dest)
    assert list(ds["method"].values) == ["py4dstem"] and ds.attrs["convention"] == "stemflow-1"
    record = ds.attrs["methods"]["py4dstem"]
    assert record["config"]["threshold_sigma"] == 6.0 and record["config"]["min_disks"] == 5
    assert record["detector_ellipse"] == {
        "ellipticity": 0.0,
        "angle_deg": 0.0,
        "removed": False,
        "how": "given",
    }
    assert record["coverage"] == 1.0 and record["invalid_positions"] == 0
    assert ds.attrs["input_content_sha256"] and "py4DSTEM" in ds.attrs["software"]
    truth = open_truth(scan)
    errors = strain_errors(ds.sel({"method": "py4dstem"}), truth, symmetry=4)
    assert max(errors[c] for c in ("exx", "eyy", "exy")) < 1.5e-3
    assert (tmp_path / "strain-py4dstem.png").read_bytes()[:4] == b"\x89PNG"
    # Its precision, printed as stored: the scatter of the maps in the reference region.
    spread = record["reference_spread"]
    strain = ", ".join(f"{c} {spread[c] * 1e3:.2f}" for c in ("exx", "eyy", "exy"))
    assert (
        f"  spread in the reference region ({spread['positions']} positions, robust std): "
        f"{strain} (1e-3), theta {np.degrees(spread['theta']):.3f} deg"
    ) in out
    # Where the sample is: the scan's virtual images, and their picture with the reference.
    assert f"virtual images {tmp_path / 'strain-virtual.png'}" in out
    assert (tmp_path / "strain-virtual.png").read_bytes()[:4] == b"\x89PNG"
    images = virtual_images(open_scan(scan))
    for name in ("virtual_bf", "virtual_adf"):
        assert ds[name].dims == ("rx", "ry") and ds[name].attrs == images[name].attrs
        assert ds[name].values.tobytes() == images[name].values.tobytes()


def test_a_rerun_of_a_finished_run_skips_it_and_a_changed_one_runs(scan, tmp_path, capsys):
    """DEST records the run's fingerprint: the same scan content and settings skip (nothing is
    written), unless DEST lost a block since; another reference, the same mask file with
    other contents, or the scan written again with another calibration, run again."""
    dest, mask = str(tmp_path / "strain.zarr"), tmp_path / "reference.npy"
    region = np.zeros((12, 12), bool)
    region[:4, :4] = True
    np.save(mask, region)
    args = ["strain", scan, dest, "--method", "py4dstem", "--reference", str(mask)]
    assert main(args) == 0
    capsys.readouterr()
    metadata = tmp_path / "strain.zarr" / "zarr.json"
    stamp = metadata.stat().st_mtime_ns
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(
        f"{dest} already holds this result (same scan content and calibration, method, "
        "reference, symmetry and configuration): skipped."
    )
    assert metadata.stat().st_mtime_ns == stamp
    assert main([*args, "--recompute"]) == 0  # after an upgrade, say: computed again
    assert capsys.readouterr().out.startswith(f"wrote {dest}: py4dstem strain")
    stamp = metadata.stat().st_mtime_ns

    (tmp_path / "strain.zarr" / "exx" / "c" / "0" / "0" / "0").unlink()  # an interrupted copy
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {dest}: py4dstem strain")
    warning, progress = err.splitlines()
    assert warning.startswith(f"stemflow strain: warning: {dest} lacks 1 of the ")
    assert warning.endswith(
        "(first missing: exx/c/0/0/0), which would read as positions with no "
        "answer; writing it again."
    )
    assert progress.startswith("py4dstem: Bragg disks 144/144 patterns")
    assert not np.isnan(open_strain(dest)["exx"]).any()

    region[:4, :4], region[8:, 8:] = False, True  # same file name, another region
    np.save(mask, region)
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote {dest}: py4dstem strain")
    stored = open_strain(dest)["reference_region"].sel({"method": "py4dstem"})
    assert stored.values.astype(bool).tolist() == region.tolist()

    # The same patterns written again once the scan rotation was calibrated (ingest
    # --overwrite --qr-rotation-deg): another input, whose result has the scan-frame maps.
    stored = open_scan(scan)
    rotated = str(tmp_path / "rotated.zarr")
    calibration = Calibration.from_attrs(stored.attrs).merged(Calibration(qr_rotation_deg=20.0))
    write_scan(stored.data, rotated, calibration=calibration)
    assert open_scan(rotated).attrs["content_sha256"] == stored.attrs["content_sha256"]
    assert main(["strain", rotated, *args[2:]]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {dest}: py4dstem strain")
    assert open_strain(dest).attrs["scan_frame"]["qr_rotation_deg"] == 20.0


def test_a_disk_full_at_the_maps_is_one_sentence_and_the_rerun_draws_them(
    scan, tmp_path, capsys, monkeypatch
):
    """The disk fills up as the virtual images' PNG is written, after the dataset and the maps:
    one sentence naming that PNG (was a traceback, and a cut PNG of 8 KB on a full tmpfs), no
    part of it left, and a rerun, which skips the finished dataset, draws it."""
    dest = str(tmp_path / "strain.zarr")
    args = ["strain", scan, dest, "--method", "py4dstem", "--reference", "0:4,0:4"]
    write_bytes = Path.write_bytes

    def full_at_the_virtual_images(path, data):
        if "strain-virtual.png" not in path.name:
            return write_bytes(path, data)
        write_bytes(path, bytes(data)[:8192])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_bytes", full_at_the_virtual_images)
        assert main(args) == 2
    virtual = tmp_path / "strain-virtual.png"
    progress, error = capsys.readouterr().err.splitlines()
    assert progress.startswith("py4dstem: Bragg disks 144/144 patterns")
    assert error == (
        f"stemflow strain: error: {virtual}: its disk is full; free space on it, or write to "
        "another disk."
    )
    assert sorted(os.listdir(tmp_path)) == ["strain-py4dstem.png", "strain.zarr"]
    maps = (tmp_path / "strain-py4dstem.png").read_bytes()

    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{dest} already holds this result (same scan content and calibration, method, "
        "reference, symmetry and configuration): skipped.",
        f"  drew the missing {virtual}",
    ]
    assert (tmp_path / "strain-py4dstem.png").read_bytes() == maps  # there: not drawn again
    again = save_png(virtual_figure(open_strain(dest)), str(tmp_path / "again.png"))
    assert virtual.read_bytes() == Path(again).read_bytes()


def test_a_strained_reference_region_is_warned_about(scan, tmp_path, capsys):
    """Against the unstrained grain the maps carry no warning; against a grain strained by
    3.85 % of anisotropy (|exx - eyy + 2i exy|), every position carries it, and the command
    says so on stderr, in one line, and in the result's record, still publishing the maps."""
    truth = open_truth(scan)
    with dask.config.set(scheduler="threads"):
        unstrained = py4dstem_strain(open_scan(scan), reference="auto", symmetry=4)
    assert unstrained.attrs["methods"]["py4dstem"]["warnings"] == []
    np.save(tmp_path / "strained.npy", truth["grain_id"].values == 1)
    dest = str(tmp_path / "strained.zarr")
    args = ["strain", scan, dest, "--method", "py4dstem", "--reference"]
    assert main([*args, str(tmp_path / "strained.npy"), "--symmetry", "4"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    warnings = open_strain(dest).attrs["methods"]["py4dstem"]["warnings"]
    assert len(warnings) == 1 and err == [f"stemflow strain: warning: {warnings[0]}"]
    assert warnings[0].startswith(
        "the strain maps show a median anisotropy of 3.8 % (exx - eyy and 2 exy) against the "
        f"reference region {tmp_path / 'strained.npy'}: 6 positions, above the 2.5 %"
    )
    assert warnings[0].endswith("pass --reference with a region known to be unstrained.")


def test_cli_trains_ccstae_draws_its_bases_and_a_rerun_only_infers(scan, tmp_path, capsys):
    """Issue 6: ``--method ccstae`` publishes the maps with the class map and reconstruction
    error, a picture of the learned bases, and leaves its model in the work folder, where a
    rerun finds it, also after a change that only alters inference."""
    (tmp_path / "cc.yaml").write_text(
        "epochs: 2\nchannels: 8\nsearch_patterns: 64\nbatch_size: 16\n"  # on the cpu preset
    )
    dest = str(tmp_path / "strain.zarr")
    args = ["strain", scan, dest, "--method", "ccstae", "--config", str(tmp_path / "cc.yaml")]
    assert main([*args, "--device", "cpu"]) == 0
    run = capsys.readouterr()
    assert "epoch 2/2" in run.err  # progress while it trains, and in each pass over the scan
    for stage in ("rotation search", "inference", "inference from the neighbours' warps"):
        assert f"ccstae: {stage} 144/144 patterns (" in run.err
    assert "ccstae: starting bases, round 2/2 on 64 sampled patterns (" in run.err
    assert f"wrote {dest}: ccstae strain of 12 x 12 positions, coverage 100.0 %" in run.out
    bases = tmp_path / "strain-ccstae-bases.png"
    assert f"learned bases {bases}" in run.out
    assert bases.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "strain-ccstae.png").is_file()
    models = list((tmp_path / ".strain.zarr.work").glob("ccstae-model-*/checkpoint.pt"))
    assert len(models) == 1 and f"model {models[0].parent}" in run.out
    first = open_strain(dest)
    assert {"class_map", "reconstruction_error"} <= set(first.data_vars)
    record = first.attrs["methods"]["ccstae"]
    assert record["config"]["encoder_downsample"] == 2 and record["config"]["lr"] == 2e-3
    assert record["warnings"] == []  # "auto" took the unstrained grain
    sha = record["model_checkpoint_sha256"]

    (tmp_path / "cc.yaml").write_text(
        (tmp_path / "cc.yaml").read_text() + "refine_steps: 0\n"  # inference only
    )
    assert main(args) == 0
    again = capsys.readouterr()
    assert "ccstae: inference 144/144 patterns (" in again.err  # the progress is shown...
    assert "epoch" not in again.err  # ...and nothing trained again
    assert open_strain(dest).attrs["methods"]["ccstae"]["model_checkpoint_sha256"] == sha
    assert list((tmp_path / ".strain.zarr.work").glob("ccstae-model-*")) == [models[0].parent]

    # --recompute (after an upgrade, say) trains anew, in a model folder emptied first.
    (models[0].parent / "sentinel").write_text("the first run's model folder")
    assert main([*args, "--recompute"]) == 0
    assert "epoch 2/2" in capsys.readouterr().err
    assert not (models[0].parent / "sentinel").exists() and models[0].is_file()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "0:13,0:4",
            "--reference 0:13,0:4 lies outside the scan of 12 x 12 positions; give RX0:RX1,RY0:RY1",
        ),
        ("4:4,0:4", "--reference 4:4,0:4 is an empty region; give RX0:RX1,RY0:RY1 with RX0 < RX1"),
        ("wrong.npy", "has shape (3, 3); it must have the scan shape (12, 12)."),
        ("centre", "--reference 'centre' is not understood; use auto, RX0:RX1,RY0:RY1"),
    ],
)
@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_bad_reference(scan, tmp_path, capsys, monkeypatch, reference, message, method):
    np.save(tmp_path / "wrong.npy", np.ones((3, 3), bool))
    monkeypatch.chdir(tmp_path)
    dest = str(tmp_path / "strain.zarr")
    assert main(["strain", scan, dest, "--method", method, "--reference", reference]) == 2
    assert message in _error(capsys)
    assert _nothing_published(tmp_path)


def test_a_workdir_that_is_a_file(scan, tmp_path, capsys):
    (tmp_path / "work").write_text("not a folder")
    dest = str(tmp_path / "strain.zarr")
    args = ["strain", scan, dest, "--method", "ccstae", "--workdir", str(tmp_path / "work")]
    assert main(args) == 2
    err = _error(capsys)
    assert f"cannot make the work folder {tmp_path / 'work'}/ccstae-model-" in err
    assert "(Not a directory); give a workdir that is a folder you can write to." in err
    assert _nothing_published(tmp_path)


def test_a_store_that_is_not_a_scan(tmp_path, capsys):
    dest = str(tmp_path / "strain.zarr")
    assert main(["strain", str(tmp_path / "missing.zarr"), dest, "--method", "py4dstem"]) == 2
    assert "missing.zarr does not exist; run `stemflow ingest SOURCE" in _error(capsys)
    (tmp_path / "folder").mkdir()
    assert main(["strain", str(tmp_path / "folder"), dest, "--method", "py4dstem"]) == 2
    assert (
        "folder is not a Zarr scan store; convert the raw scan with `stemflow ingest` first."
        in _error(capsys)
    )
    assert _nothing_published(tmp_path)


def test_a_strain_store_given_as_the_scan(tmp_path, capsys):
    from stemlib.results import strain_dataset, write_strain

    zeros = np.zeros((3, 3))
    other = str(tmp_path / "other.zarr")
    write_strain(strain_dataset("py4dstem", exx=zeros, eyy=zeros, exy=zeros, theta=zeros), other)
    assert main(["strain", other, str(tmp_path / "strain.zarr"), "--method", "py4dstem"]) == 2
    assert "is not a scan store: it needs a variable 'data' with dims (rx, ry, qx, qy)" in _error(
        capsys
    )
    assert _nothing_published(tmp_path)


@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_a_destination_holding_something_else_is_refused_before_any_work(
    scan, tmp_path, capsys, method
):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("months of work")
    for dest in (str(folder), scan):
        assert main(["strain", scan, dest, "--method", method]) == 2
        assert _error(capsys) == (
            f"stemflow strain: error: {dest} already exists and is not a stemflow strain store, "
            "the only thing a run replaces; choose another destination or remove it."
        )
    assert (folder / "chapter1.tex").read_text() == "months of work"
    assert os.listdir(tmp_path) == ["thesis"] and open_truth(scan).sizes["rx"] == 12
    # A destination that cannot be written (inside a file here; a read-only disk or another
    # user's folder alike): py4DSTEM mapped the whole scan before its write said so.
    dest = folder / "chapter1.tex" / "strain.zarr"
    assert main(["strain", scan, str(dest), "--method", method]) == 2
    assert _error(capsys) == (  # nothing else on stderr: no progress, nothing computed
        f"stemflow strain: error: {dest}: Not a directory; check the path and that you can "
        "write there."
    )


def test_another_methods_result_is_never_replaced(scan, tmp_path, capsys):
    from stemlib.results import strain_dataset, write_strain

    zeros = np.zeros((12, 12))
    dest = str(tmp_path / "strain.zarr")
    write_strain(strain_dataset("py4dstem", exx=zeros, eyy=zeros, exy=zeros, theta=zeros), dest)
    assert main(["strain", scan, dest, "--method", "ccstae"]) == 2
    assert _error(capsys) == (
        f"stemflow strain: error: {dest} holds the py4dstem result, which the ccstae result "
        "would replace; choose another destination, or run the methods together with "
        "`stemflow run`."
    )
    assert list(open_strain(dest)["method"].values) == ["py4dstem"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_non_finite_pixels_stored_on_purpose_read_as_no_counts(scan, tmp_path, capsys, method):
    """A dead pixel (NaN in every pattern) and a lost pattern (all NaN), ingested with
    --allow-nonfinite: the lost position gets no answer, the others their known strain."""
    from stemlib.io import open_scan

    data = open_scan(scan).values.astype(np.float32)
    data[:, :, 5, 7] = np.nan
    data[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", data)
    store, dest = str(tmp_path / "nan.zarr"), str(tmp_path / "strain.zarr")
    assert main(["ingest", str(tmp_path / "nan.npy"), store, "--allow-nonfinite", "--quiet"]) == 0
    (tmp_path / "short.yaml").write_text("epochs: 2\n" if method == "ccstae" else "{}\n")
    config = ["--config", str(tmp_path / "short.yaml")]
    assert main(["strain", store, dest, "--method", method, "--device", "cpu", *config]) == 0
    ds = open_strain(dest).sel({"method": method})
    assert not ds["valid"][3, 4] and int(ds["valid"].sum()) == 143
    assert float(ds["virtual_bf"][3, 4]) == 0 and np.isfinite(ds["virtual_adf"]).all()
    errors = strain_errors(ds, open_truth(scan), symmetry=4)
    assert max(errors[c] for c in ("exx", "eyy", "exy")) < 1e-3 and errors["theta"] < 1e-3


def test_bad_config(scan, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("threshold_sigmaa: 3\n")
    dest = str(tmp_path / "strain.zarr")
    assert (
        main(["strain", scan, dest, "--method", "py4dstem", "--config", str(tmp_path / "bad.yaml")])
        == 2
    )
    assert "threshold_sigmaa: Extra inputs are not permitted; correct it and run again." in _error(
        capsys
    )
    assert (
        main(
            ["strain", scan, dest, "--method", "py4dstem", "--config", str(tmp_path / "none.yaml")]
        )
        == 2
    )
    assert "none.yaml does not exist; pass a YAML or JSON file of Py4DSTEMConfig fields." in _error(
        capsys
    )
    for method, name, text, message in (
        (
            "py4dstem",
            "broken.yaml",
            "min_disks: 5\nthreshold_sigma: [6\n",
            "not valid YAML (line 3)",
        ),
        ("ccstae", "broken.json", '{"epochs": 1,', "not valid JSON (line 1)"),
        ("ccstae", "typo.yaml", "epoch: 1\n", "typo.yaml: epoch: Extra inputs are not permitted"),
    ):
        (tmp_path / name).write_text(text)
        args = ["strain", scan, dest, "--method", method, "--config", str(tmp_path / name)]
        assert main(args) == 2
        assert f"config file {tmp_path / name}" in (err := _error(capsys)) and message in err
    assert _nothing_published(tmp_path)


@pytest.mark.parametrize("method", ["py4dstem", "ccstae"])
def test_a_config_that_is_a_folder_or_not_text_is_one_sentence(scan, tmp_path, capsys, method):
    """A folder was told as a file that does not exist; a binary file (a mask .npy passed by
    mistake) ended in a UnicodeDecodeError traceback."""
    model = {"py4dstem": "Py4DSTEMConfig", "ccstae": "CCSTAEConfig"}[method]
    np.save(tmp_path / "mask.npy", np.ones((4, 4), dtype=bool))
    (tmp_path / "configs").mkdir()
    dest = str(tmp_path / "strain.zarr")
    for name, what in (("configs", "is a folder"), ("mask.npy", "is not a text file")):
        args = ["strain", scan, dest, "--method", method, "--config", str(tmp_path / name)]
        assert main(args) == 2
        assert _error(capsys) == (
            f"stemflow strain: error: config file {tmp_path / name} {what}; pass a YAML or JSON "
            f"file of {model} fields."
        )
    assert _nothing_published(tmp_path)


def test_an_unreachable_dask_scheduler(scan, tmp_path, capsys, monkeypatch):
    from flows import runners

    from .conftest import closed_port

    monkeypatch.setattr(runners, "SCHEDULER_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    dest = str(tmp_path / "strain.zarr")
    assert main(["strain", scan, dest, "--method", "py4dstem"]) == 2
    err = _error(capsys)
    assert err.startswith(f"stemflow strain: error: no Dask scheduler answers at {address} (")
    assert err.endswith(
        "start it, correct the address (tcp://host:8786) or leave it out to run on this machine."
    )
    assert _nothing_published(tmp_path)


def test_a_scan_without_bragg_disks(tmp_path, capsys):
    q = np.hypot(*np.indices((64, 64)) - 32.0)
    beam = (1.0 / (1.0 + np.exp((q - 3.0) / 0.3))).astype(np.float32)
    source = str(tmp_path / "vacuum.zarr")
    write_scan(
        dask.array.from_array(np.broadcast_to(beam, (8, 8, 64, 64)).copy()),
        source,
        calibration=Calibration(),
    )
    dest = str(tmp_path / "strain.zarr")
    assert main(["strain", source, dest, "--method", "py4dstem"]) == 2
    err = _error(capsys)
    assert err.startswith(  # the store given, not its variable ("data") nor where it came from
        f"stemflow strain: error: {source} shows a lattice of Bragg disks above the noise in 0 "
        "of 64 patterns sampled over the scan"
    )
    assert "pass a diffraction scan of a crystal." in err
    assert _nothing_published(tmp_path)


@pytest.mark.s3
def test_cli_publishes_to_object_storage(scan, s3, capsys, monkeypatch):
    import s3fs

    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "")  # the local cluster
    dest = f"{s3}/runs/strain.zarr"
    assert main(["strain", scan, dest, "--method", "py4dstem", "--reference", "auto"]) == 0
    assert f"wrote {dest}" in capsys.readouterr().out
    assert open_strain(dest).attrs["methods"]["py4dstem"]["coverage"] == 1.0
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    with fs.open(f"{s3}/runs/strain-py4dstem.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert not [k for k in fs.ls(f"{s3}/runs") if ".partial-" in k]


def test_a_task_shows_a_warning_once_and_keeps_it_in_its_run_logs(
    prefect_harness, scan, tmp_path, capfd
):
    """A warning the library met inside a task (a strained reference region) showed twice on
    the terminal: the library's line, then the task's copy, made so that the Prefect UI would
    have it. Now the terminal shows it once and the run's logs in the API hold it once."""
    from prefect import flow

    from tasks.py4dstem import py4dstem_strain_scan

    from .test_process_scan import _run_logs_and_artifacts

    np.save(tmp_path / "strained.npy", open_truth(scan)["grain_id"].values == 1)

    @flow
    def baseline(scan: str, dest: str, reference: str) -> dict:
        return py4dstem_strain_scan(scan, dest, reference=reference, symmetry=4)

    capfd.readouterr()
    state = baseline(
        scan, str(tmp_path / "strain.zarr"), str(tmp_path / "strained.npy"), return_state=True
    )
    (warning,) = open_strain(str(tmp_path / "strain.zarr")).attrs["methods"]["py4dstem"]["warnings"]
    shown = capfd.readouterr()
    assert (shown.out + shown.err).count(warning) == 1
    logs, _ = _run_logs_and_artifacts(state.state_details.flow_run_id)
    assert logs.count(warning) == 1


def test_prefect_task_publishes_the_baseline(prefect_harness, scan, tmp_path):
    from prefect import flow

    from tasks.py4dstem import py4dstem_strain_scan

    @flow
    def baseline(scan: str, dest: str) -> dict:
        return py4dstem_strain_scan(scan, dest, reference="auto")

    dest = str(tmp_path / "strain.zarr")
    record = baseline(scan, dest)
    assert record["url"] == dest and record["png"] == str(tmp_path / "strain-py4dstem.png")
    assert (
        record["coverage"] == 1.0 and record["invalid_positions"] == 0 and record["symmetry"] == 4
    )
    assert record["input_content_sha256"] == open_strain(dest).attrs["input_content_sha256"]
    assert os.path.exists(record["png"])


def test_a_calibrated_scan_rotation_gives_the_strain_in_the_scan_frame_too(scan, tmp_path):
    """A scan whose calibration knows the scan-to-detector rotation (`stemflow ingest
    --qr-rotation-deg`, or a py4DSTEM file's QR_rotation_degrees and QR_flip): its result also
    holds the strain along the scan's axes (CONVENTIONS.md section 2), where the truth turned
    into those axes comes back, the rotation's sign reversed by the flip."""
    from stemlib.strain import strain_in_scan_frame

    stored = open_scan(scan)
    turned = str(tmp_path / "turned.zarr")
    calibration = Calibration.from_attrs(stored.attrs).merged(
        Calibration(qr_rotation_deg=30.0, qr_flip=True)
    )
    write_scan(stored.data, turned, calibration=calibration)
    dest = str(tmp_path / "strain.zarr")
    assert main(["strain", turned, dest, "--method", "py4dstem"]) == 0
    ds = open_strain(dest).sel({"method": "py4dstem"}).load()
    assert ds.attrs["frame"] == "detector"
    assert ds.attrs["scan_frame"] == {"qr_rotation_deg": 30.0, "qr_flip": True}
    assert ds["exx_scan"].attrs == {"units": "1", "long_name": "normal strain along rx (V - I)"}
    assert ds["theta_scan"].attrs["units"] == "rad"
    truth = open_truth(scan)
    expected = strain_in_scan_frame(
        *(truth[c].values for c in ("exx", "eyy", "exy", "theta")),
        qr_rotation_deg=30.0,
        qr_flip=True,
        symmetry=4,
    )
    for c in ("exx", "eyy", "exy"):  # within 1.5e-3, where the unturned truth is not
        error = np.nanmean(np.abs(ds[f"{c}_scan"].values - expected[c]))
        assert error < 1.5e-3 < np.nanmean(np.abs(expected[c] - truth[c].values)), (c, error)
    np.testing.assert_allclose(ds["theta_scan"].values, -ds["theta"].values, atol=1e-12)
