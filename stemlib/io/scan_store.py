"""Scan stores: a 4D datacube as a Zarr v3 group that ``xarray.open_zarr`` opens.

Layout (CONVENTIONS.md sections 1 and 4): variable ``data`` with dims (rx, ry, qx, qy) in the
detector's dtype, whole patterns per chunk, Blosc LZ4 with bit-shuffle (the codec detectors'
own HDF5 files use: twice as fast as zstd here for 10 % less compression); scans over
:data:`SHARD_ABOVE_BYTES` are sharded: 32 MB shards (the unit one task writes, few large
objects on object storage) of 4 MB chunks (what readers fetch, and what zarr compresses in
parallel). Coordinates carry units; calibration and provenance are group
attributes.

Every pattern is hashed while it streams: ``content_sha256`` is the SHA-256 of the SHA-256
digests of each pattern's little-endian bytes, patterns in (rx, ry) C order. It depends on the
values only, not on the chunking or the number of workers.

Zarr reads a chunk or shard object that is missing as the fill value, so a store damaged after
it was written (an interrupted copy, an object deleted on a bucket) would read as patterns of
zeros, or as coordinates and ground-truth maps of NaN (:mod:`stemlib.io.blocks`). The writer
therefore stores every block of every array, also one holding only the fill value, and records
their count as ``stored_blocks``; :func:`open_scan` lists the store's objects and refuses a
store that lacks any, and a rerun writes such a store again instead of skipping it
(:func:`intact_scan`). Stores written before stemflow recorded ``stored_blocks`` may lack blocks
of the fill value legitimately: those that record ``data_blocks`` have only the blocks of
``data`` checked, the others open unchecked, as before.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import dask.threaded
import numpy as np
import xarray as xr
import zarr
from dask.system import CPU_COUNT
from zarr.codecs import BloscCodec, Crc32cCodec

from ..calibration import Calibration, scan_coords
from ..errors import InputError
from ..jsonvalues import json_values
from ..provenance import fingerprint
from ..scan import stored_array_name
from ..types import DIMS
from .blocks import block_keys, missing_blocks
from .readers.base import READ_BLOCK_BYTES, probe_block
from .storage import (
    Location,
    interrupted_publication,
    locate,
    redact,
    staged,
    storage_errors,
)

__all__ = [
    "SCAN_VARIABLE",
    "StoreLayout",
    "choose_layout",
    "write_scan",
    "open_scan",
    "refuse_damaged",
    "read_store_attrs",
    "open_store_group",
    "check_destination",
    "finished_scan",
    "intact_scan",
    "finite_counts",
    "scan_label",
    "HASH_SCHEME",
]

SCAN_VARIABLE = "data"
HASH_SCHEME = (
    "sha256 over the sha256 of each pattern's little-endian bytes, patterns in (rx, ry) C order"
)
#: Target bytes of one chunk of a small scan, and of one shard of a large one.
CHUNK_BYTES = READ_BLOCK_BYTES
#: Target bytes of one inner chunk of a sharded scan.
INNER_CHUNK_BYTES = 4 * 2**20
#: Scans above this size are sharded.
SHARD_ABOVE_BYTES = 256 * 2**20
_DIGEST = 32
#: Group attribute: the count of objects that hold ``data`` (its chunks, or its shards where
#: sharded), every one of them written (:func:`_missing_blocks`). Still written, so that earlier
#: stemflow versions check the data of a store written now.
BLOCKS_ATTR = "data_blocks"
#: Group attribute: the count of objects that hold all the store's arrays (``data``, the
#: coordinates, the ground truth and other per-position maps), every one of them written.
STORED_BLOCKS_ATTR = "stored_blocks"

log = logging.getLogger("stemlib.io")


@dataclass(frozen=True)
class StoreLayout:
    """Chunk and shard shapes of a scan store (4-tuples; ``shards`` None when unsharded).

    ``write_block`` is the unit one dask task writes: the shard when sharded, else the chunk.
    """

    chunks: tuple[int, int, int, int]
    shards: tuple[int, int, int, int] | None

    @property
    def write_block(self) -> tuple[int, int, int, int]:
        return self.shards or self.chunks


def choose_layout(shape: tuple[int, int, int, int], dtype: Any) -> StoreLayout:
    """Chunks of whole patterns of about 32 MB in scan order; above 256 MB, 4 MB chunks in shards
    of about 32 MB. The write block equals a reader's default block (:func:`probe_block`), so a
    C-order source is read and written block for block without rechunking.

    Examples
    --------
    >>> choose_layout((256, 256, 256, 256), "uint16")
    StoreLayout(chunks=(1, 32, 256, 256), shards=(1, 256, 256, 256))
    >>> choose_layout((32, 32, 128, 128), "uint16")
    StoreLayout(chunks=(32, 32, 128, 128), shards=None)
    """
    itemsize = np.dtype(dtype).itemsize
    total = int(np.prod(shape)) * itemsize
    qx, qy = shape[2:]
    srx, sry = probe_block(shape, itemsize, CHUNK_BYTES)
    if total <= SHARD_ABOVE_BYTES:
        return StoreLayout(chunks=(srx, sry, qx, qy), shards=None)
    irx, iry = probe_block((srx, sry, qx, qy), itemsize, INNER_CHUNK_BYTES)
    # A shard holds a whole number of inner chunks.
    srx, sry = max(irx, srx // irx * irx), max(iry, sry // iry * iry)
    return StoreLayout(chunks=(irx, iry, qx, qy), shards=(srx, sry, qx, qy))


def _write_and_hash(block: np.ndarray, target: zarr.Array, block_info: Any = None) -> np.ndarray:
    """Write ``block`` into ``target`` at its place; return per-pattern digest and bad-pixel count.

    Returns an array of shape (crx, cry, 40) uint8: the SHA-256 of each pattern's little-endian
    bytes, then the pattern's count of NaN/Inf pixels as little-endian uint64.
    """
    location = block_info[0]["array-location"]
    target[tuple(slice(a, b) for a, b in location)] = block
    little = block.astype(block.dtype.newbyteorder("<"), copy=False)
    patterns = np.ascontiguousarray(little).reshape(block.shape[0] * block.shape[1], -1)
    out = np.empty((patterns.shape[0], _DIGEST + 8), np.uint8)
    for i, pattern in enumerate(patterns):
        out[i, :_DIGEST] = np.frombuffer(hashlib.sha256(pattern.data).digest(), np.uint8)
    if block.dtype.kind == "f":
        bad = (~np.isfinite(patterns)).sum(axis=1).astype("<u8")
    else:
        bad = np.zeros(patterns.shape[0], "<u8")
    out[:, _DIGEST:] = bad.view(np.uint8).reshape(-1, 8)
    return out.reshape(block.shape[:2] + (_DIGEST + 8,))


def _compute_settled(array: da.Array) -> np.ndarray:
    """``array`` computed; where a block fails, the error is raised only once no other block
    is still running. dask's threaded scheduler raises at the first error while its other
    threads write on, and the temporary store removed meanwhile came back as a stray
    ``.partial`` folder."""
    if dask.base.get_scheduler(collections=[array]) is not dask.threaded.get:
        return array.compute()
    workers = dask.config.get("num_workers", None) or CPU_COUNT
    pool = ThreadPoolExecutor(workers)
    try:
        return array.compute(pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _skeleton(
    data: da.Array, calibration: Calibration, attrs: dict[str, Any], extras: xr.Dataset | None
) -> xr.Dataset:
    shape = tuple(int(n) for n in data.shape)
    coords = scan_coords(shape, calibration)  # type: ignore[arg-type]
    var_attrs = {
        "units": "counts" if data.dtype.kind in "ui" else "1",
        "long_name": "diffraction intensity",
    }
    ds = xr.Dataset(
        {SCAN_VARIABLE: (DIMS, data, var_attrs)},
        coords={name: (dim, values, a) for name, (dim, values, a) in coords.items()},
    )
    if extras is not None:
        for name, var in extras.data_vars.items():
            if var.dims != ("rx", "ry") or var.shape != shape[:2]:
                raise InputError(
                    f"extra variable {name} has dims {var.dims} {var.shape}; "
                    f"expected (rx, ry) {shape[:2]}."
                )
            ds[name] = (var.dims, np.asarray(var.values), json_values(var.attrs))
    ds.attrs = json_values({**calibration.to_attrs(), **attrs})
    return ds


def read_store_attrs(location: Location) -> dict[str, Any] | None:
    """Group attributes of the Zarr store at ``location``, or None if it is not a Zarr group."""
    group = open_store_group(location)
    return None if group is None else dict(group.attrs)


def open_store_group(location: Location) -> zarr.Group | None:
    """The Zarr group of the store at ``location`` (a scan or strain store), opened for reading:
    for a caller that needs more than its attributes (:func:`read_store_attrs`), such as its
    arrays, without reading its metadata again.

    Parameters
    ----------
    location
        The store, local or on object storage.

    Returns
    -------
    zarr.Group or None
        The Zarr v3 group (attributes, and the arrays' metadata where consolidated), or None if
        ``location`` holds no Zarr group.

    Notes
    -----
    Zarr is told the format: where ``zarr.json`` exists it reads that as the group in any case,
    and need not also look for Zarr v2 metadata (``.zgroup``, ``.zattrs``, ``.zmetadata``: on
    object storage two requests each).
    """
    with storage_errors(location.url):
        if not location.fs.exists(location.path.rstrip("/") + "/zarr.json"):
            return None
        try:
            return zarr.open_group(
                location.url,
                mode="r",
                zarr_format=3,
                storage_options=location.storage_options or None,
            )
        except Exception:  # noqa: BLE001 - any unreadable metadata means "not a store of ours"
            return None


def _open_data(location: Location) -> zarr.Array | None:
    """The scan store's ``data`` array, opened for reading from its own metadata (Zarr v3, as
    the whole store); None where that (``data/zarr.json``) is missing."""
    with storage_errors(location.url):
        try:
            return zarr.open_array(
                location.url,
                path=SCAN_VARIABLE,
                mode="r",
                zarr_format=3,
                storage_options=location.storage_options or None,
            )
        except zarr.errors.NodeNotFoundError:
            return None


def _missing_blocks(
    location: Location,
    attrs: dict[str, Any],
    array: zarr.Array | None,
    group: zarr.Group | None = None,
) -> str | None:
    """What the scan store at ``location`` lacks of what its writer stored, as a clause naming
    the store and what is missing: its data array's metadata (``array`` None, as
    :func:`_open_data` gives it), or blocks of an array (the first array that lacks any: its
    count of missing blocks, its first missing key and what they would read as); None where it
    lacks nothing.

    One listing of the store (:func:`stemlib.io.blocks.missing_blocks`); no data is read.
    ``attrs`` are the store's group attributes: a store that records ``stored_blocks`` has the
    blocks of all its arrays checked (their metadata is read from the group's consolidated
    metadata), one that records only ``data_blocks`` those of ``data``, and one that records
    neither (written before stemflow recorded them) none, as it may lack blocks of the fill value
    that were never written. ``group`` is the store's group where the caller opened it already
    (:func:`open_store_group`); None opens it for those other arrays.
    """
    where = redact(location.url)
    if array is None:
        return f"{where} lacks the metadata of its patterns ({SCAN_VARIABLE}/zarr.json)"
    if STORED_BLOCKS_ATTR in attrs:
        arrays = {SCAN_VARIABLE: array, **_other_arrays(location, group)}
    elif BLOCKS_ATTR in attrs:
        arrays = {SCAN_VARIABLE: array}
    else:
        return None
    missing, _ = missing_blocks(location, arrays)
    if not missing:
        return None
    name = missing[0].split("/", 1)[0]
    lost = [key for key in missing if key.split("/", 1)[0] == name]
    what = "patterns" if name == SCAN_VARIABLE else name
    return (
        f"{where} lacks {len(lost)} of the {len(block_keys(arrays[name]))} blocks that hold its "
        f"{what} (first missing: {lost[0]}), which would read as {_fill_words(arrays[name])}"
    )


def _other_arrays(location: Location, group: zarr.Group | None) -> dict[str, zarr.Array]:
    """The arrays of the scan store at ``location`` other than ``data`` (coordinates, ground
    truth, per-position maps), by path; from the consolidated metadata of its group (``group``,
    else opened here: a Zarr v3 group, whose attributes the caller read)."""
    with storage_errors(location.url):
        if group is None:
            group = zarr.open_group(
                location.url,
                mode="r",
                zarr_format=3,
                storage_options=location.storage_options or None,
            )
        return {name: array for name, array in group.arrays() if name != SCAN_VARIABLE}


def _fill_words(array: zarr.Array) -> str:
    """How a missing block of ``array`` reads: its fill value in words.

    >>> _fill_words(zarr.create_array({}, shape=(2,), dtype="f8", fill_value=np.nan))
    'NaN'
    >>> [_fill_words(zarr.create_array({}, shape=(2,), dtype=t)) for t in ("u2", "?")]
    ['zeros', 'False']
    """
    fill = np.asarray(array.fill_value)
    if fill.dtype.kind == "f" and np.isnan(fill):
        return "NaN"
    return "zeros" if fill.dtype.kind in "uif" and fill == 0 else str(fill.item())


#: What to do about a store that lost part of what its writer stored.
_WRITE_AGAIN = (
    "copy the store again from its source, or rerun the command that wrote it (stemflow "
    "ingest, simulate or noise) to write it again."
)


def _refuse_damage(
    location: Location,
    attrs: dict[str, Any],
    array: zarr.Array | None,
    group: zarr.Group | None = None,
) -> None:
    """Raise what :func:`_missing_blocks` finds missing, with what to do about it."""
    damage = _missing_blocks(location, attrs, array, group)  # what was lost since it was written
    if damage is not None:
        raise InputError(f"{damage}; {_WRITE_AGAIN}")


def refuse_damaged(url: str | Location) -> None:
    """Refuse the scan store at ``url`` if it lost any object its writer stored (one listing,
    no data read), as :func:`open_scan` does: for readers of its other arrays, such as the
    ground truth (:func:`stemlib.truth.open_truth`). A folder that holds no stemflow store is
    left to its reader.

    Raises
    ------
    InputError
        One sentence naming the store, the array and its first missing object.
    """
    location = locate(url) if isinstance(url, str) else url
    group = open_store_group(location)
    if group is not None:
        _refuse_damage(location, dict(group.attrs), _open_data(location), group)


def intact_scan(location: Location, attrs: dict[str, Any], group: zarr.Group | None = None) -> bool:
    """Whether a rerun may skip the finished scan store at ``location`` (its group attributes
    ``attrs``; ``group``, where the caller opened it, :func:`open_store_group`): False where it
    lacks its data array's metadata or blocks its writer stored, which is logged as a warning
    (the rerun writes it again)."""
    return _intact_data(location, attrs, group) is not None


def _intact_data(
    location: Location, attrs: dict[str, Any], group: zarr.Group | None = None
) -> zarr.Array | None:
    """The data array of the scan store at ``location``, as :func:`intact_scan` sees it: None
    (and a warning) where it lacks its metadata or blocks its writer stored."""
    array = _open_data(location)
    damage = _missing_blocks(location, attrs, array, group)
    if damage is not None:
        log.warning("%s; writing it again.", damage)
        return None
    return array


def finite_counts(scan: xr.DataArray) -> da.Array:
    """The scan's lazy data with the non-finite pixels of a store written with
    ``allow_nonfinite`` (its ``nonfinite_pixels`` attribute) read as 0 counts, as a detector's
    masked pixels; a pattern that is all NaN then shows no disks and gets no strain."""
    data = scan.data if isinstance(scan.data, da.Array) else da.from_array(np.asarray(scan.data))
    if not scan.attrs.get("nonfinite_pixels"):
        return data
    return da.where(da.isfinite(data), data, data.dtype.type(0))


#: The attribute that marks each kind of stemflow store.
_MARK = {"scan": "content_sha256", "strain": "methods"}


def check_destination(
    dest: str | Location,
    kind: Literal["scan", "strain"],
    *,
    methods: Collection[str] | None = None,
) -> None:
    """Refuse a destination whose publication would destroy something else: a run replaces
    only a stemflow store of its own ``kind`` (or an empty folder) at ``dest``, never a file
    or folder of the user's, nor a store of the other kind (the input scan, say); and a strain
    store only if it holds no method but ``methods``, those of the result about to replace it.

    Raises
    ------
    InputError
        If ``dest`` holds anything else.
    """
    dest = locate(dest) if isinstance(dest, str) else dest
    if not dest.exists() or interrupted_publication(dest):
        return
    with storage_errors(dest.url):
        empty = dest.fs.isdir(dest.path) and not dest.fs.ls(dest.path)
    attrs = {} if empty else read_store_attrs(dest)
    if attrs is None or not (empty or _MARK[kind] in attrs):
        raise InputError(
            f"{redact(dest.url)} already exists and is not a stemflow {kind} store, the only "
            "thing a run replaces; choose another destination or remove it."
        )
    others = sorted(set(attrs.get("methods", ())) - set(methods or ())) if methods else []
    if others:
        raise InputError(
            f"{redact(dest.url)} holds the {' and '.join(others)} result, which the "
            f"{' and '.join(methods)} result would replace; choose another destination, or "
            "run the methods together with `stemflow run`."
        )


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_scan` published (JSON-ready via :meth:`as_dict`); ``status`` is
    ``"skipped"`` where ``dest`` already held the scan of the same recipe
    (:func:`finished_scan`)."""

    url: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    content_sha256: str
    nbytes: int
    stored_bytes: int
    nonfinite_pixels: int
    status: Literal["written", "skipped"] = "written"

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def write_scan(
    data: da.Array,
    dest: str | Location,
    *,
    calibration: Calibration,
    attrs: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    layout: StoreLayout | None = None,
    extras: xr.Dataset | None = None,
    recipe: dict[str, Any] | None = None,
) -> WriteResult:
    """Stream ``data`` into a new scan store at ``dest``, atomically.

    Parameters
    ----------
    data
        Lazy array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2), any dtype; a
        big-endian one (a ``>u2`` .npy or raw file) is stored in this machine's byte order,
        the same values.
    dest
        Local path or fsspec URL of the store. An existing scan store there is replaced only
        once the new one is complete and verified; anything else there is refused
        (:func:`check_destination`).
    calibration
        Stored as attributes and used for the coordinates (:func:`stemlib.calibration.scan_coords`).
    attrs
        Further group attributes (provenance). Must be JSON-serialisable.
    allow_nonfinite
        Store float data holding NaN/Inf (their count is recorded) instead of refusing it.
    layout
        Chunks and shards; :func:`choose_layout` by default.
    extras
        Small per-position variables with dims (rx, ry) stored beside ``data`` (e.g. the ground
        truth of a simulated scan, see :mod:`stemlib.truth`).
    recipe
        What determines ``data``'s values (JSON-serialisable: its source's content hash and
        parameters, say); its fingerprint is stored as ``recipe_sha256`` so that a rerun finds
        the finished scan with :func:`finished_scan`.

    Returns
    -------
    WriteResult
        URL, shape, dtype, chunks, shards, ``content_sha256``, logical and stored bytes, and the
        count of non-finite pixels.

    Raises
    ------
    InputError
        Float data holding NaN/Inf when ``allow_nonfinite`` is False, or a ``dest`` that holds
        something other than a scan store (nothing is published).
    """
    dest = locate(dest) if isinstance(dest, str) else dest
    check_destination(dest, "scan")
    if data.ndim != 4:
        raise InputError(f"a scan needs 4 dims (rx, ry, qx, qy), got shape {data.shape}.")
    shape = tuple(int(n) for n in data.shape)
    if data.dtype.kind not in "uif":
        raise InputError(
            f"the scan for {redact(dest.url)} holds {data.dtype} values; a scan needs real "
            "numbers (integer or float counts)."
        )
    origin = calibration.origin_px
    if origin is not None and not all(0 <= o < n for o, n in zip(origin, shape[2:], strict=True)):
        raise InputError(
            f"the direct beam (origin) {tuple(origin)} px lies outside the {shape[2]} x "
            f"{shape[3]} px patterns of the scan for {redact(dest.url)}; pass --origin QX,QY "
            "within them."
        )
    if not data.dtype.isnative:  # Zarr reads it back native: the check would see another dtype
        data = data.astype(data.dtype.newbyteorder("="))
    layout = layout or choose_layout(shape, data.dtype)  # type: ignore[arg-type]
    block = layout.write_block
    data = data.rechunk(block)

    def verify(temp: Location) -> None:
        opened = open_scan(temp.url)
        if opened.shape != shape or opened.dtype != data.dtype:
            raise RuntimeError(
                f"verification of {redact(dest.url)} failed: wrote {opened.shape} {opened.dtype}"
            )

    with staged(dest, verify=verify) as temp:
        options = temp.storage_options or None
        skeleton = _skeleton(data, calibration, attrs or {}, extras)
        encoding = {
            SCAN_VARIABLE: {
                "chunks": layout.chunks,
                # the checksum makes a damaged chunk fail to read instead of reading as wrong counts
                "compressors": [
                    BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
                    Crc32cCodec(),
                ],
                **({"shards": layout.shards} if layout.shards else {}),
            }
        }
        with warnings.catch_warnings(), storage_errors(dest.url):
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # every block is stored, also one of the fill value only: one missing later is damage
            skeleton.to_zarr(
                temp.url,
                mode="w-",
                compute=False,
                zarr_format=3,
                encoding=encoding,
                write_empty_chunks=True,  # the coordinates and extras, written now
                storage_options=options,
            )
            with zarr.config.set({"array.write_empty_chunks": True}):  # the data, by block below
                target = zarr.open_array(
                    temp.url, path=SCAN_VARIABLE, mode="r+", storage_options=options
                )
            records = data.map_blocks(
                _write_and_hash,
                target=target,
                meta=np.empty((0, 0, 0), np.uint8),  # never call the writer to guess the output
                drop_axis=(2, 3),
                new_axis=2,
                chunks=data.chunks[:2] + ((_DIGEST + 8,),),
                name="stemflow-write-scan-" + dask.base.tokenize(data, temp.url),
            )
            records = _compute_settled(records)
        digests = records[..., :_DIGEST]
        nonfinite = int(np.ascontiguousarray(records[..., _DIGEST:]).view("<u8").sum())
        if nonfinite and not allow_nonfinite:
            bad_patterns = int((np.ascontiguousarray(records[..., _DIGEST:]).view("<u8") > 0).sum())
            raise InputError(
                f"{attrs.get('source', 'the source') if attrs else 'the source'} holds "
                f"{nonfinite} NaN/Inf pixels in {bad_patterns} patterns; clean the data, or pass "
                "--allow-nonfinite to store them with their count recorded."
            )
        content = hashlib.sha256(np.ascontiguousarray(digests).tobytes()).hexdigest()
        with warnings.catch_warnings(), storage_errors(dest.url):
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            group = zarr.open_group(temp.url, mode="r+", storage_options=options)
            group.attrs.update(
                {
                    "content_sha256": content,
                    "content_hash_scheme": HASH_SCHEME,
                    "nonfinite_pixels": nonfinite,
                    **({"recipe_sha256": fingerprint(recipe)} if recipe is not None else {}),
                    BLOCKS_ATTR: len(block_keys(target)),
                    STORED_BLOCKS_ATTR: sum(len(block_keys(a)) for _, a in group.arrays()),
                    "complete": True,
                }
            )
            zarr.consolidate_metadata(group.store)
            stored = int(temp.fs.du(temp.path))
    return WriteResult(
        url=dest.url,
        shape=shape,
        dtype=np.dtype(data.dtype).str,
        chunks=layout.chunks,
        shards=layout.shards,
        content_sha256=content,
        nbytes=int(data.nbytes),
        stored_bytes=stored,
        nonfinite_pixels=nonfinite,
    )


