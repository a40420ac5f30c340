"""Ingest: any raw scan -> a calibrated, chunked, compressed Zarr v3 scan store.

The conversion streams block by block through dask (no step holds the scan in memory), hashes
every pattern as it goes, and publishes atomically. A rerun with the same source file, the same
companion files (a .mib's .hdr, the .raw an EMPAD .xml names, ...) and the same options finds
the finished store and skips it, unless the store lacks blocks (damaged after it was written):
then it is written again.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from .bad_pixels import (
    PixelMoments,
    find_dead_pixels,
    find_hot_pixels,
    repair_pixels,
    sample_moments,
)
from .beam import misplaced_origin
from .binning import binned, binned_calibration, binned_truth, crop_scan, crop_truth
from .calibration import Calibration
from .errors import InputError
from .io.readers import FORMATS, ReadOptions, SourceScan, open_source, source_companions
from .io.scan_store import intact_scan, open_store_group, write_scan
from .io.storage import Location, interrupted_publication, locate, redact, storage_errors
from .provenance import fingerprint, software_versions, utc_now
from .reference import REGION_PATTERN, check_rectangle, rectangle

__all__ = [
    "IngestOptions",
    "IngestResult",
    "KeyedSource",
    "ingest",
    "keyed_source",
    "refuse_transforms",
    "shaped_source",
    "with_bad_pixels",
    "source_key",
]

#: Bumped when the stored layout changes, so that old stores are not taken as finished work.
STORE_VERSION = 1

#: ``"auto"`` or a name of :data:`~stemlib.io.readers.FORMATS`: a fixed choice, so the Prefect
#: form offers a dropdown and a misspelt format is refused before a run starts.
SourceFormat = Literal[("auto", *FORMATS)]  # type: ignore[valid-type]

log = logging.getLogger("stemlib.ingest")

#: The options that change the patterns as they are read: crop and bin them
#: (:func:`shaped_source`), repair hot and dead pixels (:func:`with_bad_pixels`).
TRANSFORMS = ("crop", "bin_scan", "bin_q", "hot_pixels", "dead_pixels")


class IngestOptions(BaseModel):
    """How to read a raw scan and where calibration overrides apply."""

    model_config = ConfigDict(extra="forbid")

    format: SourceFormat = Field(
        "auto", description="Source format, or 'auto' to detect it from the file."
    )
    dataset: str | None = Field(None, description="Path of the scan inside an HDF5 file.")
    scan_shape: tuple[int, int] | None = Field(
        None, description="(RX, RY) for a flat stack of frames."
    )
    dtype: str | None = Field(None, description="Element type of a raw binary file, e.g. uint16.")
    frame_shape: tuple[int, int] | None = Field(None, description="(QX, QY) of a raw binary frame.")
    header_bytes: int = Field(0, ge=0, description="Bytes before the first frame of a raw file.")
    frame_header_bytes: int = Field(0, ge=0, description="Bytes before each frame of a raw file.")
    frame_footer_bytes: int = Field(0, ge=0, description="Bytes after each frame of a raw file.")
    calibration: Calibration = Field(
        default_factory=Calibration, description="Overrides of the file's calibration."
    )
    allow_nonfinite: bool = Field(
        False, description="Store float data holding NaN/Inf (count recorded)."
    )
    crop: str | None = Field(
        None,
        description="Probe positions to keep, 'RX0:RX1,RY0:RY1' (scan rows, columns; half-open), "
        "before binning.",
        pattern=REGION_PATTERN,
    )
    bin_scan: int = Field(
        1,
        ge=1,
        description="Sum each N x N block of probe positions into one pattern (the probe step "
        "grows N times): less noise per pattern, N times coarser maps.",
    )
    bin_q: int = Field(
        1,
        ge=1,
        description="Sum each N x N block of detector pixels into one (the pixel size grows N "
        "times): smaller patterns, faster strain mapping.",
    )
    hot_pixels: bool = Field(
        False,
        description="Replace hot pixels (over five times their neighbours in the mean pattern) "
        "in every pattern by the median of their neighbours.",
    )
    dead_pixels: bool = Field(
        False,
        description="Replace dead pixels (reading the same in every pattern, far under their "
        "neighbours: a detector's gaps) in every pattern by the median of their neighbours.",
    )
    overwrite: bool = Field(
        False, description="Replace a different scan already stored at the destination."
    )

    @field_validator("crop")
    @classmethod
    def _nonempty(cls, crop: str | None) -> str | None:
        if crop is not None:
            check_rectangle(crop, flag="--crop")
        return crop

    @model_serializer(mode="wrap")
    def _without_unused_transforms(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Cropping, binning and pixel repairs are left out where unused: the options of a
        plain reading serialise, and so fingerprint, as they did before these existed (no
        finished store or result is taken for new work)."""
        data = handler(self)
        for name in TRANSFORMS:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data

    @property
    def shapes(self) -> bool:
        """Whether the scan is cropped or binned as it is read."""
        return self.crop is not None or self.bin_scan > 1 or self.bin_q > 1

    @property
    def transforms(self) -> bool:
        """Whether the patterns are changed as they are read: cropped, binned or repaired."""
        return self.shapes or self.hot_pixels or self.dead_pixels

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            dataset=self.dataset,
            scan_shape=self.scan_shape,
            dtype=self.dtype,
            frame_shape=self.frame_shape,
            header_bytes=self.header_bytes,
            frame_header_bytes=self.frame_header_bytes,
            frame_footer_bytes=self.frame_footer_bytes,
        )

    def identity(self) -> dict[str, Any]:
        """The options that shape the stored result (``overwrite`` does not)."""
        return self.model_dump(mode="json", exclude={"overwrite"})


