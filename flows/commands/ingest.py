"""``stemflow ingest SOURCE DEST``: a raw scan -> a calibrated, chunked Zarr v3 scan store."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from stemlib.calibration import Calibration
from stemlib.ingest import IngestOptions, IngestResult, ingest
from stemlib.io.readers import FORMATS, supported_formats
from stemlib.io.storage import redact

from ._args import flag_error, float_pair, int_pair, positive_int, region

__all__ = ["register", "options_from_args", "add_source_arguments", "describe"]


def add_source_arguments(parser: argparse.ArgumentParser, *, stores: bool = True) -> None:
    """The options that say how to read a raw scan (shared by ``ingest``, ``run``,
    ``reprocess`` and ``noise``); ``stores``: also ``--allow-nonfinite`` and ``--overwrite``,
    for commands that keep the patterns as read in a scan store."""
    read = parser.add_argument_group("reading the source")
    read.add_argument(
        "--format", default="auto", choices=["auto", *FORMATS], help="source format (default: auto)"
    )
    read.add_argument("--dataset", help="path of the scan inside an HDF5 file, e.g. /datacube")
    read.add_argument(
        "--scan-shape", type=int_pair, metavar="RX,RY", help="probe positions of a flat frame stack"
    )
    read.add_argument("--dtype", help="raw binary: element type, e.g. uint16 or <f4")
    read.add_argument(
        "--frame-shape", type=int_pair, metavar="QX,QY", help="raw binary: pixels of one frame"
    )
    read.add_argument(
        "--header-bytes", type=int, default=0, help="raw binary: bytes before the first frame"
    )
    read.add_argument(
        "--frame-header-bytes", type=int, default=0, help="raw binary: bytes before each frame"
    )
    read.add_argument(
        "--frame-footer-bytes", type=int, default=0, help="raw binary: bytes after each frame"
    )
    cal = parser.add_argument_group("calibration (overrides what the file says)")
    cal.add_argument("--probe-step-nm", type=float, help="scan step (nm)")
    cal.add_argument("--q-pixel-size", type=float, help="detector pixel size in --q-pixel-units")
    cal.add_argument("--q-pixel-units", choices=["1/A", "mrad"], help="units of --q-pixel-size")
    cal.add_argument("--beam-energy-kev", type=float, help="beam energy (keV)")
    cal.add_argument("--convergence-mrad", type=float, help="probe convergence semi-angle (mrad)")
    cal.add_argument(
        "--origin", type=float_pair, metavar="QX,QY", help="direct-beam pixel (qx, qy)"
    )
    cal.add_argument(
        "--qr-rotation-deg",
        type=float,
        help="scan-to-detector rotation (deg), as py4DSTEM's QR_rotation_degrees: strain results "
        "then also give the strain along the scan's axes (exx_scan, ...)",
    )
    cal.add_argument(
        "--qr-flip",
        action="store_const",
        const=True,
        help="the detector is flipped against the scan (py4DSTEM's QR_flip)",
    )
    shape = parser.add_argument_group(
        "cropping, binning and repairing (before the scan is stored; the calibration follows)"
    )
    shape.add_argument(
        "--crop",
        type=region,
        metavar="RX0:RX1,RY0:RY1",
        help="keep only these probe positions (scan rows, columns; half-open), e.g. 0:128,64:192",
    )
    shape.add_argument(
        "--bin-scan",
        type=positive_int,
        default=1,
        metavar="N",
        help="sum each N x N block of probe positions into one pattern: about N times less "
        "noise in each strain value, N times coarser maps (for a low dose)",
    )
    shape.add_argument(
        "--bin-q",
        type=positive_int,
        default=1,
        metavar="N",
        help="sum each N x N block of detector pixels into one: patterns N^2 times smaller, "
        "strain mapped faster (e.g. 2 for a 512 px detector)",
    )
    shape.add_argument(
        "--hot-pixels",
        action="store_true",
        help="replace hot pixels (over five times their neighbours in the mean pattern; a "
        "warning names them otherwise) by their neighbours' median in every pattern",
    )
    shape.add_argument(
        "--dead-pixels",
        action="store_true",
        help="replace dead pixels (reading the same in every pattern, far under their "
        "neighbours: a detector's gaps; a warning names them otherwise) by their neighbours' "
        "median in every pattern",
    )
    if not stores:
        return
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="store float data holding NaN/Inf (masked pixels); strain reads them as 0 counts, "
        "and a pattern that is all NaN gets no answer",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different scan in the scan store: another file's, or this file's read "
        "with other options (another --crop or binning, say)",
    )


#: The flag of each reading and calibration field whose name differs from ``--field-name``.
_FLAGS = {
    "beam_energy_keV": "--beam-energy-kev",
    "convergence_semiangle_mrad": "--convergence-mrad",
    "origin_px": "--origin",
}


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    """The ingest options the reading and calibration flags ask for.

    Raises
    ------
    InputError
        A flag's value that the options refuse (a NaN origin, a negative step), naming the flag.
    """
    try:
        return _options(args)
    except ValidationError as exc:
        raise flag_error(exc, _FLAGS) from None


def _options(args: argparse.Namespace) -> IngestOptions:
    calibration = Calibration(
        probe_step_nm=args.probe_step_nm,
        q_pixel_size=args.q_pixel_size,
        q_pixel_units=args.q_pixel_units,
        beam_energy_keV=args.beam_energy_kev,
        convergence_semiangle_mrad=args.convergence_mrad,
        origin_px=args.origin,
        qr_rotation_deg=args.qr_rotation_deg,
        qr_flip=args.qr_flip,
    )
    return IngestOptions(
        format=args.format,
        dataset=args.dataset,
        scan_shape=args.scan_shape,
        dtype=args.dtype,
        frame_shape=args.frame_shape,
        header_bytes=args.header_bytes,
        frame_header_bytes=args.frame_header_bytes,
        frame_footer_bytes=args.frame_footer_bytes,
        calibration=calibration,
        allow_nonfinite=getattr(args, "allow_nonfinite", False),
        crop=args.crop,
        bin_scan=args.bin_scan,
        bin_q=args.bin_q,
        hot_pixels=args.hot_pixels,
        dead_pixels=args.dead_pixels,
        overwrite=getattr(args, "overwrite", False),
    )


def describe(result: IngestResult) -> str:
    """A short report of an ingest: what was written (or skipped) and how to open it."""
    url = redact(result.url)
    a = result.attrs
    if result.status == "skipped":
        head = f"{url} already holds this scan (same source and options): skipped."
    else:
        ratio = a["nbytes"] / max(a["stored_bytes"], 1)
        head = (
            f"wrote {url}: data {tuple(a['shape'])} {a['dtype']}, chunks {tuple(a['chunks'])}"
            + (f", shards {tuple(a['shards'])}" if a.get("shards") else "")
            + f", {a['stored_bytes'] / 1e6:.1f} MB stored ({ratio:.1f}x compression)\n"
            f"  source {a['source']} read as {a['reader']}; "
            f"content sha256 {a['content_sha256'][:16]}..." + _shaping(a)
        )
    return f"{head}\n  open it with:  xr.open_zarr({url!r})"


def _shaping(attrs: dict[str, Any]) -> str:
    """Lines saying how the stored scan was cropped and binned from the file's and which hot
    and dead pixels were repaired, or nothing."""
    details = attrs.get("reader_details", {})
    fixed = ""
    for kind in ("hot", "dead"):
        repaired = details.get(f"{kind}_pixels") if details.get(f"{kind}_pixels_repaired") else None
        if repaired:
            fixed += (
                f"\n  repaired {len(repaired)} {kind} pixels, at qx, qy "
                + ", ".join(f"({qx}, {qy})" for qx, qy in repaired[:5])
                + (", ..." if len(repaired) > 5 else "")
            )
    shape = details.get("source_shape")
    if shape is None:
        return fixed
    options = attrs.get("ingest_options", {})
    done = [f"cropped to {options['crop']}"] if options.get("crop") else []
    for name, what in (("bin_scan", "positions"), ("bin_q", "pixels")):
        n = options.get(name, 1)
        if n > 1:
            done.append(f"{what} binned {n} x {n}")
    return f"\n  from the file's {tuple(shape)}: {', '.join(done)}" + fixed


def _run(args: argparse.Namespace) -> int:
    if args.list_formats:
        print(supported_formats())
        return 0
    if args.source is None or args.dest is None:
        from stemlib.errors import InputError

        raise InputError("pass SOURCE and DEST, e.g. `stemflow ingest scan.npy scan.zarr`.")
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc="ingest", unit="block", disable=args.quiet or None):
        result = ingest(args.source, args.dest, options_from_args(args))
    print(describe(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "ingest",
        help="convert a raw scan to a chunked, compressed Zarr v3 scan store",
        description="Convert a raw 4D-STEM scan (any supported format) into a calibrated, chunked, "
        "compressed Zarr v3 store, streaming block by block. A rerun with the same source and "
        "options skips the finished store.",
    )
    parser.add_argument(
        "source", nargs="?", metavar="SOURCE", help="raw scan: path or URL (s3://bucket/key)"
    )
    parser.add_argument("dest", nargs="?", metavar="DEST", help="scan store to write: path or URL")
    add_source_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--list-formats", action="store_true", help="list the supported formats and exit"
    )
    parser.set_defaults(run=_run)
