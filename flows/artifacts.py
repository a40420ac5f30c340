"""Names of a scan in the flows' runs, and keys of the artifacts they publish about it.

Prefect's Artifacts page lists one entry per key, holding every version of it. A key per scan
gives each scan its own history there (each rerun a version); one key shared by every scan
would show them as one artifact whose latest version is whichever scan finished last.
"""

from __future__ import annotations

import posixpath
import re

__all__ = ["artifact_key", "file_name"]


def file_name(source: str) -> str:
    """The name a run gives its scan: the file name of ``source`` (a path or URL).

    >>> file_name("s3://raw/2026/scan_042.mib"), file_name("/data/scan.zarr/")
    ('scan_042.mib', 'scan.zarr')
    """
    return posixpath.basename(source.rstrip("/")) or "scan"


def artifact_key(kind: str, name: str) -> str:
    """The key of the ``kind`` artifact of scan ``name`` (its file name, or its path below a
    facility root): lowercase letters, digits and dashes, as Prefect requires of a key.

    Examples
    --------
    >>> artifact_key("strain", "day1/Scan_042.mib")
    'strain-day1-scan-042-mib'
    """
    return f"{kind}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'scan'}"