@dataclass(frozen=True)
class IngestResult:
    """Outcome of :func:`ingest`: ``status`` is ``"written"`` or ``"skipped"`` (already done)."""

    status: Literal["written", "skipped"]
    url: str
    source_key: str
    attrs: dict[str, Any] = field(default_factory=dict)


def _stamp(info: dict[str, Any]) -> str:
    """A file's modification stamp in fsspec ``info``: its time, else its ETag."""
    return str(
        info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    )


@dataclass(frozen=True)
class KeyedSource:
    """A raw source as a rerun recognises it, found by listing files (none is read or copied).

    Attributes
    ----------
    identity
        What :attr:`key` fingerprints: the source file's URL, size and stamp, the options and,
        where its reader uses companion files, ``companions``: name (relative to the source's
        folder) -> ``[size, stamp]`` of each.
    companions
        Those companion files as :func:`~stemlib.io.readers.source_companions` listed them (path
        -> fsspec info), for :func:`~stemlib.io.readers.open_source` to copy without listing
        them again; None for a folder, which is not listed.
    info
        The source's own fsspec info (``type``, ``size`` in bytes, its stamp), for
        :func:`~stemlib.io.readers.open_source` not to ask about the file again.
    location, options
        Where the source is and the reading options, as keyed.
    """

    identity: dict[str, Any]
    companions: dict[str, dict[str, Any]] | None
    info: dict[str, Any]
    location: Location
    options: IngestOptions

    @property
    def key(self) -> str:
        """:func:`source_key`."""
        return fingerprint(self.identity)

    def open(self, *, bad_pixels: bool = True) -> SourceScan:
        """The source opened lazily with the options it was keyed with
        (:func:`~stemlib.io.readers.open_source`, then :func:`shaped_source`: calibrated,
        cropped and binned; close it, or use ``with``). A vendor file on object storage is read
        from a local copy, removed when the scan is closed; the copy holds the companion files
        listed for the key, not listed again, and the source is not asked again whether it
        exists, is a folder, or how large it is. ``bad_pixels=False``: no sample of patterns is
        read for hot or dead pixels (for the stored shape alone)."""
        scan = open_source(
            self.location.url,
            format=self.options.format,
            options=self.options.read_options(),
            companions=self.companions,
            info=self.info,
        )
        try:
            return shaped_source(scan, self.options, bad_pixels=bad_pixels)
        except BaseException:
            scan.close()
            raise


