"""Where the benchmarks leave their tables: ``benchmarks/results/<name>.{md,json}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def save_results(name: str, markdown: str, record: dict[str, Any]) -> Path:
    """Write the table as ``<name>.md`` and the figures as ``<name>.json`` (values JSON cannot
    hold as text); returns the markdown file's path."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path
