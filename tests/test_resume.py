"""SIGKILL mid-build, rerun: the same dataset as an uninterrupted run, no answer paid twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillflow.storage.parquet import read_table
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, write_config, write_seeds

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 8


def run_build(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distillflow.cli", "build", str(config)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
@pytest.mark.parametrize("client_processes", [1, 2])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, port, prefect_server, client_processes):
    prompts = [f"Resumable prompt {i}: describe the number {i * 7}." for i in range(400)]
    prompts += ["refused [[400]]", "cut [[truncate]] short"]
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, prompts)
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY}
    fake = FaultyOpenAIServer(api_key=API_KEY, latency_s=0.03)
    with ServerThread(fake, port) as server:
        straight = write_config(tmp_path / "a.yaml", seeds, tmp_path / "a", server.base_url,
                                max_concurrency=CONCURRENCY, batch_size=64)
        finish(run_build(straight, env))
        fake.attempts.clear()
        fake.answered.clear()

        resumed = write_config(tmp_path / "b.yaml", seeds, tmp_path / "b", server.base_url,
                               max_concurrency=CONCURRENCY, batch_size=64, client_processes=client_processes)
        ledger = tmp_path / "b" / ".ledger" / "teacher.sqlite"
        process = run_build(resumed, env)
        deadline = time.monotonic() + 240
        while ledger_rows(ledger) < 120:
            assert process.poll() is None, "build finished before it could be killed"
            assert time.monotonic() < deadline, "build made no progress"
            time.sleep(0.05)
        if client_processes == 1:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        else:  # only the parent dies: its client processes must notice and stop paying
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
            time.sleep(1.0)
            requests_then = fake.total_requests
            time.sleep(1.5)
            assert fake.total_requests == requests_then, "client processes kept calling the teacher"
        answered_before_kill = {p for p, n in fake.answered.items() if n}
        recorded = ledger_rows(ledger)
        assert 120 <= recorded < len(prompts)
        assert not (tmp_path / "b" / "manifest.json").exists()

        fake.attempts.clear()
        finish(run_build(resumed, env))
        asked_again = [p for p in fake.attempts if p in answered_before_kill]
        # Only answers that were on the wire when the process died may be paid twice.
        assert len(asked_again) <= CONCURRENCY, asked_again
        assert len(fake.attempts) <= len(prompts) - recorded + CONCURRENCY

    for part in ("data", "rejects"):
        a = read_table(tmp_path / "a" / part)
        b = read_table(tmp_path / "b" / part)
        if "created_at" in a.column_names:
            a, b = a.drop(["created_at"]), b.drop(["created_at"])
        assert a.equals(b), part
    assert read_table(tmp_path / "a" / "data").num_rows == 400
