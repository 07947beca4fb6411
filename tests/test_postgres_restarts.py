"""A PostgreSQL-backed Prefect server restarted mid-build, and the database itself restarted
(issue 31): the build finishes, or stops with one clear error and a rerun finishes it,
paying again only for the requests that were on the wire. PostgreSQL as in
tests/test_prefect_postgres.py, a real `prefect server start` on it, and the project's
test teacher, which counts every request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillflow.storage.manifest import read_manifest
from tests.conftest import free_port
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import base_env, processes, start_server, wait_until
from tests.test_build import API_KEY, write_config, write_seeds
from tests.test_prefect_postgres import postgres_bin, postgres_cluster, psql
from tests.test_resume import ledger_rows

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 4
PROMPTS = [f"Restart question {i}: name {i % 7 + 2} facts about the number {i * 13}." for i in range(240)]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL binaries: apt-get install -y postgresql"),
]


def database_control(port: int) -> tuple[list[str], list[str]]:
    """The `pg_ctl` commands that stop and start tests/test_prefect_postgres.py's cluster."""
    data = Path(psql(port, "SHOW data_directory"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pg_ctl = [*as_user, str(postgres_bin() / "pg_ctl"), "-D", str(data), "-w", "-t", "30"]
    options = f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
    return [*pg_ctl, "-m", "fast", "stop"], [*pg_ctl, "-o", options, "-l", str(data.parent / "server.log"), "start"]


def run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def stop_server(group) -> None:
    """SIGTERM to `prefect server start`'s process group."""
    name, old = next((name, process) for name, process in reversed(group.started) if name == "server")
    os.killpg(old.pid, signal.SIGTERM)
    old.wait(30)
    group.started.remove((name, old))


@pytest.mark.parametrize("what", ["database", "server"])
def test_a_restart_mid_build_is_ridden_through_or_one_error_and_a_clean_rerun(tmp_path, what):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    pg_port, server_port = free_port(), free_port()
    # 0.15 s an answer, 4 at a time: the teacher stage takes ~9 s.
    fake = FaultyOpenAIServer(api_key=API_KEY, latency_s=0.15)
    with postgres_cluster(pg_port) as database_url, ServerThread(fake, free_port()) as teacher, \
            processes(tmp_path / "logs") as group:
        url = start_server(group, tmp_path / "server-home", server_port, database_url=database_url)
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url, DISTILL_TEST_KEY=API_KEY)
        config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url,
                              max_concurrency=CONCURRENCY, batch_size=32)
        ledger = tmp_path / "out" / ".ledger" / "teacher.sqlite"
        with open(tmp_path / "first.log", "wb") as log:
            build = subprocess.Popen([sys.executable, "-m", "distillflow.cli", "build", str(config)], env=env,
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: ledger_rows(ledger) >= 40 or build.poll() is not None, 150, "40 answers", group)
        assert build.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        # Down while the build answers 60 more prompts, then up again.
        stopped = time.monotonic()
        if what == "database":
            stop_database, start_database = database_control(pg_port)
            run(stop_database)
        else:
            stop_server(group)
        wait_until(lambda: ledger_rows(ledger) >= 100 or build.poll() is not None, 150, "answers while it is down")
        if what == "database":
            run(start_database)
        else:
            start_server(group, tmp_path / "server-home", server_port, database_url=database_url)
        down_s = time.monotonic() - stopped
        code = build.wait(240)
        output = (tmp_path / "first.log").read_text()
        assert "Traceback" not in output, output[-3000:]
        answered_first = {prompt for prompt, count in fake.answered.items() if count}
        outcome = "finished"
        if code != 0:  # one clear error, then a rerun that finishes and pays only for what was on the wire
            errors = [line for line in output.splitlines() if line.startswith("error: ")]
            assert code == 1 and len(errors) == 1, output[-3000:]
            outcome = errors[0][:300]
            fake.attempts.clear()
            rerun = subprocess.run([sys.executable, "-m", "distillflow.cli", "build", str(config)], env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=240)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            paid_twice = [prompt for prompt in fake.attempts if prompt in answered_first]
            assert len(paid_twice) <= CONCURRENCY, len(paid_twice)
        else:
            assert max(fake.attempts.values()) == 1
    assert read_manifest(tmp_path / "out")["counts"]["accepted"] == len(PROMPTS)
    print(f"\n{what} down for {down_s:.1f} s mid-build: {outcome}")
