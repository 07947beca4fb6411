"""The Prefect server on PostgreSQL (as in docker-compose.yml): a cluster of Debian's
postgresql started here, `prefect server start` on it, and a build deployment served by
`distill serve` runs to completion, its state stored in PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import (
    api,
    base_env,
    flow_run_logs,
    processes,
    start_server,
    wait_for_deployment,
    wait_for_flow_run,
)
from tests.test_build import API_KEY, GOOD, write_config, write_seeds


def postgres_bin() -> Path | None:
    for version in ("17", "16", "15"):
        directory = Path(f"/usr/lib/postgresql/{version}/bin")
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    found = shutil.which("initdb")
    return Path(found).parent if found else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL binaries: apt-get install -y postgresql (.ci/run does)"),
]


@contextmanager
def postgres_cluster(port: int) -> Iterator[str]:
    """A throwaway cluster on 127.0.0.1:`port` with database `prefect`; yields its asyncpg URL.
    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user."""
    binaries = postgres_bin()
    as_user: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="distillflow-pg-"))  # not under pytest's root-only tmp dir
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(directory, "postgres", "postgres")
    data, log = directory / "data", directory / "server.log"

    def run(*argv: str) -> None:
        result = subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "prefect", "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "30", "start")
        try:
            run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
            yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        finally:
            subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, timeout=30, check=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def psql(port: int, query: str) -> str:
    binaries = postgres_bin()
    result = subprocess.run(
        [str(binaries / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect", "-At", "-c", query],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_build_deployment_completes_on_a_postgres_backed_server(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:5])
    port = free_port()
    with postgres_cluster(port) as database_url, ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher, processes(tmp_path / "logs") as group:
        config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url)
        url = start_server(group, tmp_path / "server-home", free_port(), database_url=database_url)
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url, DISTILL_TEST_KEY=API_KEY, PREFECT_RUNNER_POLL_FREQUENCY="2")
        group.start("serve", [sys.executable, "-m", "distillflow.cli", "serve", str(config)], env, cwd=tmp_path)
        deployment = wait_for_deployment(url, "build-dataset/test-build", 60, group)
        with api(url) as client:
            run = client.create_flow_run_from_deployment(deployment.id)
        run = wait_for_flow_run(url, run.id, 120, group)
        assert run.state.is_completed(), flow_run_logs(url, run.id) + group.log("serve")
        # The server's state is in PostgreSQL, not in a SQLite file of its home.
        assert psql(port, f"SELECT state_type FROM flow_run WHERE id = '{run.id}'") == "COMPLETED"
        assert psql(port, "SELECT count(*) FROM deployment WHERE name = 'test-build'") == "2"  # build and run
        assert not list((tmp_path / "server-home").glob("*.db"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == 5
