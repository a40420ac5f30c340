"""Find the raw scans under a folder or bucket prefix.

A scan is a file in a supported format (:data:`stemlib.io.readers.FORMATS`), counted once:
companion files that belong to another file of the same acquisition are left out (an EMPAD
``.raw`` beside its ``.xml``, a TIA ``.ser`` beside its ``.emi``, ARINA data files beside their
master, TVIPS parts after ``_000``), and so are raw binary files, which cannot be read without
their layout, and Zarr stores (results).
"""

from __future__ import annotations

import posixpath
import re

from .io.readers import FORMATS
from .io.storage import locate, storage_errors

__all__ = ["find_scans", "scan_name"]

_ARINA_DATA = re.compile(r"_data_\d+\.h5$", re.IGNORECASE)
_TVIPS_PART = re.compile(r"_(\d{3})\.tvips$", re.IGNORECASE)
_SKIPPED_FORMATS = {"raw"}


def _extensions() -> tuple[str, ...]:
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
    stem, ext = posixpath.splitext(path)
    ext = ext.lower()
    if ext == ".ser" and any(
        p.lower().endswith(".emi") and posixpath.dirname(p) == posixpath.dirname(path)
        for p in present
    ):
        return True
    if ext == ".xml" and stem + ".raw" not in present:
        return True  # an .xml is a scan only as an EMPAD header with its frames
    if _ARINA_DATA.search(path):
        return True
    part = _TVIPS_PART.search(path)
    return bool(part and part.group(1) != "000")


def find_scans(root: str) -> list[str]:
    """URLs of the raw scans under ``root`` (a folder or ``s3://bucket/prefix``), sorted.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ["a.mib", "a.hdr", "b/x.xml", "b/x.raw", "c.emi", "c_1.ser", "notes.txt"]:
    ...     (d / name).parent.mkdir(exist_ok=True)
    ...     _ = (d / name).write_bytes(b"")
    >>> [p.removeprefix(str(d) + "/") for p in find_scans(str(d))]
    ['a.mib', 'b/x.xml', 'c.emi']
    """
    location = locate(root)
    extensions = _extensions()
    with storage_errors(location.url):
        if not location.fs.isdir(location.path):
            return []
        found = [p for p in location.fs.find(location.path) if ".zarr/" not in p + "/"]
    present = set(found)
    scans = [p for p in found if p.lower().endswith(extensions) and not _is_companion(p, present)]
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
