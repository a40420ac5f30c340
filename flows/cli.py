"""The ``stemflow`` command line.

Each subcommand lives in its own module under :mod:`flows.commands` with a ``register``
function. A user's mistake (:class:`stemlib.errors.StemflowError`) is printed as one sentence on
stderr with exit status 2 and no traceback; Ctrl-C exits with 130 and SIGTERM with 143, each
with one sentence, publishing nothing and leaving no process behind (the temporary Prefect
server, the Dask workers and a store's temporary folder are cleaned up as on any error).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

from pydantic import ValidationError

from flows.log_filters import no_tracebacks_for_mistakes, quiet_cluster_close
from stemlib.config_file import validation_sentence
from stemlib.errors import StemflowError
from stemlib.io.storage import DISK_FULL, cannot_write_sentence
from stemlib.provenance import software_versions

__all__ = ["main", "build_parser", "quiet_resource_tracker", "patient_zarr_exit"]

#: Subcommand modules, in the order ``stemflow --help`` lists them.
COMMANDS = ("run", "demo", "reprocess", "ingest", "simulate", "noise", "strain", "sweep")


#: The ``-W`` option that silences the resource tracker's report of leaked semaphores.
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
    """Keep multiprocessing's resource tracker from reporting, after the command's last line,
    the semaphores of a Dask worker killed as a run stopped ("There appear to be 1 leaked
    semaphore objects"): nothing a user can act on. The tracker is a process of its own, started
    with this interpreter's ``-W`` options, so the option goes there."""
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)


#: Seconds zarr's I/O thread gets to finish at exit (zarr itself waits 0.2 s).
ZARR_EXIT_S = 10.0


def _close_zarr_loop() -> None:
    """zarr's exit hook, given time: zarr waits 0.2 s for its I/O thread, then closes the event
    loop, and where a run stopped mid-write left the thread busy (a loaded machine), that
    raised "Cannot close a running event loop" with a traceback after the command's last line.
    A thread still busy after :data:`ZARR_EXIT_S` ends with the process (a daemon)."""
    from zarr.core import sync

    loop, thread = sync.loop[0], sync.iothread[0]
    if loop is not None and thread is not None and thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=ZARR_EXIT_S)
        if thread.is_alive():
            return
    sync.cleanup_resources()


def patient_zarr_exit() -> None:
    """Replace zarr's exit hook by :func:`_close_zarr_loop` (once), where zarr has the hook and
    the loop it closes (zarr 3.0-3.1; another zarr keeps its own)."""
    from zarr.core import sync

    if not all(hasattr(sync, name) for name in ("cleanup_resources", "loop", "iothread")):
        return
    atexit.unregister(sync.cleanup_resources)
    atexit.unregister(_close_zarr_loop)
    atexit.register(_close_zarr_loop)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the command cleans up as on Ctrl-C (a
    ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block (in the main thread only, where Python
    runs signal handlers); the previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminations() -> tuple[type[BaseException], ...]:
    """What SIGTERM raises: :class:`Terminated`, or Prefect's ``TerminationSignal`` while a flow
    runs (Prefect installs its own handler then; it is imported only by commands that run
    flows)."""
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is None:
        return (Terminated,)
    return (Terminated, prefect_exceptions.TerminationSignal)


def _stopped_by(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM that ``exc`` was raised while handling, or None: a clean-up that
    failed as the command stopped is the stop (on a loaded machine a Dask worker can take longer
    to exit than its nanny waits, whose ``TimeoutError`` then replaced the ``KeyboardInterrupt``
    and printed a traceback)."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, (KeyboardInterrupt, *_terminations())):
            return seen
        seen = seen.__context__
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemflow",
        description="4D-STEM scans to strain, shear and rotation maps (CC-ST-AE and py4DSTEM).",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=_versions(),
        help="show stemflow's version and those of the libraries that shape a result, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    return parser


def _versions() -> str:
    """``stemflow 0.1.0 (numpy 2.3.4, ...)``: what a result's ``software`` attribute records."""
    versions = software_versions()
    stemflow = versions.pop("stemflow", "(not installed)")
    libraries = ", ".join(f"{name} {version}" for name, version in versions.items())
    return f"stemflow {stemflow} ({libraries})"


class _Stderr(logging.Handler):
    """Each record as one line on the ``sys.stderr`` of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


#: Shows stemlib's warnings (a reference region that looks strained, an ellipse not measured)
#: on stderr, each as one line like the errors.
_WARNINGS = _Stderr(logging.WARNING)


def _show_warnings(command: str) -> None:
    """Print stemlib's warnings as ``stemflow COMMAND: warning: ...`` on stderr."""
    _WARNINGS.setFormatter(logging.Formatter(f"stemflow {command}: warning: %(message)s"))
    logger = logging.getLogger("stemlib")
    if _WARNINGS not in logger.handlers:
        logger.addHandler(_WARNINGS)
    logger.propagate = False  # once, not again through a handler of the root logger


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Prefect's temporary server gets 20 s to start; a loaded machine needed more
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    quiet_resource_tracker()
    patient_zarr_exit()
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_warnings(args.command)
    no_tracebacks_for_mistakes()
    quiet_cluster_close()
    try:
        try:
            with _sigterm_raises():
                status = int(args.run(args) or 0)
            sys.stdout.flush()  # a reader that left (| head) shows here, not at exit
            return status
        except Exception as exc:
            stop = _stopped_by(exc)
            if stop is None:
                raise
            raise stop from None
    except StemflowError as exc:
        print(f"stemflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        sentence = validation_sentence(exc)
        print(
            f"stemflow {args.command}: error: {sentence}; correct it and run again.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"stemflow {args.command}: interrupted; nothing was published.", file=sys.stderr)
        return 130
    except _terminations():
        print(f"stemflow {args.command}: terminated; nothing was published.", file=sys.stderr)
        return 143
    except MemoryError as exc:  # numpy: "Unable to allocate 7.28 TiB for an array with ..."
        print(
            f"stemflow {args.command}: error: this machine has not enough memory for it "
            f"({str(exc).rstrip('.') or 'MemoryError'}); use a smaller scan, or a machine with "
            "more memory.",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # `stemflow ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a local path that cannot be written: not a folder, disk full, ...
        if exc.filename is None and exc.errno in DISK_FULL:  # a write that names no file
            print(
                f"stemflow {args.command}: error: a disk it writes to is full ({exc.strerror}): "
                f"its destination's, or TMPDIR's ({tempfile.gettempdir()}); free space there, "
                "or write to another disk.",
                file=sys.stderr,
            )
            return 2
        if exc.filename is None:
            raise
        print(
            f"stemflow {args.command}: error: {cannot_write_sentence(exc.filename, exc.strerror)}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
