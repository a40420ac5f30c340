"""Where results live: local paths and fsspec URLs, and publishing a store atomically.

A store is written under a temporary sibling name, verified, then published under its final
name, so that a reader never takes a half-written result for a good one:

- on a local disk, publishing is one directory rename;
- on object storage (``s3://``), the objects are copied under the final prefix with the root
  ``zarr.json`` last: until that last copy, the destination is not a Zarr group at all.

A single local file (a checkpoint, an exported HDF5 file) is written the same way, whole or not
at all, by :func:`staged_file`.

A writer killed outright (kill -9, out of memory, power) cannot remove its temporary sibling.
Each one's name says which process wrote it, so that the next write to the same destination
removes those whose writer has ended (:func:`remove_abandoned`), and never one still in use.
The temporary folders a run keeps under ``TMPDIR`` (:func:`temporary_folder`) are named and
cleaned the same way. The temporary names of earlier stemflow versions, which do not say which
machine's process wrote them (``.X.zarr.partial-<12 hex digits>``, ``.X.h5.partial``,
``checkpoint.tmp<pid>``, ``rotation.partial.npz``, ``ccstae-work-<random>``), are never removed
(see :func:`remove_abandoned`).

S3 endpoint and credentials come from the standard variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) or a named profile (``AWS_PROFILE``). Messages
name the URL without any credential and say which variable to check.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import InputError, StorageError

__all__ = [
    "Location",
    "locate",
    "redact",
    "storage_errors",
    "staged",
    "remove",
    "remove_abandoned",
    "temporary_sibling",
    "staged_file",
    "temporary_folder",
    "local_workdir",
    "work_folder",
    "interrupted_publication",
]

log = logging.getLogger("stemlib.io")

#: Seconds to wait for an object store before calling it unreachable.
CONNECT_TIMEOUT_S = 5


def redact(url: str) -> str:
    """``url`` without any user name or password, safe for messages and logs.

    Examples
    --------
    >>> redact("s3://AKIAXXX:secret@bucket/scan.zarr")
    's3://bucket/scan.zarr'
    >>> redact("/data/scan.npy")
    '/data/scan.npy'
    """
    userinfo = _userinfo(url)
    return url.replace(userinfo, "", 1) if userinfo else url


def _userinfo(url: str) -> str | None:
    """The ``user:password@`` part of ``url``, also where the password holds a ``/`` (as AWS
    secret keys do, which hides it from :func:`urllib.parse.urlsplit`'s netloc), else None.

    >>> _userinfo("s3://KEY:abc/def@bucket/scan.zarr")
    'KEY:abc/def@'
    >>> _userinfo("s3://bucket/runs@2026/scan.zarr") is None
    True
    """
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://([^@]*@)", url)
    if match is None:
        return None
    before = match.group(1)[:-1]
    return match.group(1) if ":" in before or "/" not in before else None


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol not in ("s3", "s3a"):
        return {}
    client: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    options: dict[str, Any] = {
        "client_kwargs": client,
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    }
    if os.environ.get("AWS_PROFILE"):
        options["profile"] = os.environ["AWS_PROFILE"]
    return options


@dataclass(frozen=True)
class Location:
    """A path on a filesystem: ``url`` as given, ``fs`` the fsspec filesystem, ``path`` on it."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options to pass to zarr/xarray for this URL (empty for local paths)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return _storage_options(protocol)

    @property
    def name(self) -> str:
        """The last path component, e.g. ``scan.zarr``."""
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        """The folder or prefix that holds this location."""
        return self.at(posixpath.dirname(self.path.rstrip("/")))

    def sibling(self, name: str) -> Location:
        """The location ``name`` in the same folder or prefix."""
        return self.at(posixpath.join(posixpath.dirname(self.path.rstrip("/")), name))

    def child(self, name: str) -> Location:
        return self.at(posixpath.join(self.path.rstrip("/"), name))

    def at(self, path: str) -> Location:
        """The location ``path`` (as ``fs`` writes paths) on the same filesystem."""
        scheme = urlsplit(self.url).scheme
        url = path if self.is_local else f"{scheme}://{path}"
        return Location(url=url, fs=self.fs, path=path)

    def exists(self) -> bool:
        with storage_errors(self.url):
            return bool(self.fs.exists(self.path))

    def __str__(self) -> str:
        return redact(self.url)


def locate(url: str | os.PathLike[str]) -> Location:
    """Resolve a local path or fsspec URL (``s3://bucket/key``) into a :class:`Location`.

    Raises
    ------
    InputError
        If the URL's protocol is not installed (e.g. ``gs://`` without gcsfs), or the URL
        carries a user name or password (``s3://KEY:SECRET@bucket/key``).
    """
    url = os.fspath(url)
    if not url:
        raise InputError(
            "An empty path was given: pass a file path or a URL such as s3://bucket/key."
        )
    scheme = urlsplit(url).scheme
    if len(scheme) > 1 and _userinfo(url):
        raise InputError(
            f"{redact(url)}: a URL must not carry credentials (they would reach logs and "
            "messages); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead."
        )
    if len(scheme) <= 1:  # a plain path (or a Windows drive letter)
        path = os.path.abspath(os.path.expanduser(url))
        return Location(url=path, fs=fsspec.filesystem("file"), path=path)
    try:
        fs, path = fsspec.core.url_to_fs(url, **_storage_options(scheme))
    except (ImportError, ValueError) as exc:
        raise InputError(
            f"{redact(url)}: the protocol {scheme}:// is not available ({exc}); "
            "use a local path or s3://bucket/key."
        ) from None
    return Location(url=url, fs=fs, path=path)


#: ``errno`` of a write to a full disk, or over a user's quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_sentence(path: str) -> str:
    """What to do where a write to the local ``path`` found its disk full.

    >>> disk_full_sentence("/data/scan.zarr")
    '/data/scan.zarr: its disk is full; free space on it, or write to another disk.'
    """
    return f"{path}: its disk is full; free space on it, or write to another disk."


def cannot_write_sentence(path: str, reason: str) -> str:
    """What to do where the local ``path`` cannot be written for ``reason`` (an ``strerror``).

    >>> cannot_write_sentence("/data/scan.zarr", "Read-only file system")
    '/data/scan.zarr: Read-only file system; check the path and that you can write there.'
    """
    return f"{path}: {reason}; check the path and that you can write there."


def _classify(exc: BaseException) -> str | None:
    """The kind of storage failure behind ``exc``: 'auth', 'unreachable', 'missing' or None."""
    name = type(exc).__name__
    text = str(exc)
    if name in {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId"}:
        return "auth"
    if isinstance(exc, PermissionError) or any(
        key in text
        for key in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
    ):
        return "auth"
    if name in {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
    } or isinstance(exc, (ConnectionError, TimeoutError)):
        return "unreachable"
    if "Could not connect to the endpoint" in text or "Connect timeout" in text:
        return "unreachable"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "missing"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return _classify(cause)
    return None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn failures of an object store at ``url`` into one-sentence :class:`StorageError`.

    Local errors other than permissions pass through unchanged. Credentials never appear in the
    message: only the redacted URL and the names of the variables to check.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised when unknown
        kind = _classify(exc)
        where = redact(url)
        remote = bool(urlsplit(url).scheme) and len(urlsplit(url).scheme) > 1
        if kind == "auth" and remote:
            raise StorageError(
                f"{where}: the object store refused the credentials or access; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key with "
                "access.",
                transient=False,
            ) from None
        if kind == "auth":
            raise StorageError(
                f"{where}: permission denied; choose a path you can write to.", transient=False
            ) from None
        if kind == "unreachable":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            at = f" at {endpoint}" if endpoint else ""
            raise StorageError(
                f"{where}: the object store{at} cannot be reached; check AWS_ENDPOINT_URL "
                "and that the server is running."
            ) from None
        if isinstance(exc, OSError) and exc.errno in DISK_FULL and not remote:
            raise InputError(disk_full_sentence(where)) from None
        if kind == "missing" and remote:
            raise StorageError(
                f"{where}: the bucket does not exist; create it or correct the URL.",
                transient=False,
            ) from None
        raise


def remove(location: Location) -> None:
    """Delete ``location`` recursively if it exists."""
    with storage_errors(location.url):
        if location.is_local:
            shutil.rmtree(location.path, ignore_errors=True)
            if os.path.exists(location.path):
                os.remove(location.path)
        elif location.fs.exists(location.path):
            location.fs.rm(location.path, recursive=True)


@functools.cache
def _process_table() -> str | None:
    """12 hex digits naming the table that this process's PID belongs to: this boot of this
    kernel (``boot_id``, random at every boot) and this PID namespace (a container has its own).
    Two writers with the same name see the same processes; None where it cannot be known
    (no ``/proc``: not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:12]


#: Kinds of temporary siblings: the store being written, and (on a local disk) the store it
#: replaces, between the two renames of :func:`_publish_local`.
TemporaryKind = Literal["partial", "old"]


#: The end of every temporary name: its writer's process table (:func:`_process_table`) and
#: PID, then 8 random hex digits (:func:`_temporary_name`).
_WRITER = r"(?P<table>[0-9a-f]{12})-(?P<pid>[0-9]+)-[0-9a-f]{8}"


def _temporary_name(stem: str) -> str:
    """A new temporary name, ``<stem>-<table>-<pid>-<random>``: ``table`` from
    :func:`_process_table` (``unknown`` where it cannot be known) and ``pid`` this process's,
    so that :func:`_writer_ended` can tell whether its writer still runs."""
    return f"{stem}-{_process_table() or 'unknown'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_ended(match: re.Match[str] | None) -> bool:
    """Whether the temporary name that ``match`` matched (groups ``table`` and ``pid`` of
    :data:`_WRITER`; None: a name that does not say its writer) was written by a process of
    this machine's process table that no longer runs. A name written elsewhere, or named
    otherwise (by an earlier stemflow), is never taken for abandoned."""
    if match is None or match["table"] != _process_table() or int(match["pid"]) <= 0:
        return False
    try:
        os.kill(int(match["pid"]), 0)  # sends nothing: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def _remove_ended_writers(folder: Location, name: re.Pattern[str]) -> list[str]:
    """Remove the entries of ``folder`` whose ``name`` matches in full and whose writer ended
    (:func:`_writer_ended`), best effort: a folder that cannot be listed, or an entry that
    cannot be removed, is left as it is. Returns the URLs removed (also logged)."""
    with storage_errors(folder.url):  # missing credentials: the sentence the write would give
        try:
            listed = folder.fs.ls(folder.path, detail=False)
        except OSError:  # no folder yet, no right to list it, no store: nothing to clean
            return []
        finally:
            # s3fs keeps the listing and would answer from it that the temporary store about
            # to be written there does not exist
            folder.fs.invalidate_cache(folder.path)
    removed = []
    for path in listed:
        entry = folder.at(path.rstrip("/"))
        if _writer_ended(name.fullmatch(entry.name)):
            with contextlib.suppress(OSError, StorageError):
                remove(entry)
                removed.append(entry.url)
                log.info("removed %s: its writer was killed before it could", entry)
    return removed


def temporary_sibling(dest: Location, kind: TemporaryKind) -> Location:
    """A new temporary sibling of ``dest``: ``.<name>.<kind>-<table>-<pid>-<random>``
    (:func:`_temporary_name`), which :func:`remove_abandoned` removes once its writer has ended.

    >>> temporary_sibling(locate("/data/scan.zarr"), "partial").name  # doctest: +ELLIPSIS
    '.scan.zarr.partial-...'
    """
    return dest.sibling(_temporary_name(f".{dest.name}.{kind}"))


def remove_abandoned(dest: Location) -> list[str]:
    """Remove the temporary siblings of ``dest`` (:func:`temporary_sibling`) whose writer was
    killed before it could.

    Only siblings written by a process of this machine (this boot, this PID namespace) that
    no longer runs are removed: a concurrent writer's is kept, and so is one written on
    another machine (a shared disk or an object store), since whether its writer runs cannot
    be known here. Cleaning is best effort: a folder that cannot be listed, or a sibling that
    cannot be removed, is left as it is and the write goes on.

    Returns
    -------
    list of str
        The URLs removed.

    Notes
    -----
    Siblings named by earlier stemflow versions (``.<name>.partial-<12 hex digits>``) are kept
    too. Their writer may be a run of that version still writing (on another machine of a
    shared disk, say), and their age does not tell: a store's folder is not touched while its
    chunks are written into subfolders, and an object store has no folders to date at all.
    Delete them by hand once no earlier stemflow writes beside ``dest``.
    """
    kinds = "|".join(get_args(TemporaryKind))
    name = re.compile(re.escape(f".{dest.name}.") + f"(?:{kinds})-" + _WRITER)
    return _remove_ended_writers(dest.parent, name)


def _publish_local(temp: Location, dest: Location) -> None:
    if os.path.exists(dest.path):
        old = temporary_sibling(dest, "old")
        os.rename(dest.path, old.path)
        os.rename(temp.path, dest.path)
        shutil.rmtree(old.path, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(dest.path) or ".", exist_ok=True)
        os.rename(temp.path, dest.path)


#: Written first into a destination prefix that an object store publication fills, removed
#: last: a prefix that still holds it is a publication of ours that was cut short.
PUBLISHING = ".stemflow-publishing"


def interrupted_publication(location: Location) -> bool:
    """Whether ``location`` is an object store prefix whose publication was cut short (see
    :data:`PUBLISHING`): a run may write there again."""
    if location.is_local:
        return False
    with storage_errors(location.url):
        return bool(location.fs.exists(posixpath.join(location.path, PUBLISHING)))


def _publish_remote(temp: Location, dest: Location) -> None:
    fs = temp.fs
    if fs.exists(dest.path):
        fs.rm(dest.path, recursive=True)
    marker = posixpath.join(dest.path, PUBLISHING)
    fs.pipe(marker, b"")
    keys = [k for k in fs.find(temp.path) if not k.endswith("/")]
    root_meta = posixpath.join(temp.path, "zarr.json")
    # The root metadata goes last: before it lands the destination is not a readable group.
    ordered = sorted(keys, key=lambda k: (k == root_meta, k))
    for key in ordered:
        fs.copy(key, posixpath.join(dest.path, posixpath.relpath(key, temp.path)))
    fs.rm(marker)
    fs.rm(temp.path, recursive=True)


@contextlib.contextmanager
def staged(
    dest: Location, *, verify: Callable[[Location], None] | None = None
) -> Iterator[Location]:
    """Write under a temporary sibling of ``dest``; verify and publish only on success.

    Parameters
    ----------
    dest
        The final location. An existing store there is replaced only at publication, so a
        failed run leaves it untouched; nor does it leave the temporary store, or a folder it
        created above ``dest`` that is still empty.
    verify
        Called with the temporary location after the body succeeds; it raises to refuse
        publication.

    Yields
    ------
    Location
        The temporary location to write to (:func:`temporary_sibling` of kind ``partial``).
        Temporary siblings of ``dest`` that killed writers left are removed first
        (:func:`remove_abandoned`).
    """
    created = _missing_folders(dest)
    remove_abandoned(dest)
    temp = temporary_sibling(dest, "partial")
    try:
        yield temp
        with storage_errors(dest.url):
            if verify is not None:
                verify(temp)
            if dest.is_local:
                _publish_local(temp, dest)
            else:
                _publish_remote(temp, dest)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            remove(temp)
        _remove_empty(created)
        _raise_for_dest(exc, temp.path, dest)
        raise


def _missing_folders(dest: Location) -> list[str]:
    """The local folders above ``dest`` that do not exist yet, deepest first: those its write
    creates, which a failed write removes again (:func:`_remove_empty`)."""
    missing: list[str] = []
    folder = os.path.dirname(dest.path.rstrip("/")) if dest.is_local else ""
    while folder and not os.path.exists(folder) and folder not in missing:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_empty(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a failed write leaves no folder
    it created, and never one that another writer has put something in since."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or already gone
            return


def refuse_unwritable(dest: Location) -> None:
    """Refuse a local ``dest`` that its write could not create, before any work is spent on
    it: the nearest folder that exists above it is not a folder, lies on a read-only file
    system, or is not this user's to write. The sentence is the one the write would end with
    (:func:`_raise_for_dest`); an object store is left to its write.

    >>> notes = tempfile.NamedTemporaryFile(suffix=".txt")
    >>> refuse_unwritable(locate(notes.name + "/scan.zarr"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stemlib.errors.InputError: /....txt/scan.zarr: Not a directory; check the path and ...
    >>> notes.close()
    """
    if not dest.is_local:
        return
    above = next(p for p in Path(dest.path).absolute().parents if p.exists())
    if not above.is_dir():
        reason = errno.ENOTDIR
    elif os.statvfs(above).f_flag & os.ST_RDONLY:
        reason = errno.EROFS
    elif not os.access(above, os.W_OK | os.X_OK):
        reason = errno.EACCES
    else:
        return
    raise InputError(cannot_write_sentence(dest.path, os.strerror(reason)))


def _raise_for_dest(exc: BaseException, temp: str, dest: Location) -> None:
    """Raise a local write's failure under the temporary ``temp`` (a folder that is a file,
    a read-only disk, a full one) as one sentence naming ``dest``, the path the user gave, not
    the hidden temporary one; return for any other failure. A full disk's error names no file
    (Zarr's writes report only the ``errno``)."""
    if not dest.is_local or not isinstance(exc, OSError) or isinstance(exc, StorageError):
        return
    if exc.errno in DISK_FULL:
        raise InputError(disk_full_sentence(dest.path)) from None
    if exc.strerror and str(exc.filename or "").startswith(temp):
        raise InputError(cannot_write_sentence(dest.path, exc.strerror)) from None


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write one local file whole or not at all: under a temporary sibling, renamed over
    ``path`` when the block succeeds.

    Parameters
    ----------
    path
        The local file; its folder is created. A file already there is replaced only at the
        rename, which is atomic: a reader, or a run killed at any moment, finds the old file or
        the new one, never part of one.

    Yields
    ------
    pathlib.Path
        The file to write, by name: it does not exist yet. It is :func:`temporary_sibling` of
        kind ``partial`` (``.<name>.partial-<table>-<pid>-<random>``); those that killed
        writers left beside ``path`` are removed first (:func:`remove_abandoned`).

    Notes
    -----
    The file is flushed to the disk (fsync) before the rename, so that a power cut after it
    cannot leave ``path`` empty. An exception in the block (or in the flush or rename) removes
    the temporary file and leaves ``path`` as it was.

    Examples
    --------
    >>> import pathlib, shutil, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "numbers.txt"
    >>> with staged_file(path) as temp:
    ...     _ = temp.write_text("1 2 3")
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())
    ('1 2 3', ['numbers.txt'])
    >>> shutil.rmtree(path.parent)
    """
    dest = locate(Path(path).absolute())
    created = _missing_folders(dest)
    os.makedirs(dest.parent.path, exist_ok=True)
    remove_abandoned(dest)
    temp = Path(temporary_sibling(dest, "partial").path)
    try:
        yield temp
        descriptor = os.open(temp, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temp, dest.path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        _remove_empty(created)
        _raise_for_dest(exc, str(temp), dest)
        raise


@contextlib.contextmanager
def temporary_folder(prefix: str) -> Iterator[str]:
    """A new local folder under ``TMPDIR`` (:func:`tempfile.gettempdir`), removed with all it
    holds when the block ends.

    Parameters
    ----------
    prefix
        The start of the folder's name, ``<prefix>-<table>-<pid>-<random>``
        (:func:`_temporary_name`). Folders of the same prefix that a killed process of this
        machine left (kill -9, out of memory) are removed first; those of running processes,
        of other machines (a shared ``TMPDIR``) or not named so are kept.

    Yields
    ------
    str
        The folder's path, readable and writable by this user only.
    """
    root = locate(tempfile.gettempdir())
    _remove_ended_writers(root, re.compile(re.escape(prefix) + "-" + _WRITER))
    folder = root.child(_temporary_name(prefix)).path
    os.mkdir(folder, 0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def work_folder(dest: str, workdir: str | None = None) -> Location:
    """Where a run keeps its intermediate results and checkpoints: ``workdir`` if given, else
    the hidden folder ``.<dest name>.work`` beside ``dest``.

    >>> work_folder("s3://bucket/runs/strain.zarr").url
    's3://bucket/runs/.strain.zarr.work'
    """
    if workdir:
        return locate(workdir)
    target = locate(dest)
    return target.sibling(f".{target.name}.work")


#: The :func:`temporary_folder` prefix of the CC-ST-AE's temporary work folders, which hold its
#: checkpoint (weights and optimizer state) and the rotation stage's result.
WORK_PREFIX = "ccstae-work"


@contextlib.contextmanager
def local_workdir(url: str) -> Iterator[str]:
    """A local folder for the CC-ST-AE's checkpoints: ``url`` itself when local; otherwise a
    temporary copy of it (:func:`temporary_folder`), copied back to ``url`` when the block ends
    (also on failure, so that a retry resumes from the last epoch)."""
    where = locate(url)
    if where.is_local:
        yield where.path
        return
    with temporary_folder(WORK_PREFIX) as folder:
        with storage_errors(url):
            if where.fs.isdir(where.path):
                for remote in where.fs.find(where.path):
                    where.fs.get_file(
                        remote, os.path.join(folder, os.path.relpath(remote, where.path))
                    )
        try:
            yield folder
        finally:
            with storage_errors(url):
                for parent, _, names in os.walk(folder):
                    for name in names:
                        local = os.path.join(parent, name)
                        relative = os.path.relpath(local, folder).replace(os.sep, "/")
                        where.fs.put_file(local, f"{where.path.rstrip('/')}/{relative}")
