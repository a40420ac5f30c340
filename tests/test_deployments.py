"""Deployment files: they parse, pass the Kubernetes schemas, keep secrets out and services
in; a Prefect server started with an auth string refuses requests without it; the
deployments of prefect.yaml register against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import closed_port

DEPLOY = Path(__file__).resolve().parents[1] / "deployments"
K8S = DEPLOY / "k8s"
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "AUTH", "ACCESS_KEY", "DATABASE")


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_pass_the_schemas():
    import kubernetes_validate

    checked = 0
    for doc in manifests():
        if doc["apiVersion"].startswith("kubernetes.dask.org"):
            continue  # a custom resource: checked in its own test
        kubernetes_validate.validate(doc, "1.30", strict=True)
        checked += 1
    assert checked >= 8


def _containers(doc: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(node.get("containers", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return found


def test_secrets_come_from_kubernetes_secrets_only():
    checked = []
    for doc in manifests():
        assert doc["kind"] != "Secret", "no Secret manifests in git: create them with kubectl"
        for container in _containers(doc):
            for env in container.get("env", []):
                if any(word in env["name"] for word in SECRET_WORDS):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]
                    checked.append(env["name"])
    # the server's auth string and database URL, the worker's auth string: none went unseen
    assert {
        "PREFECT_API_AUTH_STRING",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_SERVER_API_AUTH_STRING",
    } <= set(checked), checked


def test_nothing_is_exposed_outside_the_cluster():
    for doc in manifests():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    dask = next(d for d in manifests() if d["kind"] == "DaskCluster")
    assert dask["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    policy = next(d for d in manifests() if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}]}
    ]


def test_dask_workers_are_gpu_workers():
    dask = next(d for d in manifests() if d["kind"] == "DaskCluster")
    worker = dask["spec"]["worker"]["spec"]
    container = worker["containers"][0]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert container["envFrom"] == [{"secretRef": {"name": "stemflow-object-store"}}]


def test_work_pool_template_variables_cover_its_placeholders():
    import re

    template = json.loads((K8S / "work-pool-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])
    assert template["variables"]["properties"]["node_selector"]["default"] == {
        "nvidia.com/gpu.present": "true"
    }


def test_image_keeps_secrets_out_and_runs_unprivileged():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    for line in instructions:
        if line.split()[0] in ("ENV", "ARG"):
            assert not any(
                word in line.upper()
                for word in ("SECRET", "PASSWORD", "AWS_ACCESS_KEY", "AUTH_STRING")
            ), line
    assert any(line.startswith("USER ") and "root" not in line for line in instructions)
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def _image_instructions() -> tuple[list[str], list[str]]:
    """The Dockerfile's instructions (continuation lines joined): those of its last stage (the
    image), and all."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last:], lines


def test_containers_given_args_alone_run_them_as_their_command():
    """A container with ``args`` and no ``command`` runs the image's ENTRYPOINT with those args:
    the Dask workers (``dask worker ...``) and each flow run's Job (Prefect's Kubernetes worker
    fills its args with ``prefect flow-run execute``). With ENTRYPOINT ["stemflow"] they ran
    ``stemflow dask worker ...`` and exited on argparse's error; the image has no ENTRYPOINT."""
    image, _ = _image_instructions()
    assert not [line for line in image if line.startswith("ENTRYPOINT")]
    template = json.loads((K8S / "work-pool-template.json").read_text())
    documents = [*manifests(), template["job_configuration"]["job_manifest"]]
    ours = [c for d in documents for c in _containers(d) if "prefecthq/" not in c["image"]]
    given_args = {c["name"] for c in ours if "command" not in c}
    assert given_args == {"worker", "prefect-job"}, given_args


def test_the_image_can_start_the_kubernetes_worker():
    """prefect-worker.yaml starts ``prefect worker start --type kubernetes`` in the image: that
    needs prefect-kubernetes, which a pod (no terminal to confirm an install) does not fetch."""
    deployments = [d for d in manifests() if d["kind"] == "Deployment"]
    worker = next(d for d in deployments if d["metadata"]["name"] == "prefect-worker")
    command = _containers(worker)[0]["command"]
    assert command[command.index("--type") + 1] == "kubernetes"
    _, build = _image_instructions()
    installs = [line for line in build if line.startswith("RUN") and "pip install" in line]
    assert any("prefect-kubernetes" in line for line in installs), installs


