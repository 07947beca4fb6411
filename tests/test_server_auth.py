"""A Prefect server with basic authentication: it refuses calls without the auth string,
a `distill` command without the right one stops with one paragraph naming the setting,
a build deployment served with it completes, and the string reaches no output of the run."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from distillflow.server_auth import ServerAuthError, explain_server_error, is_unauthorized
from tests.conftest import free_port
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import (
    Processes,
    base_env,
    flow_run_logs,
    processes,
    start_server,
    wait_for_deployment,
    wait_for_flow_run,
)
from tests.test_build import API_KEY, GOOD, write_config, write_seeds

AUTH_STRING = f"admin:{secrets.token_hex(16)}"
# What must never appear in an output: the string, its password, and the Basic token made of it.
SECRET_FORMS = (AUTH_STRING, AUTH_STRING.split(":", 1)[1], base64.b64encode(AUTH_STRING.encode()).decode())


def status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1:4200/api/work_pools/distillflow")
    return httpx.HTTPStatusError(f"{status}", request=request, response=httpx.Response(status, request=request))


def raised_from(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as error:
            raise RuntimeError("the flow failed") from error
    except RuntimeError as outer:
        return outer


def test_a_401_anywhere_in_the_chain_or_group_is_recognised():
    assert is_unauthorized(status_error(401))
    assert is_unauthorized(raised_from(status_error(401)))
    assert is_unauthorized(ExceptionGroup("runner", [ValueError("x"), raised_from(status_error(401))]))
    assert not is_unauthorized(status_error(403))
    assert not is_unauthorized(status_error(500))
    assert not is_unauthorized(ValueError("401"))
    other = ValueError("not about the server")
    assert explain_server_error(other) is other


@pytest.mark.parametrize("configured", [None, "admin:wrong-password"])
def test_the_paragraph_names_the_setting_and_the_fix_never_the_value(configured):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    url = "http://127.0.0.1:4200/api"
    updates = {PREFECT_API_URL: url} | ({PREFECT_API_AUTH_STRING: configured} if configured else {})
    restore = set() if configured else {PREFECT_API_AUTH_STRING}
    original = raised_from(status_error(401))
    with temporary_settings(updates=updates, restore_defaults=restore):
        explained = explain_server_error(original)
    assert isinstance(explained, ServerAuthError) and explained.__cause__ is original
    message = str(explained)
    assert f"PREFECT_API_URL={url}" in message and "set PREFECT_API_AUTH_STRING to the server's" in message
    assert ("refused the credentials" in message) == bool(configured)
    assert ("is not set" in message) == (not configured)
    assert "wrong-password" not in message and "\n" not in message


def test_a_temporary_server_that_requires_the_string_is_named_as_such():
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_API_AUTH_STRING}):
        message = str(explain_server_error(status_error(401)))
    assert message.startswith("the temporary Prefect server of this command (no PREFECT_API_URL; "
                              "PREFECT_SERVER_API_AUTH_STRING is set")


def test_inspect_output_never_shows_the_auth_string(monkeypatch):
    from distillflow.storage.report import scrub_secrets

    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH_STRING)
    text = f"a sample row that quotes {AUTH_STRING} by chance"
    assert scrub_secrets(text, manifest=None) == "a sample row that quotes *** by chance"


@dataclass
class AuthenticatedRun:
    root: Path  # every output of the run lies under it
    unauthenticated_status: int
    health_status: int
    refused: dict[str, subprocess.CompletedProcess]  # `distill deploy` without / with a wrong auth string
    runs: dict[str, Any]  # deployment name -> its flow run, finished
    logs: str


def http_status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def start_distill(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distillflow.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, log: Path) -> subprocess.CompletedProcess:
    """A `distill` command to its end (a refused one must stop on its own, well within a minute)."""
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log.write_text(f"{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextmanager
def authenticated_client() -> Iterator[None]:
    """This test process's Prefect clients send the auth string (the helpers add the URL)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    with temporary_settings({PREFECT_API_AUTH_STRING: AUTH_STRING}):
        yield


def save_api_outputs(url: str, directory: Path) -> None:
    """What the server holds about the run, as the API returns it, into `directory`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    directory.mkdir(parents=True, exist_ok=True)
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        objects = {
            "deployments": client.read_deployments(),
            "flow_runs": client.read_flow_runs(),
            "artifacts": client.read_artifacts(),
            "logs": client.read_logs(),
            "work_pools": client.read_work_pools(),
            "variables": client.read_variables(),
        }
    for name, items in objects.items():
        (directory / f"{name}.json").write_text(json.dumps([item.model_dump(mode="json") for item in items], indent=1))


def start_refused_deploys(env: dict[str, str], workdir: Path) -> dict[str, subprocess.Popen]:
    """`distill deploy` without the auth string, and with a wrong one."""
    deploy = ["deploy", "c.yaml", "--pool", "distillflow"]
    return {
        "unset": start_distill(deploy, env, workdir),
        "wrong": start_distill(deploy, {**env, "PREFECT_API_AUTH_STRING": "admin:wrong"}, workdir),
    }


def run_deployments(group: Processes, url: str, names: list[str]) -> dict[str, Any]:
    """A run of each deployment, started together; each one once it finished."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with authenticated_client():
        deployments = [wait_for_deployment(url, name, 60, group) for name in names]
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            runs = [client.create_flow_run_from_deployment(deployment.id) for deployment in deployments]
        return {name: wait_for_flow_run(url, run.id, 90, group) for name, run in zip(names, runs)}


def run_logs(url: str, runs: dict[str, Any]) -> str:
    with authenticated_client():
        return "\n".join(flow_run_logs(url, run.id) for run in runs.values())


