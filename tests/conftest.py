"""Shared fixtures: Prefect's test harness, a real S3-compatible server, a dask compute counter."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# No network at run time, no windows: set before Prefect or matplotlib are imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test``: two processes) each process's torch runs on its share
    of the cores. Two processes of as many threads as cores each made the threads wait on each
    other: on 2 cores the demo-scan test took 281 s beside another file, against 100 s alone on
    both cores and 168 s alone on one."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if processes > 1:
        import torch

        from stemlib.resources import usable_cores

        torch.set_num_threads(max(1, usable_cores() // processes))


_share_the_cores()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's own test harness: a temporary database and API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server on 127.0.0.1 that checks credentials."""

    endpoint: str
    access_key: str
    secret_key: str


#: A Dask cluster inside the test's process, for runs that test a flow's own logic (what a rerun
#: skips, how a failed scan is reported): it spares each run the start of worker processes,
#: their imports (stemlib, torch, py4DSTEM: seconds each) and their stop. Worker processes run
#: the other flows of each module.
IN_PROCESS_CLUSTER = {
    "n_workers": 1,
    "threads_per_worker": 1,
    "processes": False,
    "dashboard_address": "127.0.0.1:0",  # None means Dask's default port, taken by another
}


@pytest.fixture
def in_process_cluster() -> Iterator[str]:
    """The scheduler address of a :data:`IN_PROCESS_CLUSTER` cluster, for ``dask_address``."""
    from distributed import LocalCluster

    with LocalCluster(**IN_PROCESS_CLUSTER) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real moto S3 server on 127.0.0.1 with authentication on (unknown keys are refused).

    One IAM user with full access is created in the server's backend; its key is what the
    ``s3`` fixture puts in the environment.
    """
    # moto reads this at import: every request must then carry a known access key.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
    iam.create_user(region_name="us-east-1", user_name="stemflow-test", path="/")
    key = iam.create_access_key("stemflow-test")
    policy = iam.create_policy(
        description="tests",
        path="/",
        policy_document=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
        policy_name="stemflow-test-all",
        tags=[],
    )
    iam.attach_user_policy(policy.arn, "stemflow-test")
    try:
        yield S3Server(f"http://{host}:{port}", key.access_key_id, key.secret_access_key)
    finally:
        server.stop()


def forget_s3_clients() -> None:
    """Close and forget s3fs's cached clients, so that the next one reads the environment.

    s3fs closes a synchronous client's session when the client is collected, but not an
    asynchronous one's (zarr's store opens those on its own event loop): closed here on that
    loop, or each would end the test run with an "Unclosed client session" warning.
    """
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if fs.asynchronous and creator is not None:
            sync(creator.__aexit__(None, None, None))
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh bucket on the test server, with its endpoint and key in the standard variables.

    Yields the bucket URL, ``s3://<bucket>``.
    """
    import boto3

    # Readable, and unique: a long name's first 40 characters may be its parametrizations' too
    readable = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")
    unique = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    bucket = f"stemflow-{readable[:40].strip('-.')}-{unique}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    forget_s3_clients()
    yield f"s3://{bucket}"
    forget_s3_clients()


def logged_requests(records: Iterable[logging.LogRecord]) -> list[str]:
    """The requests that the test server logged, each as ``"METHOD /bucket/key?query"``, in the
    order served: capture them with ``caplog.at_level(logging.INFO, logger="werkzeug")`` (and
    ``caplog.clear()`` first). The server logs a request before it answers it, so the list is
    whole when the call returns."""
    lines = (re.sub(r"\x1b\[[0-9;]*m", "", r.getMessage()) for r in records)  # 4xx in colour
    found = (re.search(r'"([A-Z]+ \S+) HTTP/', line) for line in lines)
    return [match.group(1) for match in found if match]