def finished_scan(dest: str | Location, recipe: dict[str, Any]) -> WriteResult | None:
    """What an earlier :func:`write_scan` of the same ``recipe`` published at ``dest``, with
    status ``"skipped"``; None where ``dest`` holds no finished scan of it, or one that lacks
    blocks (:func:`intact_scan`): then write it."""
    dest = locate(dest) if isinstance(dest, str) else dest
    if not dest.exists() or interrupted_publication(dest):
        return None
    group = open_store_group(dest)  # its attributes, and its arrays for the damage check
    attrs = {} if group is None else dict(group.attrs)
    if not attrs.get("complete") or attrs.get("recipe_sha256") != fingerprint(recipe):
        return None
    stored = _intact_data(dest, attrs, group)
    if stored is None:
        return None
    with storage_errors(dest.url):
        stored_bytes = int(dest.fs.du(dest.path))
    return WriteResult(
        url=dest.url,
        shape=tuple(int(n) for n in stored.shape),
        dtype=stored.dtype.str,
        chunks=tuple(int(n) for n in stored.chunks),
        shards=tuple(int(n) for n in stored.shards) if stored.shards else None,
        content_sha256=attrs["content_sha256"],
        nbytes=int(stored.nbytes),
        stored_bytes=stored_bytes,
        nonfinite_pixels=int(attrs.get("nonfinite_pixels", 0)),
        status="skipped",
    )


