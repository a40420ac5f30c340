"""Provenance: software versions, timestamps and stable fingerprints of inputs and parameters."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib import metadata
from typing import Any

__all__ = ["software_versions", "utc_now", "fingerprint", "input_provenance"]

_PACKAGES = (
    "stemflow",
    "numpy",
    "dask",
    "xarray",
    "zarr",
    "h5py",
    "rosettasciio",
    "py4DSTEM",
    "torch",
)


def software_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a result (absent ones are left out)."""
    versions: dict[str, str] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, to the second."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def fingerprint(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (sorted keys).

    Examples
    --------
    >>> fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def input_provenance(scan: Any) -> dict[str, Any]:
    """What every strain result records of its making, whatever the method: the scan's
    ``source`` and content hash (``input_content_sha256``: its store's, for the store's patterns
    as read, :func:`stemlib.scan.stored_content`; else None), the software versions and the
    time."""
    from .scan import stored_content

    attrs = getattr(scan, "attrs", None) or {}
    return {
        "source": str(attrs.get("source") or "the scan"),
        "input_content_sha256": stored_content(scan),
        "software": software_versions(),
        "created": utc_now(),
    }
