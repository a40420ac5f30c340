"""The temporary Prefect server of a command run on an existing Dask cluster: the command uses
it, and its address (127.0.0.1, this machine) is not sent to workers that may run on others.
How a local run uses it is tested end to end in test_cli_signals.py."""

from __future__ import annotations

import psutil
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.api_server import TemporaryServer, temporary_api


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
