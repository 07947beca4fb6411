"""Progress of long stages: a bar on a terminal, plain periodic lines elsewhere, never in the
way of the summary or the error paragraph."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.progress import ProgressBar, progress, progress_mode
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, GOOD, write_config, write_seeds

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
ESCAPES = ("\r", "\x1b[")


def test_log_mode_prints_plain_lines_and_a_final_one(monkeypatch, capfd):
    monkeypatch.setenv("DISTILL_PROGRESS", "log")
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL_S", "0")
    with progress("teacher", total=3, unit="answered") as bar:
        for _ in range(3):
            bar.advance()
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "[teacher] 1/3 answered", "[teacher] 2/3 answered", "[teacher] 3/3 answered"]
    assert not any(escape in err for escape in ESCAPES)


def test_log_lines_are_periodic_not_per_item(monkeypatch, capfd):
    monkeypatch.setenv("DISTILL_PROGRESS", "log")
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL_S", "3600")
    with progress("filters", total=10_000) as bar:
        for _ in range(10_000):
            bar.advance()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[filters] 10000/10000 rows")


def test_a_stage_that_fails_says_where_it_stopped(monkeypatch, capfd):
    monkeypatch.setenv("DISTILL_PROGRESS", "log")
    with pytest.raises(RuntimeError), progress("capture", total=8) as bar:
        bar.advance(3)
        raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert err.startswith("[capture] 3/8 rows") and err.rstrip().endswith("stopped")


def test_mode_follows_the_terminal(monkeypatch):
    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert progress_mode() == "log"
    monkeypatch.setenv("DISTILL_PROGRESS", "off")
    assert progress_mode() == "off"


def test_training_step_lines_move_the_bar_and_reach_the_log_bounded():
    from distillflow.tasks.train.student import training_line_handler

    logged: list[str] = []
    bar = ProgressBar("train", None, "steps", mode="off")
    handle = training_line_handler(logged.append, bar)
    handle("[train] loading the student")
    for step in range(1, 1001):
        handle(f"[train] step {step}/1000 loss {1 / step:.4f} lr 1.00e-04")
    handle("[train] saved final/")
    assert (bar.done, bar.total) == (1000, 1000)
    steps = [line for line in logged if " step " in line]
    assert len(steps) == 20 and steps[-1].startswith("[train] step 1000/1000")
    assert logged[0] == "[train] loading the student" and logged[-1] == "[train] saved final/"
    assert bar._line(time.monotonic()).endswith("loss 0.0010")  # the latest loss rides along


# -- through the CLI ------------------------------------------------------------------------


def test_build_off_a_terminal_logs_plain_progress_before_the_summary(prefect_harness, tmp_path, port, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL_S", "0")
    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:12])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        result = runner.invoke(app, ["build", str(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url))])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "[test-build teacher] 12/12 answered" in output
    assert "[prompt filters] 12/12 prompts" in output and "[response filters] 12/12 responses" in output
    assert not any(escape in output for escape in ESCAPES)
    assert output.rstrip().splitlines()[-1].startswith("test-build: 12 accepted, 0 rejected")


def test_a_failed_build_ends_with_the_error_paragraph(prefect_harness, tmp_path, port, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setenv("DISTILL_PROGRESS_INTERVAL_S", "0")
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, [f"question {i} [[400]]" for i in range(6)])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        result = runner.invoke(app, ["build", str(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url))])
    assert result.exit_code == 1
    output = result.output
    assert "[test-build teacher] 6/6 answered" in output
    error = output[output.index("error: "):]
    assert "answered none of the 6 prompts" in error
    assert "[test-build" not in error and not any(escape in error for escape in ESCAPES)


def _dataset(tmp_path: Path) -> Path:
    from datetime import datetime, timezone

    from distillflow.storage.dataset import dataset_card, write_dataset

    rows = [
        {"id": f"r{i}", "prompt": f"Prompt number {i} about {i % 7} things", "response": f"answer {i}",
         "strategy": "seed", "parent_id": None, "teacher_model": "t", "finish_reason": "stop",
         "prompt_tokens": 3, "completion_tokens": 2, "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
        for i in range(300)
    ]
    manifest = {"name": "p", "config": {"teacher": {"model": "t", "backend": "openai"}}, "counts": {"accepted": 300}}
    write_dataset(tmp_path / "in", rows, [], manifest, dataset_card(manifest))
    return tmp_path / "in"


def _run_on_a_pty(argv: list[str], env: dict[str, str], timeout_s: float = 120) -> str:
    """Run argv with stdout and stderr on a pseudo-terminal; everything it printed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow  # two CLI processes (~25 s on 2 cores)
