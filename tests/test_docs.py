"""The documents a user of a fresh clone reads: everything they point to is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONVENTIONS = REPO / "docs" / "CONVENTIONS.md"


def test_the_readme_points_only_to_files_of_the_repository():
    """README's links and images, and the paths it quotes under docs/ and deployments/, exist in
    a clone: it named ../shared/CONVENTIONS.md, a folder beside the developers' checkout."""
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    targets += re.findall(r"`((?:docs|deployments|benchmarks)/[\w./-]*\w)`", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/CONVENTIONS.md" in local
    assert [t for t in local if not (REPO / t).exists()] == []
    assert "../shared" not in text


def test_the_conventions_that_code_and_help_cite_are_the_teams():
    """Docstrings and --help cite CONVENTIONS.md (its noise model, its axes): docs/CONVENTIONS.md
    is that file, word for word, where the team's copy is beside the checkout."""
    shared = REPO.parent / "shared" / "CONVENTIONS.md"
    if not shared.exists():
        pytest.skip("the team's shared folder is not beside this checkout")
    ours = CONVENTIONS.read_text().split("\n", 1)[1]  # below the line saying what it is
    assert ours == shared.read_text()
