"""Local copies of remote source files, for the readers that open a file by its local path.

The vendor readers (rosettasciio's, and those that read frames at file offsets) open files on a
local disk. A source on object storage is copied for them into a new temporary folder under
``TMPDIR``, together with the companion files its reader uses (the ``.hdr`` of a Merlin
``.mib``, the ``.raw`` that an EMPAD ``.xml`` names, ...). Each file streams through in blocks of
:data:`COPY_BLOCK_BYTES`, so a scan of tens of GB never sits in memory, and the free space of
the temporary folder's disk is checked before the copies. The same listing of companion files
(:func:`companion_files`) is part of the source's key (:func:`stemlib.ingest.source_key`): an
ingest lists them once, for the key, and copies what that listing found.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fsspec

from ..errors import ResourceError
from .storage import Location, redact, storage_errors, temporary_folder

__all__ = ["COPY_BLOCK_BYTES", "LocalCopy", "check_free_space", "companion_files"]

#: The :func:`~stemlib.io.storage.temporary_folder` prefix of the copies' folders under
#: ``TMPDIR``: a folder that a killed ingest left (it can hold a whole scan) is removed by the
#: next copy on the same machine.
SOURCE_PREFIX = "stemflow-source"

#: Bytes read from the source per request (and held in memory) while a file is copied.
COPY_BLOCK_BYTES = 16 * 2**20


def _size_text(n_bytes: int) -> str:
    """A size for messages, in GB from 0.1 GB up, else in MB.

    >>> _size_text(12_345_678_901), _size_text(2_500_000)
    ('12.3 GB', '2.5 MB')
    """
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def _short_of_space(source: str, needed_bytes: int, folder: str) -> ResourceError:
    free = shutil.disk_usage(folder).free
    return ResourceError(
        f"{redact(source)} needs {_size_text(needed_bytes)} of local disk for the copy its reader "
        f"opens, but {folder} has {_size_text(free)} free; set TMPDIR to a folder on a disk with "
        "more free space."
    )


def check_free_space(source: str, needed_bytes: int, folder: str) -> None:
    """Refuse to copy ``needed_bytes`` (bytes) of ``source`` into ``folder`` when its disk has
    less free space.

    Raises
    ------
    ResourceError
        One sentence naming ``source`` (without credentials), the space needed and free, and
        the fix (``TMPDIR``).
    """
    if shutil.disk_usage(folder).free < needed_bytes:
        raise _short_of_space(source, needed_bytes, folder)


class LocalCopy:
    """The file at ``location`` and its companion files, copied into a new temporary folder.

    Parameters
    ----------
    location
        A file on any fsspec filesystem (an object store, typically).
    companions
        Given ``location``, the glob patterns (relative to its folder) of the companion files
        its reader uses (:func:`companion_files`). Those that exist are copied beside it under
        the same relative names; a missing one is not, and the reader names it.
    listed
        The companion files as :func:`companion_files` listed them with ``companions`` (path
        -> fsspec info with ``size`` in bytes), copied without listing them again; None lists
        them.
    size
        The size in bytes of the file at ``location`` where the caller knows it (from its
        fsspec info), not asked again; None asks.

    Attributes
    ----------
    location
        The copy: ``path`` on the local disk, ``url`` still the source's URL, so that messages
        and provenance name the source, never the copy.

    Raises
    ------
    ResourceError
        When the disk of the temporary folder (``TMPDIR``) has less free space than the files.
    StorageError
        When the object store cannot be reached or refuses access.

    Notes
    -----
    :meth:`close` removes the folder; so does a failure while copying.
    """

    def __init__(
        self,
        location: Location,
        companions: Callable[[Location], Sequence[str]],
        *,
        listed: Mapping[str, Mapping[str, Any]] | None = None,
        size: int | None = None,
    ) -> None:
        self._stack = contextlib.ExitStack()
        self._folder = self._stack.enter_context(temporary_folder(SOURCE_PREFIX))
        try:
            if size is None:
                with storage_errors(location.url):
                    size = location.fs.info(location.path)["size"]
            files = {location.path: int(size)}
            if listed is None:
                listed = companion_files(location, companions)
            for path, info in listed.items():
                files[path] = int(info["size"])
            self._copy(location, files)
        except BaseException:
            self.close()
            raise
        local = os.path.join(self._folder, location.name)
        self.location = Location(url=location.url, fs=fsspec.filesystem("file"), path=local)

    def close(self) -> None:
        """Remove the temporary folder and everything in it."""
        self._stack.close()

    def _copy(self, location: Location, files: dict[str, int]) -> None:
        """Stream ``files`` (path beside ``location`` on its filesystem -> size in bytes) into
        the folder, under their paths relative to ``location``'s folder."""
        needed = sum(files.values())
        root = os.path.dirname(self._folder)
        check_free_space(location.url, needed, root)
        base = posixpath.dirname(location.path)
        for path in files:
            target = os.path.join(self._folder, posixpath.relpath(path, base))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                _stream(location, path, target)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # another process filled the disk meanwhile
                    raise _short_of_space(location.url, needed, root) from None
                raise


def companion_files(
    location: Location, companions: Callable[[Location], Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """The companion files of the file at ``location`` that its reader uses, listed without
    reading them.

    Parameters
    ----------
    location
        A file on any fsspec filesystem.
    companions
        A format's ``companions``: given ``location``, glob patterns relative to its folder. An
        absolute pattern, or one that leaves the folder, is ignored.

    Returns
    -------
    dict
        Path on ``location``'s filesystem -> fsspec info (``size`` in bytes, ``mtime`` or
        ``LastModified``, ...) of each file that matches, sorted by path; ``location`` itself
        is left out.

    Raises
    ------
    StorageError
        When the object store cannot be reached or refuses access.

    Notes
    -----
    The folder is listed afresh: a listing that s3fs kept from earlier would hide a companion
    replaced since.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from stemlib.io.storage import locate
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ["a.mib", "a.hdr", "b.hdr"]:
    ...     _ = (d / name).write_bytes(b"12345")
    >>> found = companion_files(locate(d / "a.mib"), lambda loc: ["a.hdr", "*.mib", "../*"])
    >>> [(posixpath.basename(p), info["size"]) for p, info in found.items()]
    [('a.hdr', 5)]
    """
    base = posixpath.dirname(location.path)
    found: dict[str, dict[str, Any]] = {}
    with storage_errors(location.url):
        patterns = companions(location)
        location.fs.invalidate_cache(base)
        for pattern in patterns:
            if not pattern.startswith("/") and ".." not in pattern.split("/"):
                matches = location.fs.glob(posixpath.join(base, pattern), detail=True)
                found.update({p: i for p, i in matches.items() if i["type"] == "file"})
    found.pop(location.path, None)
    return dict(sorted(found.items()))


def _stream(location: Location, path: str, target: str) -> None:
    """Copy ``path`` on ``location``'s filesystem to the local file ``target``, one block of
    :data:`COPY_BLOCK_BYTES` at a time (one ranged request per block on object storage)."""
    with (
        storage_errors(location.url),
        location.fs.open(path, "rb", block_size=COPY_BLOCK_BYTES, cache_type="none") as src,
        open(target, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, COPY_BLOCK_BYTES)