def write_pool_config(workdir: Path, base_url: str) -> None:
    """The same build under another name (its own deployment), for the work pool."""
    path = write_config(workdir / "pool.yaml", Path("seeds.jsonl"), Path("data/test-build-pool"), base_url)
    path.write_text(path.read_text().replace("name: test-build", "name: test-build-pool"))


@pytest.fixture(scope="module")
def authenticated_run(tmp_path_factory) -> AuthenticatedRun:
    """`prefect server start` with basic auth; `distill deploy` without / with a wrong auth
    string; with the right one, `distill serve` runs its build deployment and a `prefect
    worker` runs the build deployment `distill deploy` put on its pool (the compose path)."""
    root = tmp_path_factory.mktemp("authenticated-run")
    workdir = root / "work"
    workdir.mkdir()
    write_seeds(workdir / "seeds.jsonl", GOOD[:6])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher, processes(root / "logs") as group:
        write_config(workdir / "c.yaml", Path("seeds.jsonl"), Path("data/test-build"), teacher.base_url)
        write_pool_config(workdir, teacher.base_url)
        url = start_server(group, root / "server-home", free_port(), auth_string=AUTH_STRING)
        unauthenticated = http_status(f"{url}/work_pools/filter", "POST", b"{}")
        health = http_status(f"{url}/health")
        env = base_env(root / "client-home", PREFECT_API_URL=url, DISTILL_TEST_KEY=API_KEY,
                       DISTILL_LOG_DIR=str(root / "distill-logs"))
        # The refused commands run while the ones with the right string start.
        refusing = start_refused_deploys(env, workdir)
        authenticated = {**env, "PREFECT_API_AUTH_STRING": AUTH_STRING}
        deploying = start_distill(["deploy", "pool.yaml", "--pool", "distillflow"], authenticated, workdir)
        group.start("serve", [sys.executable, "-m", "distillflow.cli", "serve", "c.yaml"],
                    {**authenticated, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, cwd=workdir)
        refused = {case: finish(process, root / "logs" / f"deploy-{case}.txt") for case, process in refusing.items()}
        deployed = finish(deploying, root / "logs" / "deploy.txt")
        assert deployed.returncode == 0, deployed.stderr
        group.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "distillflow", "--type",
                               "process"], {**authenticated, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=root)
        runs = run_deployments(group, url, ["build-dataset/test-build", "build-dataset/test-build-pool"])
        logs = run_logs(url, runs)
        with authenticated_client():
            save_api_outputs(url, root / "api")
    return AuthenticatedRun(root, unauthenticated, health, refused, runs, logs)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_server_refuses_a_call_without_the_auth_string(authenticated_run):
    assert authenticated_run.unauthenticated_status == 401
    assert authenticated_run.health_status == 200  # the health check needs no credentials


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unset", "wrong"])
def test_deploy_without_the_right_auth_string_stops_with_one_paragraph(authenticated_run, case):
    result = authenticated_run.refused[case]
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("error: "):]
    assert "PREFECT_API_AUTH_STRING" in error and "PREFECT_SERVER_API_AUTH_STRING" in error
    assert ("is not set" if case == "unset" else "refused the credentials") in error
    assert "Traceback" not in result.stderr and "admin:wrong" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test-build", "test-build-pool"])  # served; on the worker's pool
def test_a_build_deployment_run_with_the_auth_string_completes(authenticated_run, name):
    run = authenticated_run.runs[f"build-dataset/{name}"]
    assert run.state.type.value == "COMPLETED", authenticated_run.logs
    manifest = json.loads((authenticated_run.root / "work" / "data" / name / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == 6
    summaries = json.loads((authenticated_run.root / "api" / "artifacts.json").read_text())
    assert any(artifact["key"] == f"{name}-summary" for artifact in summaries)


def readable_texts(path: Path) -> Iterator[str]:
    """A file as bytes decoded leniently, and a Parquet file's rows and metadata as text too."""
    yield path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        yield json.dumps(table.to_pylist(), default=str)
        yield str(table.schema.metadata)


def leaks(root: Path) -> list[str]:
    """Each file under `root` that holds a form of the auth string, with the form's start."""
    return [
        f"{path.relative_to(root)}: {form[:6]}..."
        for path in sorted(root.rglob("*"))
        if path.is_file()
        for text in readable_texts(path)
        for form in SECRET_FORMS
        if form in text
    ]


def test_the_scan_finds_the_auth_string_in_text_in_a_token_and_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert leaks(tmp_path) == []
    (tmp_path / "server.log").write_text(f"Authorization: Basic {SECRET_FORMS[2]}")
    pq.write_table(pa.table({"answer": [f"the password is {SECRET_FORMS[1]}"]}), tmp_path / "part.parquet",
                   compression="zstd")
    found = leaks(tmp_path)
    assert sorted({line.split(":")[0] for line in found}) == ["part.parquet", "server.log"], found


@pytest.mark.slow
def test_the_auth_string_reaches_no_output_of_the_run(authenticated_run):
    """Every file the run left: the server's database, each process's log, the failed
    commands' logs, the dataset, and what the API returns about deployments, flow runs,
    logs and artifacts."""
    files = [path for path in authenticated_run.root.rglob("*") if path.is_file()]
    names = {path.relative_to(authenticated_run.root).parts[0] for path in files}
    assert {"api", "logs", "server-home", "work", "distill-logs"} <= names, names
    assert any(path.name.endswith(".db") for path in files)  # the server's database is among them
    assert leaks(authenticated_run.root) == []
