"""``stemflow run`` stopped by Ctrl-C, SIGTERM, kill -9 or a mistake in its input leaves no
process behind (user audit: Ctrl-C left one temporary Prefect server of about 220 MB running,
SIGTERM and kill -9 up to three, one per process that had started its own), and a mistake reads
as one sentence (before, Prefect's traceback of the failed flow came first).

The command runs in a subprocess of its own session, as from a terminal, against Prefect's
temporary API server and a local Dask cluster; it is stopped while the py4DSTEM task runs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import pytest

from stemlib.calibration import Calibration
from stemlib.io.scan_store import write_scan
from stemlib.simulate import SimulationConfig, write_simulation

REPO = Path(__file__).resolve().parents[1]
#: Seconds to wait for the command to reach the py4DSTEM task, then for its processes to end.
STARTUP_S, SHUTDOWN_S = 240, 60
#: In a process's command line: Prefect's API server.
SERVER = "prefect.server.api.server:create_app"


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    """A scan store whose py4DSTEM step runs for some seconds on a local cluster."""
    store = str(tmp_path_factory.mktemp("scan") / "scan.zarr")
    write_simulation(SimulationConfig(scan=(12, 12), pattern=64, grains=3, seed=5), store)
    return store


def _start(scan: str, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """``stemflow run`` (this checkout's code) in a new session, its output in ``log``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect"),  # not the user's database
    }
    env.pop("PREFECT_API_URL", None)  # Prefect starts its temporary server
    command = [sys.executable, "-m", "flows.cli", "run", scan, str(tmp_path / "strain.zarr")]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--method", "py4dstem"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_as_from_a_terminal,
        )


def _as_from_a_terminal() -> None:
    """Ctrl-C acts on the command as on one a terminal starts. A test run started as a
    background job of a script (``make test &``) ignores SIGINT, and so would every process it
    starts: the command's Ctrl-C run then finished its work and exited 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Tree:
    """Every process that descended from ``root`` while :meth:`look` was called, with its last
    command line seen (a child shows its parent's until it runs its own program; an exiting
    process shows an empty one, which does not replace what it ran)."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.processes: dict[int, psutil.Process] = {}
        self.command_lines: dict[int, str] = {}

    def look(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            process = self.processes.setdefault(child.pid, child)
            with contextlib.suppress(psutil.Error):
                if line := " ".join(process.cmdline()):
                    self.command_lines[child.pid] = line

    def running(self, timeout_s: float) -> list[str]:
        """The command lines of those still running after up to ``timeout_s``."""
        _, alive = psutil.wait_procs(list(self.processes.values()), timeout=timeout_s)
        return [self.command_lines.get(p.pid, str(p.pid)) for p in alive if _running(p)]

    def kill(self) -> None:
        for process in [self.root, *self.processes.values()]:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


#: How each run is stopped: the exit status and last line it must end with.
STOPS = {
    "ctrl-c": (130, "stemflow run: interrupted; nothing was published."),
    "sigterm": (143, "stemflow run: terminated; nothing was published."),
    "kill -9": (-signal.SIGKILL, None),
}


def _stop(command: subprocess.Popen[bytes], how: str) -> None:
    if how == "ctrl-c":  # a terminal sends SIGINT to its foreground process group
        os.killpg(command.pid, signal.SIGINT)
    else:
        command.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)


@pytest.fixture(scope="module")
def vacuum(tmp_path_factory) -> str:
    """A scan store of the direct beam alone: the py4DSTEM task fails on it, a user's mistake."""
    q = np.hypot(*np.indices((64, 64)) - 32.0)
    beam = (1.0 / (1.0 + np.exp((q - 3.0) / 0.3))).astype(np.float32)
    store = str(tmp_path_factory.mktemp("vacuum") / "vacuum.zarr")
    data = da.from_array(np.broadcast_to(beam, (8, 8, 64, 64)).copy())
    write_scan(data, store, calibration=Calibration())
    return store


