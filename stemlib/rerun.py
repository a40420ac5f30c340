"""What a rerun skips: fingerprints of a strain run, recorded in the store it writes and read back
before the next run starts.

A strain store records ``run_keys``: per method, the fingerprint of the scan's content and
calibration and of every parameter that shapes the maps (:func:`run_key`). A run whose key a
store already holds is finished (:func:`finished_step`). Scan stores made by stemflow carry
their own recipe (:func:`stemlib.io.scan_store.finished_scan`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from pydantic import BaseModel

from .calibration import Calibration
from .io.scan_store import open_store_group, read_store_attrs
from .io.storage import locate
from .provenance import fingerprint
from .results import damaged_strain

__all__ = ["scan_identity", "store_identity", "run_key", "finished_step"]

log = logging.getLogger("stemlib.rerun")


def scan_identity(url: str) -> dict[str, Any] | None:
    """:func:`store_identity` of the scan store at ``url``, or None when ``url`` is not a
    finished scan store (e.g. a raw file)."""
    location = locate(url)
    attrs = read_store_attrs(location) if location.fs.isdir(location.path) else None
    if not attrs or not attrs.get("complete") or "content_sha256" not in attrs:
        return None
    return store_identity(attrs)


def store_identity(attrs: dict[str, Any]) -> dict[str, Any]:
    """What a rerun knows a scan store by, from its attributes: ``content_sha256`` (its
    patterns), ``calibration`` (:meth:`~stemlib.calibration.Calibration.to_attrs`: a store
    written again with another beam centre or scan rotation is another input), ``shape`` and
    ``source``."""
    return {
        "content_sha256": attrs["content_sha256"],
        "calibration": Calibration.from_attrs(attrs).to_attrs(),
        "shape": attrs.get("shape"),
        "source": attrs.get("source"),
    }


def _reference_identity(reference: str) -> str:
    """``reference`` as the key sees it: a mask file by its bytes (an edited mask at the same
    path is another run), anything else as written."""
    text = str(reference).strip()
    if not text.endswith(".npy"):
        return text
    location = locate(text)
    try:
        data = location.fs.cat_file(location.path)
    except OSError:  # parse_reference names the file and the fix when the run reads it
        return text
    return "mask sha256 " + hashlib.sha256(data).hexdigest()


def run_key(
    scan: dict[str, Any],
    method: str,
    *,
    reference: str,
    symmetry: Any = "auto",
    config: BaseModel | None = None,
) -> str:
    """Fingerprint of one method's run on a scan (:func:`scan_identity`): the scan's content
    hash and calibration, the method, the reference region (a mask file by its content), the
    symmetry and the method's whole configuration (resolved: pass the preset, not None)."""
    return fingerprint(
        {
            "scan": scan["content_sha256"],
            "calibration": scan["calibration"],
            "method": method,
            "parameters": {
                "reference": _reference_identity(reference),
                "symmetry": symmetry,
                "config": config.model_dump(mode="json") if config is not None else None,
            },
        }
    )


def finished_step(url: str, key: str) -> bool:
    """Whether the store at ``url`` is a finished result of the run with fingerprint ``key``:
    False where it lost blocks of its maps since it was written
    (:func:`stemlib.results.damaged_strain`), which is logged as a warning (the rerun writes it
    again)."""
    location = locate(url)
    group = open_store_group(location)  # None where no store is (one request for zarr.json)
    attrs = dict(group.attrs) if group is not None else None
    if not attrs or key not in (attrs.get("run_keys") or {}).values():
        return False
    damage = damaged_strain(location, attrs, group=group)  # its arrays: no second read
    if damage is not None:
        log.warning("%s; writing it again.", damage)
        return False
    return True
