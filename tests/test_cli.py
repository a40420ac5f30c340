"""The ``stemflow`` command as a whole (each command is tested in its own module)."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

from flows.cli import main


def test_version_names_stemflow_and_the_libraries_a_result_records(capsys):
    """What a facility writes in a ticket: stemflow's version and those that a result's
    ``software`` attribute records."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps it to the terminal
    assert out.startswith(f"stemflow {metadata.version('stemflow')} (numpy {np.__version__}, ")
    assert f"py4DSTEM {metadata.version('py4DSTEM')}, torch {torch.__version__})" in out
