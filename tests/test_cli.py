"""The ``stemflow`` command as a whole (each command is tested in its own module)."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

from flows.cli import Terminated, main


def test_version_names_stemflow_and_the_libraries_a_result_records(capsys):
    """What a facility writes in a ticket: stemflow's version and those that a result's
    ``software`` attribute records."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps it to the terminal
    assert out.startswith(f"stemflow {metadata.version('stemflow')} (numpy {np.__version__}, ")
    assert f"py4DSTEM {metadata.version('py4DSTEM')}, torch {torch.__version__})" in out


@pytest.mark.parametrize(
    ("stop", "status", "word"),
    [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")],
)
def test_a_clean_up_that_fails_as_the_command_stops_is_the_stop(
    stop, status, word, monkeypatch, capsys
):
    """Seen on a loaded machine: Ctrl-C reached ``stemflow run`` while its Dask cluster ran, and
    closing the cluster raised distributed's ``TimeoutError`` (a worker took longer to exit
    than its nanny waits), which replaced the ``KeyboardInterrupt``: a traceback and exit 1.
    A command that fails so is stopped: its sentence and its status, no traceback."""
    import flows.commands.noise as noise

    def stops_and_its_clean_up_fails(args):
        try:
            raise stop
        finally:
            raise TimeoutError  # noqa: B012 - what the cluster's close raised in its finally

    monkeypatch.setattr(noise, "_run", stops_and_its_clean_up_fails)
    assert main(["noise", "in.zarr", "out.zarr", "--background", "0.5"]) == status
    err = capsys.readouterr().err
    assert err == f"stemflow noise: {word}; nothing was published.\n"
    monkeypatch.setattr(noise, "_run", lambda args: (_ for _ in ()).throw(TimeoutError("slow")))
    with pytest.raises(TimeoutError, match="slow"):  # without a stop, an error is not one
        main(["noise", "in.zarr", "out.zarr", "--background", "0.5"])