def open_scan(url: str | Location) -> xr.DataArray:
    """Open a scan store lazily as a DataArray with dims (rx, ry, qx, qy).

    The returned attrs merge the group's calibration and provenance with the variable's
    ``units`` and ``long_name``.

    Raises
    ------
    InputError
        If ``url`` does not exist, is not a stemflow scan store, or lacks its data array's metadata
        or blocks that its writer stored (damaged after it was written: see the module's
        notes; checked by one listing, before any data is read).

    Examples
    --------
    >>> patterns, step = da.ones((2, 3, 8, 8), dtype="uint16"), Calibration(probe_step_nm=0.5)
    >>> _ = write_scan(patterns, "memory://doc/scan.zarr", calibration=step)
    >>> scan = open_scan("memory://doc/scan.zarr")
    >>> scan.dims, scan.shape, scan["rx"].attrs["units"], int(scan[1, 2].sum())
    (('rx', 'ry', 'qx', 'qy'), (2, 3, 8, 8), 'nm', 64)
    """
    location = locate(url) if isinstance(url, str) else url
    where = redact(location.url)
    group = open_store_group(location)  # read once: attributes here, arrays for the damage check
    if group is None:
        if not location.exists():
            raise InputError(f"{where} does not exist; run `stemflow ingest SOURCE {where}` first.")
        raise InputError(
            f"{where} is not a Zarr scan store; convert the raw scan with `stemflow ingest` first."
        )
    attrs = dict(group.attrs)
    options = location.storage_options or None
    with warnings.catch_warnings(), storage_errors(location.url):
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        # xarray opens the group again (it takes no zarr group), as the Zarr v3 group it is
        ds = xr.open_zarr(location.url, storage_options=options, chunks={}, zarr_format=3)
    if SCAN_VARIABLE not in ds or ds[SCAN_VARIABLE].dims != DIMS:
        found = {name: v.dims for name, v in ds.data_vars.items()}
        raise InputError(
            f"{where} is not a scan store: it needs a variable 'data' with dims (rx, ry, qx, qy) "
            f"and holds {found or 'no variables'}; convert the raw scan with `stemflow ingest`."
        )
    scan = ds[SCAN_VARIABLE]
    # one dask block per shard, the unit a writer wrote, rather than per inner chunk
    chunks = scan.encoding.get("shards") or scan.encoding["chunks"]
    stored = _open_data(location)
    _refuse_damage(location, attrs, stored, group)
    content = attrs.get("content_sha256")
    normalised = da.core.normalize_chunks(chunks, stored.shape, dtype=stored.dtype)
    data = da.from_array(
        _Decoded(stored, where),
        chunks=normalised,
        name=(
            stored_array_name(content, normalised, stored.dtype)
            if content
            else "scan-" + dask.base.tokenize(location.url, normalised)
        ),
        asarray=False,
    )
    opened = scan.copy(data=data).assign_attrs({**ds.attrs, **scan.attrs})
    opened.encoding["source"] = where  # as xarray records the file a dataset was opened from
    return opened