def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soft_edged_vacuum(scan: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """Patterns of the direct beam alone, (*scan, 64, 64) counts: radius 6 px with a 1 px soft
    (Fermi) edge, 1e5 electrons per pattern with shot noise. Most rings of its far tail hold no
    counts."""
    q = np.hypot(*np.indices((64, 64)) - 32.0)
    beam = 1.0 / (1.0 + np.exp((q - 6.0) / 1.0))
    expected = np.broadcast_to(beam * 1e5 / beam.sum(), (*scan, 64, 64))
    return np.random.default_rng(seed).poisson(expected)


#: Starts every writer's script: ``stop()``, called in the middle of a write, kills the writer
#: at once (``argv[-1] == "killed"``, kill -9: nothing is cleaned up) or holds on.
_STOP = textwrap.dedent(
    """\
    import os, posixpath, signal, sys, time
    def stop():
        if sys.argv[-1] == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    """
)

#: A temporary sibling of the store ``argv[1]``, of kind ``argv[2]``, as stemflow names them.
_STORE = textwrap.dedent(
    """\
    from stemlib.io.storage import locate, temporary_sibling
    temp = temporary_sibling(locate(sys.argv[1]), sys.argv[2])
    temp.fs.makedirs(temp.path, exist_ok=True)
    temp.fs.pipe(posixpath.join(temp.path, "zarr.json"), b"{}")
    print(temp.url, flush=True)
    stop()
    """
)

#: The file ``argv[1]``, half written through ``staged_file``.
_FILE = textwrap.dedent(
    """\
    from stemlib.io.storage import staged_file
    with staged_file(sys.argv[1]) as temp:
        temp.write_bytes(b"half a file")
        print(temp, flush=True)
        stop()
    """
)

#: A temporary folder under TMPDIR of prefix ``argv[1]`` (a CC-ST-AE work folder, a local copy of
#: a source), with half a file in it.
_TEMPORARY_FOLDER = textwrap.dedent(
    """\
    from stemlib.io.storage import temporary_folder
    with temporary_folder(sys.argv[1]) as folder:
        with open(os.path.join(folder, "half"), "wb") as f:
            f.write(b"half a file")
        print(folder, flush=True)
        stop()
    """
)


@contextlib.contextmanager
def _writer(script: str, *args: str, killed: bool) -> Iterator[str]:
    """A process of this machine that runs ``script`` with ``args`` (it prints the path of what
    it writes, then calls ``stop()`` before it has finished): killed by kill -9 there before the
    block, or running through it. Yields the path printed."""
    repo = str(Path(__file__).resolve().parents[1])
    process = subprocess.Popen(
        [sys.executable, "-c", _STOP + script, *args, "killed" if killed else "running"],
        stdout=subprocess.PIPE,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
    )
    try:
        path = process.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert path, "the writer failed"
        if killed:
            assert process.wait(timeout=60) == -signal.SIGKILL
        yield path
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def temporary_writer(
    dest: str, kind: str = "partial", *, killed: bool
) -> contextlib.AbstractContextManager[str]:
    """A process of this machine that has written a temporary sibling of ``dest`` (``kind``
    ``partial``: a store being written; ``old``: a store being replaced): killed by kill -9
    before the block, or running through it. Yields the sibling's URL."""
    return _writer(_STORE, dest, kind, killed=killed)


def file_writer(path: str, *, killed: bool) -> contextlib.AbstractContextManager[str]:
    """A process of this machine that has written half the file ``path`` through
    :func:`stemlib.io.storage.staged_file`: killed by kill -9 before the block, or running
    through it. Yields the path of its temporary file."""
    return _writer(_FILE, path, killed=killed)


def folder_writer(prefix: str, *, killed: bool) -> contextlib.AbstractContextManager[str]:
    """A process of this machine that works in a temporary folder of ``prefix`` under
    ``TMPDIR`` (:func:`stemlib.io.storage.temporary_folder`): killed by kill -9 before the
    block, or running through it. Yields the folder's path."""
    return _writer(_TEMPORARY_FOLDER, prefix, killed=killed)


@contextlib.contextmanager
def folders_of_writers(prefix: str, tmpdir: Path, others: list[str]) -> Iterator[list[str]]:
    """Temporary folders of ``prefix`` under ``tmpdir``: ``others`` (names that do not say their
    writer, or say another machine's), a running writer's and a killed writer's
    (:func:`folder_writer`). Yields the names that the next folder of ``prefix`` must leave,
    sorted; the running writer runs through the block."""
    for name in others:
        (tmpdir / name).mkdir()
    # the running writer first: the killed one's would otherwise be removed when it starts
    with (
        folder_writer(prefix, killed=False) as running,
        folder_writer(prefix, killed=True) as killed,
    ):
        assert os.path.dirname(killed) == str(tmpdir) and os.path.isdir(killed)
        yield sorted([*others, os.path.basename(running)])


@pytest.fixture
def own_tmpdir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``TMPDIR`` of the test's own, for this process and the processes it starts."""
    folder = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


class ComputeCounter:
    """Counts dask graph executions on the local schedulers (a ``raise_if_dask_computes``
    helper)."""

    def __init__(self) -> None:
        from dask.callbacks import Callback

        self.count = 0
        counter = self

        class _Count(Callback):
            def _start(self, dsk):  # noqa: ANN001 - dask's callback signature
                counter.count += 1

        self._callback = _Count()

    def __enter__(self) -> ComputeCounter:
        self._callback.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._callback.__exit__(*exc)


@pytest.fixture
def dask_computes() -> Iterator[ComputeCounter]:
    """Count dask computes inside the test: ``with dask_computes as c: ...;
    assert c.count == 0``."""
    yield ComputeCounter()