@pytest.mark.slow
def test_a_stopped_run_leaves_no_process_behind(scan, vacuum, tmp_path):
    """Four runs side by side (their start-up is most of the time): three stopped in their own
    way once they have reached their tasks, one ended by its task's refusal of a scan without
    Bragg disks, which the command tells in its one sentence, without Prefect's traceback."""
    runs = {}
    for how in [*STOPS, "mistake"]:
        folder = tmp_path / how.replace(" ", "")
        folder.mkdir()
        command = _start(vacuum if how == "mistake" else scan, folder, folder / "output.txt")
        runs[how] = (folder, command, _Tree(command.pid))
    try:
        deadline = time.monotonic() + STARTUP_S
        waiting = {how: run for how, run in runs.items() if how != "mistake"}
        mistake = runs["mistake"][1]
        while waiting or mistake.poll() is None:
            runs["mistake"][2].look()
            for how, (folder, command, tree) in list(waiting.items()):
                tree.look()
                output = (folder / "output.txt").read_text(errors="replace")
                assert command.poll() is None, output
                if "Task run 'resolve-scan" in output:
                    time.sleep(1.0)  # the py4DSTEM task starts on a worker
                    tree.look()
                    _stop(command, how)
                    del waiting[how]
            assert time.monotonic() < deadline, f"{list(waiting)} did not reach their tasks"
            time.sleep(0.2)
        ended = {how: command.wait(timeout=STARTUP_S) for how, (_, command, _) in runs.items()}
        survivors = {how: tree.running(timeout_s=SHUTDOWN_S) for how, (*_, tree) in runs.items()}
    finally:
        for *_, tree in runs.values():
            tree.kill()  # never leave them to the next test
    mistake = f"stemflow run: error: {vacuum} shows a lattice of Bragg disks above the noise in 0"
    for how, (folder, _, tree) in runs.items():
        status, sentence = STOPS.get(how, (2, mistake))
        output = (folder / "output.txt").read_text(errors="replace")
        assert ended[how] == status, (how, output[-3000:])  # what the run printed, if not
        # One server, by its port: a process it forks (to run lscpu) shows its command line
        # until it runs its own program, and is no second server.
        servers = {
            re.search(r"--port (\d+)", line).group(1)  # type: ignore[union-attr]
            for line in tree.command_lines.values()
            if SERVER in line
        }
        seen = sorted(tree.command_lines.values())
        assert len(servers) == 1, f"{how}: servers on ports {servers} among {seen}; {output}"
        assert survivors[how] == [], how
        if sentence is not None:
            assert output.rstrip().splitlines()[-1].startswith(sentence), how
            assert "KeyboardInterrupt" not in output and "TerminationSignal" not in output
            assert "Traceback" not in output, how
        assert not (folder / "strain.zarr").exists()


#: A process that exits without releasing a semaphore, as a Dask worker killed on Ctrl-C does.
_LEAK = (
    "import multiprocessing, os\n"
    "{quiet}\n"
    "lock = multiprocessing.get_context('spawn').Semaphore()\n"
    "os._exit(0)\n"
)


@pytest.mark.parametrize("quiet", [False, True])
def test_the_resource_tracker_says_nothing_after_the_last_line(quiet):
    """A run stopped while CC-ST-AE trained ended with multiprocessing's resource tracker's
    "There appear to be 1 leaked semaphore objects" warning, after "interrupted; nothing was
    published.": its process takes this interpreter's -W options, which the command sets."""
    setup = "from flows.cli import quiet_resource_tracker; quiet_resource_tracker()"
    script = _LEAK.format(quiet=setup if quiet else "")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert ("leaked semaphore" in done.stderr) is not quiet, done.stderr


