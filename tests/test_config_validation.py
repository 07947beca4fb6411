"""`distill config FILE` rejects every config a later stage would reject on config grounds:
one bad config per rule across sections, each refused with a message naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from distillflow.cli import app

runner = CliRunner()

TRAINING = {"dataset_dir": "out", "output_dir": "run", "student": "student", "max_length": 256}
EVALUATION = {"output_dir": "eval", "models": [{"name": "student", "path": "run/final"}], "heldout": {}}

# (what is wrong, the sections that make it so, a key the message must name)
BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("capture.max_length != training.max_length",
     {"training": TRAINING, "capture": {"max_length": 512}}, "capture.max_length"),
    ("capture.chat_template != training's",
     {"chat_template": "plain", "training": TRAINING, "capture": {"chat_template": "{{ messages[0]['content'] }}"}},
     "capture.chat_template"),
    ("capture from vllm without a tokenizer",
     {"capture": {"source": "vllm", "model": "served"}}, "capture.tokenizer"),
    ("capture from vllm without a server",
     {"teacher": {"backend": "local", "model": "m", "base_url": None},
      "capture": {"source": "vllm", "tokenizer": "tok"}}, "capture.base_url"),
    ("sampled capture re-tempered by training",
     {"training": {**TRAINING, "objective": "kd_topk", "temperature": 2.0}, "capture": {"method": "sampled"}},
     "training.temperature"),
    ("training.holdout_fraction != evaluation.heldout.fraction",
     {"training": {**TRAINING, "holdout_fraction": 0.3}, "evaluation": {**EVALUATION, "heldout": {"fraction": 0.1}}},
     "training.holdout_fraction"),
    ("chat_template_stop without a chat_template",
     {"chat_template_stop": ["\nQ:"]}, "chat_template_stop"),
    ("training.chat_template_stop without a template",
     {"training": {**TRAINING, "chat_template_stop": ["\nQ:"]}}, "training.chat_template_stop"),
    ("a schedule for a stage the config lacks",
     {"schedule": {"train": {"cron": "0 3 * * *"}}}, "schedule.train"),
    ("a budget kept by several shard workers",
     {"teacher": {"model": "m", "max_total_tokens": 1000}, "dataset": {"workers": 2}}, "dataset.workers"),
    ("a budget split over replicas' client processes",
     {"teacher": {"model": "m", "base_url": ["http://a/v1", "http://b/v1"], "client_processes": 2,
                  "max_total_tokens": 1000}}, "teacher.max_budget_usd / max_total_tokens"),
    ("a work pool with an in-process teacher",
     {"teacher": {"backend": "local", "model": "m"}, "dataset": {"work_pool": "pool"}}, "dataset.work_pool"),
    ("mining.output_dir is the dataset",
     {"mining": {"dataset_dir": "out", "output_dir": "out", "student": "s"}}, "mining.output_dir"),
    ("mining without a student or a training section",
     {"mining": {"retrain": "none"}}, "mining.student"),
    ("mining.score kl with an endpoint teacher",
     {"training": TRAINING, "mining": {"score": "kl"}}, "mining.score"),
    ("mining.retrain without a training section",
     {"mining": {"student": "s"}}, "mining.retrain"),
    ("a sweep without a training section",
     {"evaluation": EVALUATION, "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5]}}}, "`training:`"),
    ("a sweep without an evaluation section",
     {"training": TRAINING, "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5]}}}, "`evaluation:`"),
    ("sweep.metric judge_win_rate without a judge",
     {"training": TRAINING, "evaluation": EVALUATION,
      "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5]}, "metric": "judge_win_rate"}}, "evaluation.judge"),
    ("sweep.metric agreement without heldout",
     {"training": TRAINING, "evaluation": {**EVALUATION, "heldout": None, "eval_sets": [{"path": "set.jsonl"}]},
      "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5]}, "metric": "agreement"}}, "evaluation.heldout"),
    ("a sweep point that is not a valid training section",
     {"training": TRAINING, "evaluation": EVALUATION, "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5, 1.5]}}},
     "training.alpha"),
    ("an eval set that is neither JSONL nor Parquet",
     {"evaluation": {**EVALUATION, "eval_sets": [{"path": "set.txt"}]}}, "evaluation.eval_sets.0.path"),
]


def write_config(directory: Path, sections: dict[str, Any]) -> Path:
    seeds = directory / "seeds.jsonl"
    seeds.write_text('{"prompt": "p"}\n', encoding="utf-8")
    data = {"name": "t", "output_dir": str(directory / "out"), "seeds": [{"path": str(seeds)}], "teacher": {"model": "m"}}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({**data, **sections}), encoding="utf-8")
    return path


def test_the_table_holds_a_good_config_apart_from_each_fault(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"training": TRAINING, "evaluation": EVALUATION, "capture": {}, "mining": {},
            "sweep": {"output_dir": "sweep", "grid": {"alpha": [0.5]}}}
    result = runner.invoke(app, ["config", str(write_config(tmp_path, good))])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


@pytest.mark.parametrize(("sections", "key"), [row[1:] for row in BAD_CONFIGS], ids=[row[0] for row in BAD_CONFIGS])
def test_distill_config_refuses_what_a_later_stage_would(tmp_path, monkeypatch, sections, key):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config", str(write_config(tmp_path, sections))])
    assert result.exit_code != 0, result.output
    assert "error:" in result.output and key in result.output, result.output