def refuse_transforms(url: str, options: IngestOptions | None) -> None:
    """Refuse to change the patterns of a scan store: ``options`` crop, bin and repair a raw
    file as it is read, and would be ignored for ``url``, a scan store already written.

    Raises
    ------
    InputError
        Where ``options`` crop, bin or repair pixels.
    """
    if options is not None and options.transforms:
        raise InputError(
            f"{redact(url)} is a scan store: --crop, --bin-scan, --bin-q, --hot-pixels and "
            "--dead-pixels apply as a raw file is read; pass the raw file as SOURCE, or ingest it "
            "with them."
        )


#: How :func:`with_bad_pixels` names each kind: its finder, and what the warning says they do.
_BAD = {
    "hot": (find_hot_pixels, "read over five times their neighbours in the mean pattern"),
    "dead": (find_dead_pixels, "read the same in every pattern, far under their neighbours"),
}


def with_bad_pixels(
    scan: SourceScan, options: IngestOptions, *, moments: PixelMoments | None = None
) -> SourceScan:
    """``scan`` with its hot and dead pixels (:mod:`stemlib.bad_pixels`, on one sample of its
    patterns, or ``moments`` of one) replaced where ``options.hot_pixels`` and
    ``options.dead_pixels`` ask; where they do not, a warning names them and the option.
    ``details`` record them (``hot_pixels``, ``dead_pixels``: [[qx, qy], ...] in the detector's
    pixels, before any binning; ``hot_pixels_repaired``, ``dead_pixels_repaired``)."""
    moments = sample_moments(scan.data) if moments is None else moments
    details, repair = dict(scan.details), []
    for kind, (find, what) in _BAD.items():
        found = find(scan.data, moments=moments)
        if not len(found):
            continue
        asked = bool(getattr(options, f"{kind}_pixels"))
        if asked:
            repair.append(found)
        else:
            listed = ", ".join(f"({qx}, {qy})" for qx, qy in found[:5].tolist())
            log.warning(
                "%s: %d detector pixels %s (%s pixels, at qx, qy %s); pass --%s-pixels to "
                "replace them by their neighbours' median in every pattern.",
                redact(scan.source),
                len(found),
                what,
                kind,
                listed + (", ..." if len(found) > 5 else ""),
                kind,
            )
        details[f"{kind}_pixels"] = found.tolist()
        details[f"{kind}_pixels_repaired"] = asked
    if not repair:
        return replace(scan, details=details)
    return replace(scan, data=repair_pixels(scan.data, np.concatenate(repair)), details=details)


def _warn_misplaced_origin(scan: SourceScan, mean: np.ndarray, *, given: bool) -> None:
    """Warn where ``scan``'s direct beam, as recorded (its file's ``origin_px``, or ``--origin``
    where ``given``), lies outside the beam in its patterns' ``mean`` (QX, QY), naming the
    ``--origin`` that would record it; the ``qx, qy`` coordinates count from the record."""
    origin = scan.calibration.origin_px
    measured = None if origin is None else misplaced_origin(mean, origin)
    if measured is None:
        return
    recorded = "--origin gives" if given else "the file records"
    log.warning(
        "%s: %s its direct beam at (%g, %g) px, but its patterns show it at (%.1f, %.1f) px; "
        "pass --origin %.1f,%.1f for qx, qy coordinates that count from the beam.",
        redact(scan.source),
        recorded,
        *origin,
        *measured,
        *measured,
    )


