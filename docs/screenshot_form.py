"""Screenshot of the process-scan deployment's run form in the Prefect UI.

Starts a local ``prefect server start`` (temporary PREFECT_HOME, a free port, the UI on),
registers the deployments of ``deployments/prefect.yaml`` on a process work pool exactly as that
file's header says, and captures the deployment's custom-run form with headless Chromium (over
the DevTools protocol) to ``docs/process-scan-form.png``::

    .venv/bin/python docs/screenshot_form.py [--chromium PATH] [--out docs/process-scan-form.png]

Any Chromium or Chrome build serves. Where none is installed, the npm registry has one: the
headless build in the package ``@sparticuz/chromium`` (``npm pack @sparticuz/chromium``; its
``bin/chromium.br`` is the executable, brotli-compressed; ``bin/al2023.tar.br`` holds the NSS
libraries for a system without them).

The server is stopped at the end. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

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


class Chromium:
    """Headless Chromium driven over the DevTools protocol on 127.0.0.1: the npm build hangs on
    the one-shot ``--dump-dom`` and ``--screenshot`` flags, every build answers the protocol."""

    def __init__(self, executable: str, profile: Path, width: int, height: int) -> None:
        command = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank",
        ]  # fmt: skip
        log = profile.with_suffix(".log")
        with log.open("w") as out:  # the child keeps its own copy of the file descriptor
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not port_file.is_file() or len(port_file.read_text().splitlines()) < 2:
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                sys.exit(f"{executable} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        port, path = port_file.read_text().splitlines()[:2]
        self.socket = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.calls = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def call(self, method: str, page: bool = False, **params) -> dict:
        """Send one protocol command (to the page when ``page``) and return its result."""
        self.calls += 1
        message = {"id": self.calls, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:  # events arrive in between: skip them
            answer = json.loads(self.socket.recv(timeout=60))
            if answer.get("id") == self.calls:
                if "error" in answer:
                    sys.exit(f"chromium {method} failed: {answer['error']}")
                return answer["result"]

    def text(self) -> str:
        """The page's visible text."""
        script = "document.body ? document.body.innerText : ''"
        result = self.call("Runtime.evaluate", page=True, expression=script, returnByValue=True)
        return result["result"]["value"]

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def capture_form(url: str, descriptions: list[str], browser: Chromium, timeout_s: float) -> bytes:
    """Open ``url``, wait until every parameter's description is on the page (the single-page
    app has fetched the deployment and rendered its form, not a loading or error page), and
    return a PNG of the window."""
    browser.call("Page.navigate", page=True, url=url)
    wanted = [" ".join(d.split()) for d in descriptions]
    deadline = time.time() + timeout_s
    while True:
        text = browser.text()  # once per look: one protocol call
        if not (missing := [d for d in wanted if d not in text]):
            break
        if time.time() > deadline:
            sys.exit(f"the form at {url} did not render within {timeout_s} s (missing "
                     f"descriptions {missing}): raise --timeout")  # fmt: skip
        time.sleep(0.5)
    time.sleep(1)  # fonts and layout settle after the text is there
    return base64.b64decode(browser.call("Page.captureScreenshot", page=True)["data"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "process-scan-form.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--size", default="1400,1800", help="window WIDTH,HEIGHT in px")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for the form to render")
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None:
        sys.exit(f"no Chromium at {args.chromium}: pass --chromium PATH (see {__file__})")

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
            fields = deployment["parameter_openapi_schema"]["properties"].values()
            width, height = (int(n) for n in args.size.split(","))
            browser = Chromium(args.chromium, tmp / "chromium", width, height)
            try:
                png = capture_form(url, [f["description"] for f in fields], browser, args.timeout)
            finally:
                browser.close()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_bytes(png)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    main()
