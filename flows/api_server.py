"""One temporary Prefect API server for a command's flow runs, that never outlives the command.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server (a uvicorn subprocess of
about 220 MB) the first time a process needs one, and stops it at that process's exit. A
``stemflow run`` on a local Dask cluster then ran three: its own and one per Dask worker
process, because the workers did not learn its address. A worker ended by its Nanny, a
SIGTERM or a kill -9 left the servers it had started running, and a terminal's Ctrl-C, which
reaches the whole process group, stopped the command's own server before Prefect could record
the interrupted run (a minute of retries, then a traceback).

:func:`temporary_api` starts the one server of a command, hands its address to every task
through Prefect's settings (Dask workers included), and stops it when the command ends. The
server runs in a session of its own, out of reach of the terminal's Ctrl-C, and on Linux it
is ended by the kernel when the command dies, even by kill -9 (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_UI_URL,
    get_current_settings,
    temporary_settings,
)

from stemlib.errors import InputError
from stemlib.io.storage import redact

__all__ = ["TemporaryServer", "temporary_api"]

#: Seconds to wait for Prefect to send its pending logs, then its pending events, at the end.
DRAIN_TIMEOUT_S = 10

#: Runs uvicorn as ``python -m uvicorn`` does, after asking Linux to send it SIGTERM when the
#: process that started it dies (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, kept across exec); it
#: exits at once if that process died before the request was made. ``sys.argv[1]`` is that
#: process's PID, then come ``uvicorn`` and its arguments (as ``ps`` shows them).
_LAUNCH = """\
import ctypes, os, runpy, signal, sys
if sys.platform.startswith("linux"):
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(sys.argv[1]):
        sys.exit(0)
sys.argv = sys.argv[2:]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class TemporaryServer(SubprocessASGIServer):
    """Prefect's temporary API server (:class:`~prefect.server.api.server.SubprocessASGIServer`:
    same app, port choice, start-up wait and stop), with a subprocess that outlives no one.

    The uvicorn subprocess runs in a new session, so that a terminal's Ctrl-C reaches only the
    command, which records the interrupted run and then stops the server; on Linux it receives
    SIGTERM when the thread that started it dies, so a kill -9 of the command ends it too. Start
    it from the main thread.
    """

    #: Instances by port, apart from Prefect's own (which its client code looks up).
    _instances: dict[int | None, SubprocessASGIServer] = {}

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        """Start uvicorn as Prefect does (same arguments and environment) through
        :data:`_LAUNCH`, in a session of its own."""
        server_env = {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        return subprocess.Popen(
            args=[
                sys.executable,
                "-c",
                _LAUNCH,
                str(os.getpid()),
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                **server_env,
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            start_new_session=True,
        )


@contextlib.contextmanager
def temporary_api(*, tasks_here: bool = True) -> Iterator[None]:
    """Run the block against one :class:`TemporaryServer`, unless ``PREFECT_API_URL`` names a
    server already (then nothing starts). The server stops when the block ends, also on Ctrl-C
    or SIGTERM (raised as an exception in the main thread).

    Parameters
    ----------
    tasks_here
        Whether every task runs on this machine (a local Dask cluster, or one whose scheduler
        listens on loopback: :func:`flows.runners.workers_here`): the server's address
        is then set as ``PREFECT_API_URL`` for the block, and Prefect passes it with every task
        it submits, so that the Dask workers use this server instead of starting their own.
        Otherwise (an existing cluster, whose workers may run on other machines, where
        127.0.0.1 is not this one) only this process uses it, and each worker keeps Prefect's
        default: a temporary server of its own (set ``PREFECT_API_URL`` to a server they all
        reach to see their task runs in one place).
    """
    if PREFECT_API_URL.value():
        refuse_unreachable(PREFECT_API_URL.value())
        yield
        return
    refuse_unwritable_database()
    server = TemporaryServer()
    # Prefect's client code asks SubprocessASGIServer() for the default temporary server: it
    # gets this one (as in Prefect's own prefect_test_harness).
    default = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server
    try:
        server.start()
        # no UI is served: no "View at" link to it
        shared = {PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ""} if tasks_here else {}
        with temporary_settings(updates=shared):
            try:
                yield
            finally:
                _send_pending()
    finally:
        server.stop()
        if default is None:
            SubprocessASGIServer._instances.pop(None, None)
        else:
            SubprocessASGIServer._instances[None] = default


def refuse_unwritable_database() -> None:
    """Refuse to start a temporary server whose SQLite database (in ``PREFECT_HOME``, by
    default ``~/.prefect``) cannot be written: a read-only or full home, one over its quota,
    another user's. Prefect's server failed at start-up, was started again for two minutes with
    a traceback each time, then "Timed out while attempting to connect to ephemeral Prefect API
    server". A write of 64 KiB into the database's folder tells, whatever the cause.

    Raises
    ------
    InputError
        One sentence naming the database and the two ways out.
    """
    url = get_current_settings().server.database.connection_url.get_secret_value()
    if not url.startswith("sqlite") or ":memory:" in url:
        return
    database = Path(url.split(":///", 1)[1].split("?", 1)[0])
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=database.parent) as probe:
            probe.write(bytes(2**16))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise InputError(
            f"Prefect's temporary server cannot write its database {database} ({exc.strerror}); "
            "set PREFECT_HOME to a folder you can write to (export PREFECT_HOME=/tmp/prefect, "
            "say), or PREFECT_API_URL to a running Prefect server."
        ) from None


#: Seconds to wait for the server that ``PREFECT_API_URL`` names to answer at all.
REACH_TIMEOUT_S = 10


def refuse_unreachable(api_url: str) -> None:
    """Refuse a Prefect server that does not answer at ``api_url`` (nothing listens, no such
    host, no answer within :data:`REACH_TIMEOUT_S`): Prefect's client raised "RuntimeError:
    Failed to reach API at ..." after 15 s, with a traceback. Any HTTP answer passes (a server
    that wants credentials says so itself).

    Raises
    ------
    InputError
        One sentence naming the URL and the two ways out.
    """
    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=REACH_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise InputError(
            f"the Prefect server that PREFECT_API_URL names, {redact(api_url)}, cannot be "
            f"reached ({type(exc).__name__}); start it (prefect server start), or unset "
            "PREFECT_API_URL to run against a temporary server of the command's own."
        ) from None


def _send_pending() -> None:
    """Send the logs and events Prefect still holds to the server (within
    :data:`DRAIN_TIMEOUT_S` each) while it runs: after it stops, each would be retried for a
    minute at exit."""
    APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
