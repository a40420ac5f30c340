"""The ``stemflow`` command as a whole (each command is tested in its own module)."""

from __future__ import annotations

import errno
import tempfile
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


def test_a_full_disk_that_names_no_file_is_one_sentence(monkeypatch, capsys):
    """A write whose ``OSError`` names no file (a file object's ``write``, as Zarr's and
    PyTorch's writers report a full disk) got a traceback: it says which disks to look at."""
    import flows.commands.noise as noise

    def fills_the_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(noise, "_run", fills_the_disk)
    assert main(["noise", "in.zarr", "out.zarr", "--background", "0.5"]) == 2
    assert capsys.readouterr().err == (
        "stemflow noise: error: a disk it writes to is full (No space left on device): its "
        f"destination's, or TMPDIR's ({tempfile.gettempdir()}); free space there, or write to "
        "another disk.\n"
    )


#: A process whose zarr I/O thread is still busy as it exits, as a run stopped mid-write
#: leaves it on a loaded machine; ``patient`` as its first argument installs the command's hook.
_BUSY_AT_EXIT = """
import asyncio, sys, time
from zarr.core import sync
if sys.argv[1:] == ["patient"]:
    from flows.cli import patient_zarr_exit
    patient_zarr_exit()
async def busy():
    time.sleep(1.0)
asyncio.run_coroutine_threadsafe(busy(), sync._get_loop())
time.sleep(0.1)
"""


@pytest.mark.parametrize("hook", ["zarr", "patient"])
def test_a_busy_zarr_thread_at_exit_prints_no_traceback(hook):
    """Regression: a SIGTERM run in a fresh clone's test suite ended with zarr's exit hook's
    traceback ("Cannot close a running event loop": zarr waits 0.2 s for its I/O thread). The
    command's hook waits for the thread; zarr's own still fails, which shows the test can."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _BUSY_AT_EXIT, hook],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert done.returncode == 0
    failed = "Cannot close a running event loop" in done.stderr
    assert failed == (hook == "zarr"), done.stderr
