"""Training hand-off: streaming, failure with the last lines, metrics artifacts, the flow."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from distillflow.config import load_training_config
from distillflow.tasks.train.student import (
    TrainingFailed,
    artifact_key,
    loss_curve_rows,
    read_metrics,
    run_streaming,
    summary_markdown,
)


def script(tmp_path: Path, body: str, name: str = "fake_train.py") -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def training_config(tmp_path: Path, output_dir: Path) -> Path:
    path = tmp_path / "train.yaml"
    data = {"dataset_dir": str(tmp_path / "ds"), "output_dir": str(output_dir), "student": str(tmp_path / "s")}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


FAKE_TRAINING = """
    import json, sys
    from pathlib import Path
    out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            loss = 3.0 / step
            print(f"step {step} loss {loss:.4f}", flush=True)
            handle.write(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens": 64 * step, "elapsed_s": 0.5 * step}) + "\\n")
    (out / "metrics.json").write_text(json.dumps({"steps": 5, "final_loss": 0.6, "eval_loss": 0.7}))
    print("done", flush=True)
"""


def test_lines_arrive_while_the_process_is_still_running(tmp_path):
    flag = tmp_path / "seen-first-line"
    argv = script(tmp_path, f"""
        import time
        from pathlib import Path
        print("first", flush=True)
        deadline = time.time() + 20
        while not Path({str(flag)!r}).exists():  # waits for the parent to have read "first"
            if time.time() > deadline:
                raise SystemExit(5)
            time.sleep(0.02)
        print("second")
    """)
    seen = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "first":
            flag.touch()

    run_streaming(argv, on_line)
    assert seen == ["first", "second"]


def test_non_zero_exit_raises_with_the_last_lines(tmp_path):
    argv = script(tmp_path, """
        import sys
        for index in range(100):
            print(f"line {index}")
        print("Traceback: CUDA out of memory", file=sys.stderr)
        sys.exit(3)
    """)
    seen = []
    with pytest.raises(TrainingFailed) as failure:
        run_streaming(argv, seen.append, tail_lines=5)
    message = str(failure.value)
    assert "exited with code 3" in message
    assert "line 99" in message and "CUDA out of memory" in message and "line 94" not in message
    assert len(seen) == 101  # every line was streamed, stderr included


def test_timeout_kills_the_process_group(tmp_path):
    argv = script(tmp_path, """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("started", flush=True)
        time.sleep(60)
    """)
    start = time.monotonic()
    with pytest.raises(TrainingFailed, match="timed out after 1 s"):
        run_streaming(argv, lambda line: None, timeout_s=1)
    assert time.monotonic() - start < 15  # the grandchild did not keep the pipe open


def test_metrics_become_a_thinned_curve_and_a_summary(tmp_path):
    steps = [{"step": i, "loss": 1.0 / i, "lr": 1e-4, "tokens": 10 * i, "elapsed_s": 0.1 * i} for i in range(1, 1002)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "metrics.json").write_text(json.dumps({"final_loss": 0.001, "eval_loss": 0.5}))
    read_steps, final = read_metrics(tmp_path)
    assert read_steps == steps and final["eval_loss"] == 0.5

    rows = loss_curve_rows(read_steps, max_rows=100)
    assert len(rows) <= 101 and rows[0]["step"] == 1 and rows[-1]["step"] == 1001
    assert list(rows[0]) == ["step", "loss", "lr", "tokens", "elapsed_s"]

    markdown = summary_markdown("Run", read_steps, final)
    assert "| eval_loss | 0.5 |" in markdown and "1.0000 at step 1 → 0.0010 at step 1001" in markdown
    assert "5,015,010 tokens in 100.1 s" in markdown  # `tokens` is per step: summed
    assert artifact_key("/x/My Run_2", "loss-curve") == "my-run-2-loss-curve"
    assert read_metrics(tmp_path / "missing") == ([], {})


def test_training_config_is_read_from_a_full_config_or_its_section(tmp_path):
    section = training_config(tmp_path, tmp_path / "out")
    assert load_training_config(section).output_dir == tmp_path / "out"
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump({
        "name": "n", "output_dir": str(tmp_path / "ds"), "seeds": [{"path": "x.jsonl"}],
        "teacher": {"model": "m"}, "training": yaml.safe_load(section.read_text()),
    }))
    assert load_training_config(full).student == tmp_path / "s"


def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def artifact_data(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [artifact.data for artifact in artifacts]


@pytest.fixture
def run_logs_at_info():
    """The test suite keeps Prefect quiet (WARNING); these tests check INFO run logs."""
    loggers = [logging.getLogger(name) for name in ("prefect", "prefect.task_runs", "prefect.flow_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def test_train_flow_streams_logs_and_publishes_artifacts(prefect_harness, run_logs_at_info, tmp_path):
    from distillflow.flows.train import train

    out = tmp_path / "tiny-run"
    state = train(
        str(training_config(tmp_path, out)), command=script(tmp_path, FAKE_TRAINING) + [str(out)], return_state=True
    )
    assert state.is_completed()
    assert state.result() == {"steps": 5, "final_loss": 0.6, "eval_loss": 0.7}

    deadline = time.monotonic() + 30  # logs reach the API in background batches
    while "done" not in (messages := flow_logs(state.state_details.flow_run_id)):
        assert time.monotonic() < deadline, messages
        time.sleep(0.5)
    assert "step 1 loss 3.0000" in messages

    curve = artifact_data("tiny-run-loss-curve")[0]
    curve = json.loads(curve) if isinstance(curve, str) else curve
    assert [row["step"] for row in curve] == [1, 2, 3, 4, 5]
    assert "| eval_loss | 0.7 |" in artifact_data("tiny-run-final-metrics")[0]
    chart = artifact_data("tiny-run-loss-chart")[0]
    assert "loss 3.0000 at step 1 → 0.6000 at step 5" in chart and "](data:image/png;base64," in chart


def test_train_flow_fails_on_a_non_zero_exit(prefect_harness, tmp_path):
    from distillflow.flows.train import train

    argv = script(tmp_path, """
        import sys
        print("loading student", flush=True)
        print("RuntimeError: dataset has no column teacher_topk", flush=True)
        sys.exit(3)
    """)
    state = train(str(training_config(tmp_path, tmp_path / "out")), command=argv, return_state=True)
    assert state.is_failed()
    with pytest.raises(TrainingFailed, match="exited with code 3(.|\n)*no column teacher_topk"):
        state.result()


def test_train_command_reports_a_bad_config_in_one_paragraph(tmp_path):
    from distillflow.cli import app
    from typer.testing import CliRunner

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset_dir": "d", "output_dir": "o"}))
    result = CliRunner().invoke(app, ["train", str(bad)], env={"DISTILL_LOG_DIR": str(tmp_path / "logs")})
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "set `student`" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.deepspeed
def test_train_flow_runs_real_kd_topk_training_on_captured_logits(prefect_harness, tmp_path):
    """capture-logits → `distill train` on a tiny Llama: the kd_topk objective decodes the
    captured blobs, the flow streams the run and publishes its curve."""
    from distillflow.training.scratch import build_tiny_llama
    from distillflow.flows.train import train
    from distillflow.tasks.capture.logits import capture_dataset
    from tests.test_capture_logits import settings_for, write_dataset

    teacher = tmp_path / "teacher"
    build_tiny_llama(teacher, hidden_size=64, num_heads=2, num_layers=2, vocab_size=320, seed=1)
    dataset = write_dataset(tmp_path / "ds")
    capture_dataset(settings_for(teacher, dataset, dataset, max_length=64))

    out = tmp_path / "kd-run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "dataset_dir": str(dataset), "output_dir": str(out), "student": str(teacher),
        "teacher": str(teacher), "objective": "kd_topk", "max_length": 64, "max_steps": 2,
        "micro_batch_size": 2, "master_port": free_port(),
    }))
    state = train(str(config), timeout_s=540, return_state=True)
    assert state.is_completed(), state
    metrics = state.result()
    assert metrics["steps"] == 2 and metrics["objective"] == "kd_topk"
    steps, _ = read_metrics(out)
    assert [step["step"] for step in steps] == [1, 2], steps
    # the student starts as the teacher itself: its KD term starts at ~0 and is never negative
    assert all(step["kd"] >= -1e-6 for step in steps) and steps[1]["kd"] > 0, steps
    assert (out / "final" / "config.json").is_file()
