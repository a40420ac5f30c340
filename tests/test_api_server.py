"""The temporary Prefect server of a command run on an existing Dask cluster: the command uses
it, and its address (127.0.0.1, this machine) is not sent to workers that may run on others.
How a local run uses it is tested end to end in test_cli_signals.py."""

from __future__ import annotations

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_API_URL,
    temporary_settings,
)

from flows.api_server import TemporaryServer, temporary_api
from stemlib.errors import InputError

from .conftest import closed_port


def test_on_an_existing_cluster_only_the_command_uses_the_server():
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # as without a server
        with temporary_api(tasks_here=False):
            assert PREFECT_API_URL.value() is None  # not sent with the tasks
            server = SubprocessASGIServer()  # what Prefect's client code asks for
            assert isinstance(server, TemporaryServer)
            process = psutil.Process(server.server_process.pid)
            with get_client(sync_client=True) as client:
                assert str(client.api_url).startswith(server.address)
                assert client.api_healthcheck() is None
        assert SubprocessASGIServer._instances.get(None) is not server
        process.wait(timeout=30)  # stopped with the block


def test_a_named_server_that_does_not_answer_is_one_sentence():
    """``PREFECT_API_URL`` naming a server that is down: Prefect's client raised "RuntimeError:
    Failed to reach API at ..." after 15 s, a traceback; a server that answers is used as is
    (also by its /health route's answer, whatever it is)."""
    url = f"http://127.0.0.1:{closed_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}), pytest.raises(InputError) as refused:
        with temporary_api():
            pass
    assert str(refused.value) == (
        f"the Prefect server that PREFECT_API_URL names, {url}, cannot be reached "
        "(ConnectError); start it (prefect server start), or unset PREFECT_API_URL to run "
        "against a temporary server of the command's own."
    )
    server = TemporaryServer()
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}), temporary_api():
            assert PREFECT_API_URL.value() == server.api_url  # used, no server of its own
    finally:
        server.stop()


def test_a_home_where_the_temporary_server_cannot_write_is_one_sentence(tmp_path):
    """A read-only, full or over-quota ``~/.prefect`` (a batch job's home): Prefect's server
    failed at start-up, was started again for two minutes with a traceback each time, then
    "Timed out while attempting to connect to ephemeral Prefect API server". Here the home lies
    inside a file, which no user can write either."""
    (tmp_path / "notes.txt").write_text("kept")
    home = tmp_path / "notes.txt" / "prefect"
    database = f"sqlite+aiosqlite:///{home}/prefect.db"  # PREFECT_HOME's, unless set apart
    with (
        temporary_settings(
            {PREFECT_API_DATABASE_CONNECTION_URL: database}, restore_defaults={PREFECT_API_URL}
        ),
        pytest.raises(InputError) as refused,
    ):
        with temporary_api():
            pass
    assert str(refused.value) == (
        f"Prefect's temporary server cannot write its database {home / 'prefect.db'} (Not a "
        "directory); set PREFECT_HOME to a folder you can write to (export "
        "PREFECT_HOME=/tmp/prefect, say), or PREFECT_API_URL to a running Prefect server."
    )
