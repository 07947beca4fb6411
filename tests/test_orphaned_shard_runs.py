"""A build killed outright (SIGKILL, the OOM killer) with shard runs in flight on a Prefect
work pool (issue 31): the next build of the same output_dir adopts them, and cancels the
ones it cannot use, by itself. A real `prefect server start`, a real `prefect worker
start --type process`, and the project's test teacher, which counts every request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from distillflow.storage.manifest import read_manifest
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import TERMINAL_STATES, api, processes, wait_until
from tests.test_build import API_KEY, write_config, write_seeds

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Orphan question {i}: how many {word} fit in {i + 2} boxes?" for i, word in enumerate(
    "apples pears plums figs dates limes kiwis grapes melons lemons".split()
)]  # two shards, both in flight when the build is killed
SHARD_ROWS = 5


def pool_config(path: Path, seeds: Path, out: Path, base_url: str, pool: str, worker_wait_s: float = 120) -> Path:
    write_config(path, seeds, out, base_url, max_concurrency=1, timeout_s=120)
    config = yaml.safe_load(path.read_text())
    config["dataset"] = {"shard_rows": SHARD_ROWS, "work_pool": pool, "workers": 2, "worker_wait_s": worker_wait_s}
    path.write_text(yaml.safe_dump(config))
    return path


def shard_runs(url: str, pool: str) -> list:
    """The shard runs on work pool `pool` (the session's server also holds other tests' builds)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    with api(url) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["build-shard"])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )


class GatedServer(FaultyOpenAIServer):
    """The test teacher, holding every request until `gate` is set."""

    def __init__(self, **kwargs) -> None:
        super().__init__(api_key=API_KEY, **kwargs)
        self.gate = threading.Event()
        self.arrived = 0

    async def chat(self, request):
        self.arrived += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.05)
        return await super().chat(request)


def start_build(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "distillflow.cli", "build", str(config)], env=env, cwd=ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_shard_runs_left_by_a_killed_build_are_adopted_by_the_next_build(prefect_server, port, tmp_path):
    url = prefect_server["PREFECT_API_URL"]
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY, "OMP_NUM_THREADS": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    fake = GatedServer()
    with ServerThread(fake, port) as server, processes(tmp_path / "logs") as group:
        group.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "orphans",
                               "--type", "process", "--name", "w0"], env, cwd=ROOT)
        config = pool_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url, "orphans")
        first = start_build(config, env, tmp_path / "first.log")
        # Both shard runs in flight have sent their first request (held by the teacher).
        wait_until(lambda: fake.arrived >= 2 or first.poll() is not None, 150, "two shard runs asking", group)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # as the OOM killer would: no chance to cancel anything
        first.wait(30)
        left = [run for run in shard_runs(url, "orphans") if run.state.type.value not in TERMINAL_STATES]
        assert len(left) == 2, [(run.name, run.state.name) for run in shard_runs(url, "orphans")]

        started = time.monotonic()
        rerun = start_build(config, env, tmp_path / "rerun.log")
        wait_until(lambda: "adopted" in (tmp_path / "rerun.log").read_text() or rerun.poll() is not None, 150,
                   "the rerun to find the runs left in flight", group)
        fake.gate.set()
        assert rerun.wait(300) == 0, (tmp_path / "rerun.log").read_text()[-3000:] + group.log("worker")[-2000:]
        runs = shard_runs(url, "orphans")
    output = (tmp_path / "rerun.log").read_text()
    assert "2 shard run(s) of an earlier build" in output and "adopted 2, cancelled 0" in output, output[-3000:]
    assert read_manifest(tmp_path / "out")["counts"]["accepted"] == len(PROMPTS)
    assert max(fake.attempts.values()) == 1  # the runs left in flight were adopted: nothing asked twice
    adopted = {run.id for run in left}
    assert {run.state.type.value for run in runs if run.id in adopted} == {"COMPLETED"}
    assert len(runs) == -(-len(PROMPTS) // SHARD_ROWS)  # no shard was submitted twice
    print(f"\n{len(left)} shard runs left in flight by the killed build, both adopted; the rerun took "
          f"{time.monotonic() - started:.1f} s; {sum(fake.attempts.values())} requests for {len(PROMPTS)} prompts")


@pytest.mark.slow
def test_a_worker_killed_mid_shard_stops_the_build_naming_its_run_and_the_rerun_finishes(prefect_server, port, tmp_path):
    url = prefect_server["PREFECT_API_URL"]
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS)
    env = {**os.environ, **prefect_server, "DISTILL_TEST_KEY": API_KEY, "OMP_NUM_THREADS": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    fake = FaultyOpenAIServer(api_key=API_KEY, latency_s=0.5)
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "killed", "--type", "process"]
    with ServerThread(fake, port) as server, processes(tmp_path / "logs") as group:
        doomed = group.start("worker", [*worker, "--name", "doomed"], env, cwd=ROOT)
        # The rerun waits worker_wait_s for a run left Cancelling by the dead worker before taking it over.
        config = pool_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url, "killed", worker_wait_s=45)
        first = start_build(config, env, tmp_path / "first.log")
        wait_until(lambda: fake.total_requests >= 2 or first.poll() is not None, 150, "shard runs answering", group)
        group.services.discard("worker")
        os.killpg(doomed.pid, signal.SIGKILL)  # the worker and the shard runs it started
        killed = time.monotonic()
        answered_before = {prompt for prompt, count in fake.answered.items() if count}
        code = first.wait(120)
        stopped_after = time.monotonic() - killed
        output = (tmp_path / "first.log").read_text()
        assert code == 1, output[-3000:]
        assert "failed on work pool 'killed': flow run 'shard-" in output, output[-3000:]

        group.start("worker2", [*worker, "--name", "fresh"], env, cwd=ROOT)
        fake.attempts.clear()
        rerun = subprocess.run([sys.executable, "-m", "distillflow.cli", "build", str(config)], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:] + group.log("worker2")[-2000:]
    paid_twice = [prompt for prompt in fake.attempts if prompt in answered_before]
    assert len(paid_twice) <= 2  # the requests on the wire: one per shard run (max_concurrency 1, 2 runs)
    assert read_manifest(tmp_path / "out")["counts"]["accepted"] == len(PROMPTS)
    print(f"\nworker killed: the build stopped {stopped_after:.1f} s later; {len(paid_twice)} prompts paid twice")