def scan_label(scan: Any) -> str:
    """How messages name a scan: the store it was opened from (:func:`open_scan`), else the
    source its attributes record, else its name.

    >>> scan_label(xr.DataArray([0], name="data", attrs={"source": "/raw/scan.mib"}))
    '/raw/scan.mib'
    >>> scan_label(xr.DataArray(da.zeros(3))), scan_label(xr.DataArray([0], name="tilt_series"))
    ('the scan', 'tilt_series')
    """
    encoding = getattr(scan, "encoding", None) or {}
    attrs = getattr(scan, "attrs", None) or {}
    name = getattr(scan, "name", None)
    if name is not None and name == getattr(getattr(scan, "data", None), "name", None):
        name = None  # xarray names a DataArray after its dask array's key ("getitem-5c5d...")
    return str(encoding.get("source") or attrs.get("source") or name or "the scan")


@dataclass(frozen=True)
class _Decoded:
    """The stored scan, read by block: a block that does not decode (a truncated or damaged
    chunk file, whose checksum fails) is one sentence naming the store."""

    array: zarr.Array
    where: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except (RuntimeError, ValueError):  # blosc's error, the checksum's mismatch
            rx, ry = (f"{k.start}:{k.stop}" if isinstance(k, slice) else k for k in key[:2])
            raise InputError(
                f"{self.where}: the patterns at rx {rx}, ry {ry} cannot be read back (a chunk "
                "file was cut short or changed); ingest the raw scan again."
            ) from None
