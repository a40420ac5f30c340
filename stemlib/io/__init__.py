"""Input and output: raw-scan readers, Zarr scan stores and storage locations."""

from __future__ import annotations

from .readers import FORMATS, ReadOptions, SourceScan, open_source, supported_formats
from .scan_store import StoreLayout, choose_layout, open_scan, write_scan
from .storage import Location, locate, redact, staged, storage_errors

__all__ = [
    "FORMATS",
    "Location",
    "ReadOptions",
    "SourceScan",
    "StoreLayout",
    "choose_layout",
    "locate",
    "open_scan",
    "open_source",
    "redact",
    "staged",
    "storage_errors",
    "supported_formats",
    "write_scan",
]