def test_dedup_renders_a_bar_on_a_terminal_and_lines_elsewhere(tmp_path):
    source = _dataset(tmp_path)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "TERM": "xterm", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env.pop("DISTILL_PROGRESS", None)
    argv = [sys.executable, "-m", "distillflow.cli", "dedup", str(source), str(tmp_path / "a"), "--engine", "local"]
    on_terminal = _run_on_a_pty(argv, env)
    assert "dedup part-00000.parquet" in on_terminal
    assert "\x1b[" in on_terminal and "━" in on_terminal and "300/300" in on_terminal  # a rich bar
    assert "[dedup part-00000.parquet]" not in on_terminal  # not the log line
    assert "of 300 rows kept" in on_terminal.split("\x1b[?25h")[-1]  # the summary comes after the bar is done

    argv[-3] = str(tmp_path / "b")
    piped = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "[dedup part-00000.parquet] 300/300 rows" in piped.stderr
    assert "[dedup write] 300/300 rows" in piped.stderr
    assert not any(escape in piped.stderr + piped.stdout for escape in ESCAPES)


def test_a_progress_artifact_is_updated_at_most_once_per_interval(monkeypatch):
    from distillflow.progress import ProgressArtifact

    pushed: list[float] = []
    artifact = ProgressArtifact("k", every_s=3600)
    artifact.artifact_id, artifact.last_update = "id", time.monotonic()  # as if created in a flow run just now
    monkeypatch.setattr(ProgressArtifact, "update", lambda self, percent, text: pushed.append(percent))
    bar = ProgressBar("teacher", 4, "answered", mode="off")
    bar.artifact = artifact
    with bar.shown():
        for _ in range(4):
            bar.advance()
    assert pushed == [100.0]  # nothing between (interval not reached), the end once


def test_outside_a_flow_run_no_artifact_is_made(monkeypatch):
    import prefect.artifacts

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *a, **k: pytest.fail("API called"))
    with ProgressBar("teacher", 2, "answered", mode="off", artifact_key="k").shown() as bar:
        bar.advance(2)


def test_a_stage_inside_a_flow_run_reports_to_the_run_log_and_its_artifact(prefect_harness, monkeypatch):
    """Training, capture and eval stages show in the Prefect UI: lines in the run's log
    (every DISTILL_RUN_LOG_INTERVAL_S, here every update) and a progress artifact at 100."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    from tests.prefect_processes import wait_until

    monkeypatch.setenv("DISTILL_RUN_LOG_INTERVAL_S", "0")
    monkeypatch.setenv("DISTILL_PROGRESS", "off")

    @flow(name="progress-probe")
    def probe() -> None:
        with progress("train probe", total=3, unit="steps", artifact_key="probe-train-progress") as bar:
            for step in range(1, 4):
                bar.update(completed=step, detail=f"loss {1 / step:.2f}")

    run_id = probe(return_state=True).state_details.flow_run_id

    def lines() -> list[str] | None:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        found = [log.message for log in logs if log.message.startswith("[train probe]")]
        return found if any(line.endswith("done") for line in found) else None

    found = wait_until(lines, 30, "the stage's lines in the run's log")
    assert found[0] == "[train probe] started: 3 steps"
    assert any("2/3 steps" in line and line.endswith("loss 0.50") for line in found)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert [(a.key, a.type, float(a.data)) for a in artifacts] == [("probe-train-progress", "progress", 100.0)]


@pytest.mark.slow
def test_a_build_leaves_its_teacher_progress_artifact_at_100(prefect_harness, tmp_path, port, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from distillflow.config import load_config
    from distillflow.flows.build import build_dataset

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        config = load_config(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url))
        state = build_dataset(config, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-build-teacher-progress"]))
        )
    # the harness's server is shared with other tests' builds of the same name: this run's only
    artifacts = [artifact for artifact in artifacts if artifact.flow_run_id == state.state_details.flow_run_id]
    assert [artifact.type for artifact in artifacts] == ["progress"]
    assert float(artifacts[0].data) == 100.0
    assert "6/6 answered" in artifacts[0].description
