"""``stemflow strain SCAN DEST --method ccstae|py4dstem``: a scan store -> a strain store + PNG.

The scan is opened lazily; the method writes nothing until its maps are complete. The strain
dataset (CONVENTIONS.md section 4) is then published atomically at DEST (a path or an s3 URL),
and the four maps beside it as ``<DEST stem>-<method>.png``, with the scan's virtual images
(``<DEST stem>-virtual.png``, :mod:`stemlib.virtual`). CC-ST-AE also draws its learned
bases (``<DEST stem>-ccstae-bases.png``) and keeps its checkpoints in a work folder (``--workdir``,
by default ``.<DEST name>.work`` beside DEST): a rerun resumes an interrupted training, or only
infers. DEST records a fingerprint of the scan's content and the settings, so a rerun of a
finished run skips it (``--recompute`` runs it again, CC-ST-AE training anew). A user's mistake
(a store that is not a scan, a reference region outside the scan or empty, a mask of the wrong
shape, a scan without Bragg disks) stops before anything is published.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr

from stemlib.config_file import read_mapping, validated
from stemlib.errors import InputError
from stemlib.io import open_scan
from stemlib.io.scan_store import check_destination
from stemlib.io.storage import local_workdir, locate, redact, refuse_unwritable, work_folder
from stemlib.plots import png_url, save_png, strain_figure, virtual_figure
from stemlib.reference import parse_reference
from stemlib.rerun import finished_step, run_key, store_identity
from stemlib.results import open_strain, write_strain
from stemlib.types import Device
from stemlib.virtual import with_virtual_images

from ._args import SYMMETRIES, add_recompute_argument, symmetry

__all__ = ["register", "run_method", "read_config"]

METHODS = ("ccstae", "py4dstem")


def _ccstae() -> Any:
    """The ``stemlib.ccstae`` package, or a clear error where PyTorch is missing."""
    try:
        import stemlib.ccstae
    except ImportError as exc:
        raise InputError(
            f"--method ccstae is not available in this installation ({exc}); use --method py4dstem."
        ) from None
    return stemlib.ccstae


def read_config(
    path: str | None, method: str, *, preset: str = "auto", device: str = "auto"
) -> Any:
    """The method's config model read from a YAML or JSON file (None: the defaults). A
    CC-ST-AE file changes ``preset`` (``"auto"``: the one for ``device``) unless it names its
    own."""
    if method == "ccstae":
        if path is None:
            return None
        return _ccstae().CCSTAEConfig.from_file(path, preset=preset, device=device)
    from stemlib.baseline_py4dstem import Py4DSTEMConfig

    if path is None:
        return None
    return validated(path, Py4DSTEMConfig, **read_mapping(path, Py4DSTEMConfig))


@contextlib.contextmanager
def _dask_cluster() -> Iterator[None]:
    """A distributed client for the run: the cluster at ``DASK_SCHEDULER_ADDRESS`` if set, else a
    ``LocalCluster`` with one single-threaded worker process per core, on loopback."""
    from distributed import Client

    from ..runners import local_cluster, scheduler_client

    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        with scheduler_client(address, option="DASK_SCHEDULER_ADDRESS"):
            yield
        return
    with local_cluster() as cluster, Client(cluster):
        yield


def run_method(
    scan: xr.DataArray,
    method: str,
    *,
    reference: str,
    symmetry: Any,
    config: Any,
    device: Device,
    workdir: str | None = None,
    bases_png: str | None = None,
) -> xr.Dataset:
    """Call the method's entry function (the ccstae package is imported only when asked for).
    CC-ST-AE keeps its checkpoints in ``workdir`` (a path or URL; None: a temporary folder) and
    draws its bases to ``bases_png`` if given."""
    if method == "py4dstem":
        from stemlib.baseline_py4dstem import py4dstem_strain

        with _dask_cluster():
            return py4dstem_strain(scan, reference=reference, symmetry=symmetry, config=config)
    ccstae = _ccstae()
    with local_workdir(workdir) if workdir else contextlib.nullcontext() as folder:
        return ccstae.ccstae_strain(
            scan,
            reference=reference,
            symmetry=symmetry,
            config=config,
            device=device,
            workdir=folder,
            bases_png=bases_png,
        )


def _resolved_config(config: Any, method: str, device: Device) -> Any:
    """The configuration the method runs with: ``config``, or its defaults (CC-ST-AE's preset
    for ``device``)."""
    if config is not None:
        return config
    if method == "ccstae":
        return _ccstae().CCSTAEConfig.for_device(device)
    from stemlib.baseline_py4dstem import Py4DSTEMConfig

    return Py4DSTEMConfig()


def _model_folder(scan: xr.DataArray, args: argparse.Namespace, config: Any) -> str:
    """Where CC-ST-AE keeps this run's checkpoint: a folder per scan, reference and training
    settings in ``--workdir`` (default ``.<DEST name>.work`` beside DEST), emptied first on
    ``--recompute``."""
    from stemlib.ccstae.data import data_fingerprint
    from stemlib.ccstae.train import model_folder

    return model_folder(
        work_folder(args.dest, args.workdir),
        data_fingerprint(scan),
        reference=args.reference,
        config=config,
        anew=args.recompute,
    )


def _run(args: argparse.Namespace) -> int:
    scan = open_scan(args.scan)
    # Check the cheap arguments before any compute: nothing is published on a mistake.
    parse_reference(args.reference, (int(scan.shape[0]), int(scan.shape[1])))
    config = _resolved_config(
        read_config(args.config, args.method, device=args.device), args.method, args.device
    )
    key = run_key(
        store_identity(scan.attrs),
        args.method,
        reference=args.reference,
        symmetry=args.symmetry,
        config=config,
    )
    if not args.recompute and finished_step(args.dest, key):
        url = redact(locate(args.dest).url)
        drawn = [
            f"\n  drew the missing {redact(png)}" for png in _missing_maps(args.dest, args.method)
        ]
        print(
            f"{url} already holds this result (same scan content and calibration, method, "
            f"reference, symmetry and configuration): skipped.{''.join(drawn)}\n  open it "
            f"with:  xr.open_zarr({url!r})"
        )
        return 0
    check_destination(args.dest, "strain", methods=[args.method])
    refuse_unwritable(locate(args.dest))  # before the work, not at its publication
    files = {}
    if args.method == "ccstae":
        files = {
            "workdir": _model_folder(scan, args, config),
            "bases_png": png_url(args.dest, "ccstae-bases"),
        }
    ds = run_method(
        scan,
        args.method,
        reference=args.reference,
        symmetry=args.symmetry,
        config=config,
        device=args.device,
        **files,
    )
    ds = with_virtual_images(ds, scan)
    ds.attrs["run_keys"] = {args.method: key}
    url = write_strain(ds, args.dest)
    png = save_png(strain_figure(ds, args.method), png_url(args.dest, args.method))
    virtual = save_png(virtual_figure(ds), png_url(args.dest, "virtual"))
    record = ds.attrs["methods"][args.method]
    lines = [
        f"wrote {redact(url)}: {args.method} strain of {ds.sizes['rx']} x {ds.sizes['ry']} "
        f"positions, coverage {100 * record['coverage']:.1f} %, "
        f"reference {ds.attrs.get('reference', args.reference)}, "
        f"symmetry {record.get('symmetry', ds.attrs.get('symmetry', args.symmetry))}",
        *_spread(record.get("reference_spread")),
        f"  maps {redact(png)}",
        f"  virtual images {redact(virtual)}",
    ]
    if files:
        lines += [
            f"  learned bases {redact(png_url(url, 'ccstae-bases'))}",
            f"  model {redact(files['workdir'])} (a rerun resumes or only infers)",
        ]
    print("\n".join([*lines, f"  open it with:  xr.open_zarr({redact(url)!r})"]))
    return 0


def _missing_maps(dest: str, method: str) -> list[str]:
    """Draw the PNGs of the finished result at ``dest`` that are not beside it (a run that
    stopped after publishing the dataset: a full disk, a kill), from the dataset: the
    ``method``'s maps and the virtual images. Returns their URLs."""
    missing = [n for n in (method, "virtual") if not locate(png_url(dest, n)).exists()]
    if not missing:
        return []
    ds = open_strain(dest)
    if "virtual_bf" not in ds:  # published before stemflow drew the virtual images
        missing = [n for n in missing if n != "virtual"]
    return [
        save_png(virtual_figure(ds) if n == "virtual" else strain_figure(ds, n), png_url(dest, n))
        for n in missing
    ]


