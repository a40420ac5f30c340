"""Screenshot of the process-scan deployment's run form in the Prefect UI.

Starts a local ``prefect server start`` (temporary PREFECT_HOME, a free port, the UI on),
registers the deployments of ``deployments/prefect.yaml`` on a process work pool exactly as that
file's header says, and captures the deployment's custom-run form with headless Chromium to
``docs/process-scan-form.png``::

    .venv/bin/python docs/screenshot_form.py [--out docs/process-scan-form.png]

The server is stopped at the end. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import html
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "process-scan/process-scan"  # flow name / deployment name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect(*args: str, env: dict[str, str]) -> None:
    """Run the ``prefect`` command line in the repository root; exit with its output on failure."""
    command = [sys.executable, "-m", "prefect", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        sys.exit(f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:``port``, once its API answers and it serves the UI."""
    command = [sys.executable, "-m", "prefect", "server", "start", "--no-services"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:  # the child keeps its own copy of the file descriptor
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"prefect server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        server.kill()
        sys.exit(f"prefect server did not start within 180 s:\n{log.read_text()}")
    page = httpx.get(f"{base}/", timeout=10)
    if page.status_code != 200 or "<!DOCTYPE html>" not in page.text[:200]:
        server.terminate()
        sys.exit(f"the server does not serve the UI at {base}/ (status {page.status_code})")
    return server


def chromium(
    url: str, action: str, *, executable: str, size: str, budget_ms: int, profile: Path
) -> str:
    """Run headless Chromium once on ``url``; ``action`` is ``--dump-dom`` or ``--screenshot=PATH``.

    The virtual-time budget lets the single-page app fetch the deployment and render its form
    before the page is dumped or captured.
    """
    command = [
        executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
        "--force-device-scale-factor=1", f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}", action, url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode:
        sys.exit(f"chromium {action} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "process-scan-form.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--size", default="1400,1800", help="window WIDTH,HEIGHT in px")
    parser.add_argument(
        "--budget", type=int, default=15000, help="virtual-time budget for the page, ms"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="stemflow-screenshot-") as tmp:
        tmp = Path(tmp)
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.endswith("AUTH_STRING")}
        env.update(
            PREFECT_HOME=str(tmp / "prefect-home"),
            PREFECT_API_URL=api,
            PREFECT_UI_API_URL=api,  # else the UI calls the default port 4200
            PREFECT_SERVER_UI_ENABLED="true",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        server = start_server(port, env, tmp / "server.log")
        try:
            prefect("work-pool", "create", "stemflow-process", "--type", "process", env=env)
            prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml",
                    env=env)  # fmt: skip
            deployment = (
                httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10)
                .raise_for_status()
                .json()
            )
            # The V2 UI is Prefect 3.8's default; its custom-run form of a deployment.
            url = f"http://127.0.0.1:{port}/v2/deployments/deployment/{deployment['id']}/run"
            browser = dict(executable=args.chromium, size=args.size, budget_ms=args.budget)
            # First check that the form renders within the budget: every parameter's description
            # is on the page (not a loading or error page), then capture it.
            dom = chromium(url, "--dump-dom", profile=tmp / "chromium-dom", **browser)
            fields = deployment["parameter_openapi_schema"]["properties"]
            missing = [
                name
                for name, field in fields.items()
                if html.escape(field["description"], quote=False) not in dom
            ]
            if missing:
                sys.exit(
                    f"the form at {url} did not render within {args.budget} ms (missing fields "
                    f"{missing}): raise --budget"
                )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.unlink(missing_ok=True)
            chromium(url, f"--screenshot={args.out}", profile=tmp / "chromium", **browser)
            if not args.out.is_file():
                sys.exit(f"chromium wrote no screenshot to {args.out}")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    main()
