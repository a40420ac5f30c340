"""Find the raw scans under a folder or bucket prefix.

A scan is a file in a supported format (:data:`stemlib.io.readers.FORMATS`), counted once:
companion files that belong to another file of the same acquisition are left out (an EMPAD
``.raw`` that its ``.xml`` names, a TIA ``.ser`` beside its ``.emi``, ARINA data files beside
their master, TVIPS parts after ``_000``), and so are an ``.xml`` that is no EMPAD header with
its ``.raw``, raw binary files, which cannot be read without their layout, and Zarr stores
(results).
"""

from __future__ import annotations

import posixpath
import re
import xml.etree.ElementTree as ET
from typing import Any

from .io.readers import FORMATS, format_named
from .io.storage import locate, storage_errors

__all__ = ["find_scans", "scan_name"]

_ARINA_DATA = re.compile(r"_data_\d+\.h5$", re.IGNORECASE)
_TVIPS_PART = re.compile(r"_(\d{3})\.tvips$", re.IGNORECASE)
_SKIPPED_FORMATS = {"raw"}


def _extensions(format: str) -> tuple[str, ...]:
    """The file endings of scans in ``format`` ("auto": every format that says its own layout)."""
    if format != "auto":
        return format_named(format).extensions
    return tuple(
        sorted(
            {
                ext
                for f in FORMATS.values()
                if f.name not in _SKIPPED_FORMATS
                for ext in f.extensions
            }
        )
    )


def _is_companion(path: str, present: set[str]) -> bool:
    ext = posixpath.splitext(path)[1].lower()
    if ext == ".ser" and any(
        p.lower().endswith(".emi") and posixpath.dirname(p) == posixpath.dirname(path)
        for p in present
    ):
        return True
    if _ARINA_DATA.search(path):
        return True
    part = _TVIPS_PART.search(path)
    return bool(part and part.group(1) != "000")


#: Bytes of an .xml read to tell an EMPAD header (a few kB) from other XML files.
_HEADER_BYTES = 2**20


def _empad_header(fs: Any, path: str, present: set[str]) -> bool:
    """Whether the .xml at ``path`` is an EMPAD header whose raw data file (named inside it,
    ``scan_x256_y256.raw`` say) is among the ``present`` files."""
    from .io.readers.vendor.empad import raw_file_name

    try:
        with fs.open(path, "rb") as f:
            name = raw_file_name(f.read(_HEADER_BYTES))
    except (OSError, ET.ParseError):  # not an EMPAD header
        return False
    return bool(name) and posixpath.join(posixpath.dirname(path), str(name)) in present


def find_scans(root: str, format: str = "auto") -> list[str]:
    """URLs of the raw scans under ``root`` (a folder or ``s3://bucket/prefix``), sorted.

    ``format``: "auto" finds every supported format but raw binary; a format's name (a key of
    :data:`~stemlib.io.readers.FORMATS`) finds only its files, raw binary ones included (for a
    facility whose layout is given by the ingest options).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ["a.mib", "a.hdr", "b/x.raw", "b/y.xml", "c.emi", "c_1.ser", "notes.txt"]:
    ...     (d / name).parent.mkdir(exist_ok=True)
    ...     _ = (d / name).write_bytes(b"")
    >>> _ = (d / "b/x.xml").write_text('<root><raw_file filename="x.raw"/></root>')
    >>> _ = (d / "b/e.xml").write_text('<root><raw_file filename="scan_x4_y3.raw"/></root>')
    >>> _ = (d / "b/scan_x4_y3.raw").write_bytes(b"")
    >>> [p.removeprefix(str(d) + "/") for p in find_scans(str(d))]
    ['a.mib', 'b/e.xml', 'b/x.xml', 'c.emi']
    >>> [p.removeprefix(str(d) + "/") for p in find_scans(str(d), format="raw")]
    ['b/scan_x4_y3.raw', 'b/x.raw']
    """
    location = locate(root)
    extensions = _extensions(format)
    with storage_errors(location.url):
        if not location.fs.isdir(location.path):
            return []
        found = [p for p in location.fs.find(location.path) if ".zarr/" not in p + "/"]
    present = set(found)
    scans = [
        p
        for p in found
        if p.lower().endswith(extensions)
        and not _is_companion(p, present)
        and (not p.lower().endswith(".xml") or _empad_header(location.fs, p, present))
    ]
    scheme = "" if location.is_local else root.split("://", 1)[0] + "://"
    return sorted(scheme + p for p in scans)


def scan_name(url: str, root: str) -> str:
    """The scan's path below ``root`` without its extension, e.g. ``day1/scan_042``.

    Examples
    --------
    >>> scan_name("s3://raw/day1/scan_042.mib", "s3://raw/")
    'day1/scan_042'
    """
    relative = url[len(root) :] if url.startswith(root) else posixpath.basename(url)
    return posixpath.splitext(relative.strip("/"))[0]