def test_the_files_the_deployment_files_name_exist():
    """Every ``deployments/...`` path that a deployment file names (in a command or a comment)
    is in the repository: the Dockerfile sent readers to a deployments/README.md that never
    was."""
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in re.findall(r"deployments/[\w./-]*\w", path.read_text()):
            assert (DEPLOY.parent / name).exists(), f"{path.relative_to(DEPLOY)} names {name}"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free local port, requiring an auth string."""
    port = closed_port()
    home = tmp_path_factory.mktemp("prefect-home")
    auth = "admin:" + os.urandom(12).hex()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    # Its output goes to a file: a pipe that nobody reads while the tests run would block the
    # server once it filled (64 KB of log).
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-services",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            health = httpx.get(f"{url}/health", auth=tuple(auth.split(":", 1)), timeout=2)
            if health.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # not up yet, or not healthy yet: ask again in a moment
    else:
        proc.kill()
        pytest.fail("prefect server did not start: " + log.read_text())
    yield {"url": url, "auth": auth, "home": home}
    proc.terminate()
    proc.wait(30)


def test_requests_without_the_auth_string_are_refused(prefect_server):
    url = prefect_server["url"]
    user, password = prefect_server["auth"].split(":", 1)
    refused = httpx.post(f"{url}/flows/filter", json={}, timeout=10)
    wrong = httpx.post(f"{url}/flows/filter", json={}, auth=(user, "wrong"), timeout=10)
    allowed = httpx.post(f"{url}/flows/filter", json={}, auth=(user, password), timeout=10)
    assert refused.status_code == 401 and wrong.status_code == 401
    assert allowed.status_code == 200


def test_the_deployments_of_prefect_yaml_register(prefect_server):
    """`prefect deploy --all` registers the three deployments of prefect.yaml, as the file's header
    says, against a server that requires the auth string; their forms, schedule and pool are
    read back through the API."""
    repo = DEPLOY.parent
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_server["home"]),
        "PREFECT_API_URL": prefect_server["url"],
        "PREFECT_API_AUTH_STRING": prefect_server["auth"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for command in (
        ["work-pool", "create", "stemflow-process", "--type", "process"],
        ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *command],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"prefect {' '.join(command)}:\n{done.stdout}\n{done.stderr}"

    response = httpx.post(
        f"{prefect_server['url']}/deployments/filter",
        json={},
        auth=tuple(prefect_server["auth"].split(":", 1)),
        timeout=30,
    )
    response.raise_for_status()
    deployments = {d["name"]: d for d in response.json()}
    assert set(deployments) == {"process-scan", "facility-reprocess", "noise-sweep"}
    for deployment in deployments.values():
        assert deployment["work_pool_name"] == "stemflow-process"
        assert deployment["work_queue_name"] == "default"
        # Module entrypoints and no pull step: workers import the installed package, whatever
        # folder `prefect deploy` ran from.
        assert not deployment["pull_steps"]

    scan = deployments["process-scan"]
    assert scan["entrypoint"] == "flows.process_scan.process_scan"
    assert scan["schedules"] == []
    form = scan["parameter_openapi_schema"]
    assert form["required"] == ["source", "dest"]
    fields = form["properties"]
    assert set(fields) >= {"source", "dest", "methods", "reference", "symmetry", "device"}
    assert set(fields) >= {"ccstae_preset", "ccstae", "py4dstem", "ingest", "scan_store", "workdir"}
    # Every field carries its line of the flow docstring's Args: as the form's help text.
    assert all(field.get("description") for field in fields.values())
    assert fields["source"]["description"].startswith("Raw scan (any supported format)")
    assert fields["dest"]["description"].startswith("Strain dataset to publish")
    assert fields["methods"]["anyOf"][0]["items"]["enum"] == ["ccstae", "py4dstem"]
    assert fields["symmetry"]["enum"] == ["auto", 2, 4, 6]  # a dropdown
    assert {"CCSTAEConfig", "Py4DSTEMConfig", "IngestOptions"} <= set(form["definitions"])
    formats = form["definitions"]["IngestOptions"]["properties"]["format"]["enum"]
    assert formats[0] == "auto" and {"mib", "hdf5", "raw", "npy"} <= set(formats)

    nightly = deployments["facility-reprocess"]
    assert nightly["entrypoint"] == "flows.reprocess_facility.reprocess_facility"
    [schedule] = nightly["schedules"]
    assert schedule["active"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"

    sweep = deployments["noise-sweep"]
    assert sweep["entrypoint"] == "flows.noise_sweep.noise_sweep"
    assert sweep["schedules"] == []
    form = sweep["parameter_openapi_schema"]
    assert form["required"] == ["dest"]
    assert {"SimulationConfig", "NoiseLevels"} <= set(form["definitions"])
    assert nightly["parameters"] == {
        "root": "s3://facility-raw/",
        "dest_root": "s3://facility-results/",
    }
    form = nightly["parameter_openapi_schema"]
    assert {"root", "dest_root"} <= set(form["required"])
    assert all(form["properties"][name]["description"] for name in ("root", "dest_root"))