def shaped_source(
    scan: SourceScan, options: IngestOptions, *, bad_pixels: bool = True
) -> SourceScan:
    """``scan`` as ``options`` ask to store it: their calibration overrides merged into the
    file's, then its probe positions cropped to ``options.crop``, its recorded direct beam
    checked against its patterns (:func:`_warn_misplaced_origin`), its hot and dead pixels found
    (and repaired, :func:`with_bad_pixels`), then binned by ``options.bin_scan`` positions and
    ``options.bin_q`` detector pixels (:mod:`stemlib.binning`), with its calibration and truth
    maps to match. Calibration overrides describe the file as recorded (``--origin`` in its
    detector pixels): binning converts them. Bad pixels are looked for before binning, in the
    detector's own pixels (binning sharpens a peaked direct beam against its neighbours).

    Parameters
    ----------
    bad_pixels
        False leaves hot and dead pixels alone, unlooked for, and the direct beam unchecked (no
        pattern is read: for a caller that only needs the stored shape).

    Returns
    -------
    SourceScan
        Its ``data`` lazy, of shape (RX', RY', QX', QY'); ``details`` add ``source_shape``, the
        file's (RX, RY, QX, QY), where the scan was cropped or binned, and the bad pixels
        (:func:`with_bad_pixels`).

    Raises
    ------
    InputError
        For a crop outside the file's scan, or a bin larger than what it bins, naming the file.
    """
    shaped = replace(scan, calibration=scan.calibration.merged(options.calibration))
    data, truth = scan.data, scan.truth
    where = redact(scan.source)
    if options.crop is not None:
        region = rectangle(options.crop, data.shape[:2], flag="--crop", where=f"{where}'s scan")
        data = crop_scan(data, region)
        truth = None if truth is None else crop_truth(truth, region)
    for flag, factor, axes, what in (
        ("--bin-scan", options.bin_scan, (0, 1), "scan of"),
        ("--bin-q", options.bin_q, (2, 3), "patterns of"),
    ):
        shape = tuple(int(data.shape[a]) for a in axes)
        if factor > min(shape):
            raise InputError(
                f"{flag} {factor} leaves nothing of {where}'s {what} {shape[0]} x {shape[1]}"
                + (" (after --crop)" if flag == "--bin-scan" and options.crop else "")
                + f"; give at most {min(shape)}."
            )
    shaped = replace(shaped, data=data, truth=truth)
    if bad_pixels:
        moments = sample_moments(shaped.data)
        _warn_misplaced_origin(
            shaped, moments.mean, given=options.calibration.origin_px is not None
        )
        shaped = with_bad_pixels(shaped, options, moments=moments)
    if not options.shapes:
        return shaped
    return replace(
        shaped,
        data=binned(shaped.data, scan=options.bin_scan, q=options.bin_q),
        calibration=binned_calibration(shaped.calibration, scan=options.bin_scan, q=options.bin_q),
        truth=None if truth is None else binned_truth(truth, options.bin_scan),
        details={**shaped.details, "source_shape": [int(n) for n in scan.data.shape]},
    )


def keyed_source(
    location: Location, options: IngestOptions, *, info: dict[str, Any] | None = None
) -> KeyedSource:
    """The source at ``location`` read with ``options``, as its key (:func:`source_key`) sees it;
    ``info`` is its fsspec info where the caller asked for it already (else asked here).

    Raises
    ------
    InputError
        The source does not exist.
    """
    if info is None:
        try:
            with storage_errors(location.url):
                info = location.fs.info(location.path)
        except FileNotFoundError:  # ingest, and process-scan keying a request before its ingest
            raise InputError(f"{redact(location.url)} does not exist; check the path.") from None
    identity = {
        "source": redact(location.url),
        "size": info.get("size"),
        "stamp": _stamp(info),
        "options": options.identity(),
        "store_version": STORE_VERSION,
    }
    if info.get("type") == "directory":  # no scan file: the reader says what to pass instead
        return KeyedSource(identity, None, info, location, options)
    folder = posixpath.dirname(location.path)
    listed = source_companions(location, format=options.format)
    companions = {
        posixpath.relpath(path, folder): [companion.get("size"), _stamp(companion)]
        for path, companion in listed.items()
    }
    keyed = {**identity, "companions": companions} if companions else identity
    return KeyedSource(keyed, listed, info, location, options)


def source_key(location: Location, options: IngestOptions) -> str:
    """Fingerprint of a source's identity and the options that read it.

    Parameters
    ----------
    location
        The source file, local or on object storage.
    options
        How it is read; ``overwrite`` does not count.

    Returns
    -------
    str
        SHA-256 (hex) of the file's URL, size and modification time (or ETag), the same of each
        companion file its reader uses (a .mib's .hdr, the .raw an EMPAD .xml names, an ARINA
        master's data files, ...; :func:`stemlib.io.readers.source_companions`), and the
        options. Equal keys mean the same files read the same way.

    Notes
    -----
    Cheap to compute before any work: files are listed, never read or copied, except the few
    bytes that say which format a file is and, for EMPAD and ARINA, the .xml or master file
    that names the companions. A source with no companion file has the key it had before
    companion files counted.
    """
    return keyed_source(location, options).key