def test_a_closing_worker_does_not_report_each_task_it_cancelled(caplog):
    """Ctrl-C printed a Dask worker's "Async instruction for <Task cancelled name=...> ended
    with CancelledError" among the command's lines; the local cluster's workers filter it
    (flows.dask_preload), and nothing else of that logger."""

    from flows.log_filters import quiet_worker_close

    logger = logging.getLogger("distributed.worker.state_machine")
    before = list(logger.filters)
    try:
        quiet_worker_close()
        quiet_worker_close()  # once is enough
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning(
                "Async instruction for <Task cancelled name='x'> ended with CancelledError"
            )
            logger.warning("Unhandled exception in async instruction for <Task>")
        assert caplog.messages == ["Unhandled exception in async instruction for <Task>"]
    finally:
        logger.filters[:] = before


#: A local cluster whose scheduler stops listening before the cluster closes, as the command's
#: does on Ctrl-C: a worker's heartbeat meanwhile cannot reach it. On a loaded machine the
#: cluster's own close may not reach its scheduler either (a timeout, and tornado's traceback, in
#: this process): that is the script's, not the worker's under test, and is left unsaid.
_LOST = (
    "import logging, time\n"
    "from distributed import LocalCluster\n"
    "from flows.runners import local_cluster_kwargs\n"
    "if __name__ == '__main__':\n"
    "    logging.getLogger('tornado.application').disabled = True\n"
    "    kwargs = {{**local_cluster_kwargs(1), 'preload': {preload}}}\n"
    "    try:\n"
    "        with LocalCluster(**kwargs) as cluster:\n"
    "            for listener in cluster.scheduler.listeners:\n"
    "                cluster.loop.add_callback(listener.stop)\n"
    "            time.sleep(2)  # heartbeats every 0.5 s\n"
    "    except OSError:\n"
    "        pass\n"
)


@pytest.mark.parametrize("preload", [[], ["flows.dask_preload"]])
def test_a_closing_worker_does_not_report_the_scheduler_it_lost(preload, tmp_path):
    """Ctrl-C once printed a Dask worker's "Failed to communicate with scheduler during
    heartbeat." and 40 lines of traceback before the command's last sentence: the local
    cluster's scheduler, in the command's process, had stopped listening first. The cluster's
    workers filter it (flows.dask_preload); without the preload, the same cluster shows it."""
    script = tmp_path / "lost.py"  # run as a file: workers import their parent's main module
    script.write_text(_LOST.format(preload=preload))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    reported = "Failed to communicate with scheduler during heartbeat" in done.stderr
    assert reported is not bool(preload), done.stderr
    assert ("Traceback" in done.stderr) is not bool(preload), done.stderr


class _Kept(logging.Handler):
    """The records a logger passed on."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_local_cluster_closes_without_reporting_the_workers_it_killed():
    """A good run on a busy machine ended with distributed's "Worker process still alive after
    4.0 seconds, killing" once per worker, and a run stopped by Ctrl-C always did: a Nanny kills
    a worker that takes over 4 s to exit. The command's process filters that line (flows.cli),
    and nothing else of the Nanny's logger. A real local cluster, whose worker takes 6 s to
    exit."""
    from distributed import Client

    from flows.log_filters import quiet_cluster_close
    from flows.runners import local_cluster

    logger = logging.getLogger("distributed.nanny")
    original, kept = list(logger.filters), _Kept()
    before = [f for f in original if type(f).__name__ != "_NotKilledOnClose"]  # main() ran
    logger.filters[:] = before
    logger.addHandler(kept)
    try:
        quiet_cluster_close()
        quiet_cluster_close()  # once is enough
        assert len(logger.filters) == len(before) + 1
        with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
            (pid,) = client.run(os.getpid).values()
            client.run(atexit.register, time.sleep, 6)  # the worker's exit takes 6 s
        logger.warning("Nanny failed to start process")
    finally:
        logger.removeHandler(kept)
        logger.filters[:] = original
    assert not psutil.pid_exists(pid)  # killed
    warnings = [r.getMessage() for r in kept.records if r.levelno >= logging.WARNING]
    assert warnings == ["Nanny failed to start process"]
