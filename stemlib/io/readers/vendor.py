"""Vendor formats read lazily through rosettasciio (filled in by the vendor-reader work)."""

from __future__ import annotations

from .base import Format

__all__ = ["VENDOR_FORMATS"]

VENDOR_FORMATS: list[Format] = []