def _keyed_without_companions(attrs: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether ``attrs`` are those of a store written from this same source file and options
    before companion files counted in the key: its key is this source's key without
    ``companions``, and it records no ``companion_files`` (every store written since does)."""
    if "companions" not in identity or "companion_files" in attrs:
        return False
    main_file = {k: v for k, v in identity.items() if k != "companions"}
    return attrs.get("source_key") == fingerprint(main_file)


def _existing(dest: Location, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The attrs of a finished store of the source of ``identity`` (:attr:`KeyedSource.identity`)
    at ``dest`` (skip), None to write; raises if ``dest`` holds something else.

    A store of this source that is not marked ``complete`` (a partial copy of one) or lacks
    blocks (:func:`~stemlib.io.scan_store.intact_scan`) is rewritten, and so is one of this
    source file that an older stemflow wrote, whose key did not cover the companion files:
    nothing tells whether they changed since.
    """
    if not dest.exists() or interrupted_publication(dest):
        return None
    group = open_store_group(dest)  # its attributes, and its arrays for the damage check
    attrs = None if group is None else dict(group.attrs)
    where = redact(dest.url)
    if attrs is None or "source_key" not in attrs:
        raise InputError(
            f"{where} already exists and is not a stemflow scan store; choose another destination "
            "or remove it."
        )
    if attrs.get("source_key") == fingerprint(identity):
        return attrs if attrs.get("complete") and intact_scan(dest, attrs, group) else None
    if overwrite or _keyed_without_companions(attrs, identity):
        return None
    raise InputError(
        f"{where} already holds a different scan (from {attrs.get('source', 'another source')}); "
        "pass --overwrite to replace it or choose another destination."
    )


def ingest(source: str, dest: str, options: IngestOptions | None = None) -> IngestResult:
    """Convert the raw scan at ``source`` into a scan store at ``dest``.

    Parameters
    ----------
    source
        Local path or fsspec URL of a supported raw scan (see
        :func:`stemlib.io.readers.supported_formats`).
    dest
        Local path or fsspec URL of the Zarr v3 store to publish.
    options
        Reader options and calibration overrides (:class:`IngestOptions`).

    Returns
    -------
    IngestResult
        ``"skipped"`` if ``dest`` already holds this source (the same file and companion
        files, :func:`source_key`) read with these options, else ``"written"``; ``attrs`` are
        the store's provenance, ``companion_files`` the size (bytes) of each companion file by
        its name beside the source.

    Raises
    ------
    InputError
        For a missing or unreadable source, a shape that is not a scan, NaN/Inf data (unless
        allowed), or a destination that holds something else.
    StorageError
        For an object store that cannot be reached or refuses the credentials.
    ResourceError
        For too little free space in ``TMPDIR`` for the local copy of a vendor file on object
        storage (see :func:`stemlib.io.readers.open_source`).
    """
    options = options or IngestOptions()
    src, out = locate(source), locate(dest)
    keyed = keyed_source(src, options)  # names a source that does not exist
    identity, key = keyed.identity, keyed.key
    done = _existing(out, identity, options.overwrite)
    if done is not None:
        return IngestResult("skipped", out.url, key, done)
    with keyed.open() as scan:  # a vendor file on object storage: a local copy, for the block
        calibration = scan.calibration
        attrs = {
            "source": scan.source,
            "source_bytes": identity["size"],  # as the key's listing found it
            "source_key": key,
            "companion_files": {
                name: size for name, (size, _) in identity.get("companions", {}).items()
            },
            "reader": scan.reader,
            "reader_details": scan.details,
            "ingest_options": options.identity(),
            "created": utc_now(),
            "software": software_versions(),
            "store_version": STORE_VERSION,
        }
        if scan.truth is not None:
            attrs["truth_symmetry"] = scan.truth.attrs.get("truth_symmetry")
        written = write_scan(
            scan.data,
            out,
            calibration=calibration,
            attrs=attrs,
            allow_nonfinite=options.allow_nonfinite,
            extras=scan.truth,
        )
    return IngestResult(
        "written", out.url, key, {**attrs, **written.as_dict(), **calibration.to_attrs()}
    )