def _spread(spread: dict[str, float] | None) -> list[str]:
    """The line saying how much the maps scatter in the reference region (their precision), or
    none where the region has too few valid positions."""
    if not spread or not np.isfinite(spread["exx"]):
        return []
    strain = ", ".join(f"{c} {spread[c] * 1e3:.2f}" for c in ("exx", "eyy", "exy"))
    return [
        f"  spread in the reference region ({spread['positions']} positions, robust std): "
        f"{strain} (1e-3), theta {np.degrees(spread['theta']):.3f} deg"
    ]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "strain",
        help="strain, shear and rotation maps of a scan store (CC-ST-AE or the py4DSTEM baseline)",
        description="Measure strain, shear and rotation at every probe position of a scan store "
        "and publish them as a strain store (CONVENTIONS.md) with a PNG of the four maps beside "
        "it. py4dstem runs on a local Dask cluster (all cores), or on the cluster at "
        "DASK_SCHEDULER_ADDRESS.",
    )
    parser.add_argument(
        "scan", metavar="SCAN", help="scan store written by `stemflow ingest`: path or URL"
    )
    parser.add_argument(
        "dest", metavar="DEST", help="strain store to write: path or URL (s3://bucket/key)"
    )
    parser.add_argument("--method", required=True, choices=METHODS, help="strain method")
    parser.add_argument(
        "--reference",
        default="auto",
        metavar="auto|RX0:RX1,RY0:RY1|mask.npy",
        help="reference region: auto (largest region of one lattice), a rectangle of scan "
        "indices (half-open), or a boolean mask .npy (default: auto)",
    )
    parser.add_argument(
        "--symmetry",
        default="auto",
        type=symmetry,
        choices=SYMMETRIES,
        help="lattice symmetry for the rotation (default: auto)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of the method's configuration"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where CC-ST-AE runs (default: auto)",
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="CC-ST-AE's checkpoints, so that a rerun resumes training or only infers: path or "
        "URL (default: .DEST.work beside DEST)",
    )
    add_recompute_argument(parser)
    parser.set_defaults(run=_run)
