"""`distill demo` end to end at tiny budgets: every stage runs and the table has every row."""

from __future__ import annotations

import json

import pytest

from distillflow.flows.demo import DEMO_CONFIG, KD_STUDENT, OWN_VOCABULARY_STUDENTS, STUDENTS


@pytest.mark.slow
@pytest.mark.deepspeed
def test_short_demo_trains_every_student_and_evaluates_them(tiny_demo):
    tmp_path, budget, result = tiny_demo["workdir"], tiny_demo["budget"], tiny_demo["result"]

    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] > 0
    rows = {row["model"]: row for row in result["report"]["table"]}
    assert list(rows) == ["teacher", *STUDENTS]
    for name in STUDENTS:
        assert (tmp_path / "students" / name / "final" / "config.json").is_file()
        assert rows[name]["params"] * 4 <= rows["teacher"]["params"]  # at most 1/4 of the teacher
        assert rows[name]["tok_s_at_1"] > 0 and rows[name]["robust_acc"] is not None
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["table"] == result["report"]["table"]
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "chart.png").is_file()
    # the reference student learns from true answers of the same prompts
    assert 0 < result["training"]["reference"]["steps"] == budget.student_steps
    # the own-vocabulary students: one BPE of their own, not the teacher's; kd_greybox's
    # targets are the teacher's top-k aligned onto it
    from distillflow.training.vocabulary import load_tokenizer

    own = load_tokenizer(tmp_path / "student-bpe-init").get_vocab()
    assert all(load_tokenizer(tmp_path / "students" / name / "final").get_vocab() == own for name in OWN_VOCABULARY_STUDENTS)
    assert own != load_tokenizer(result["training"]["kd_sampled"]["final_dir"]).get_vocab()
    # the default KD student learned from the sampled capture; each training kept its log
    assert result["training"][KD_STUDENT]["objective"] == "kd_topk"
    last_step = json.loads((tmp_path / "students" / KD_STUDENT / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_step["kd"] > 0
    assert all("trained →" in (tmp_path / "students" / name / "train.log").read_text() for name in STUDENTS)
    # every student at configs/demo.yaml's settings: its learning rate, steps and batch
    settings = ("learning_rate", "max_steps", "micro_batch_size", "packing", "seed", "warmup_steps")
    demo = _training(DEMO_CONFIG) | {"max_steps": budget.student_steps, "seed": budget.seed}
    for name in STUDENTS:
        training = _training(tmp_path / f"student-{name}.yaml")
        assert {key: training.get(key) for key in settings} == {key: demo.get(key) for key in settings}, name
    coverage = result["training"]["kd_greybox"]["greybox_coverage"]
    assert coverage["exact"] + coverage["merged"] > 0 and coverage["rows_without_logprobs"] == 0


def _training(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))["training"]


def _processes_with(text: str) -> list[int]:
    """Pids whose command line contains `text`."""
    from pathlib import Path

    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.deepspeed
def test_a_failed_training_stops_the_others_and_quotes_its_log(tmp_path, monkeypatch):
    """Two `distill train` at once: the one whose config is wrong fails the demo with its
    log's end and its name, and the other one (a long training) is stopped, nothing left."""
    import time

    import yaml

    from distillflow.flows.demo import DemoFailed, train_in_parallel
    from tests.fixtures import build_tiny_setup_once

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the trainings run with no server
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    tiny = build_tiny_setup_once(tmp_path / "tiny", num_rows=8)
    long_run = {"training": {"dataset_dir": str(tiny["dataset"]), "output_dir": str(tmp_path / "students" / "long"),
                             "student": str(tiny["student"]), "objective": "sft", "max_steps": 100000,
                             "log_every": 1, "checkpoint_every": 0}}  # fmt: skip
    broken = {"training": {**long_run["training"], "output_dir": str(tmp_path / "students" / "broken"), "alhpa": 0.5}}
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long_run))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    started = time.monotonic()
    with pytest.raises(DemoFailed, match="training the broken student exited with code 1") as error:
        train_in_parallel([("long", tmp_path / "long.yaml"), ("broken", tmp_path / "broken.yaml")], tmp_path / "students", 2)
    assert "alhpa" in str(error.value)  # the end of its log names the wrong key
    assert time.monotonic() - started < 120
    assert _processes_with(str(tmp_path / "long.yaml")) == []
    assert _processes_with(str(tmp_path / "students" / "long")) == []  # its trainer too


@pytest.mark.deepspeed
def test_ctrl_c_stops_the_parallel_trainings_in_seconds(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while two students train:
    the command exits 130 within seconds and no `distill train` or trainer is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.fixtures import build_tiny_setup_once

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the trainings run with no server
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    tiny = build_tiny_setup_once(tmp_path / "tiny", num_rows=8)
    jobs = []
    for name in ("a", "b"):
        run = {"training": {"dataset_dir": str(tiny["dataset"]), "output_dir": str(tmp_path / "students" / name),
                            "student": str(tiny["student"]), "objective": "sft", "max_steps": 100000,
                            "log_every": 1, "checkpoint_every": 0}}  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(run))
        jobs.append((name, str(tmp_path / f"{name}.yaml")))
    script = (
        "from pathlib import Path\n"
        "from distillflow.interrupt import exit_on_signals\n"
        "from distillflow.flows.demo import train_in_parallel\n"
        "with exit_on_signals():\n"
        f"    train_in_parallel([(n, Path(p)) for n, p in {jobs!r}], Path({str(tmp_path / 'students')!r}), 2)\n"
    )
    log = (tmp_path / "command.log").open("w")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not all((tmp_path / "students" / name / "metrics.jsonl").is_file() for name in ("a", "b")):
        assert process.poll() is None, (tmp_path / "command.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the trainings never started"
        time.sleep(0.2)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) == 130, (tmp_path / "command.log").read_text()[-3000:]
    assert time.monotonic() - sent < 10
    for name in ("a", "b"):
        assert _processes_with(str(tmp_path / f"{name}.yaml")) == []
        assert _processes_with(str(tmp_path / "students" / name)) == []
