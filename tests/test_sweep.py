"""`distill sweep`: the grid's points and names, strict keys, ranking, stale runs, and the
whole sweep (train + eval subflows) with a failing point, a rerun and a resumed point."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.config import ConfigError, parse_config
from distillflow.tasks.sweep.plan import expand_points, pareto_front, plan_sweep, point_name, prepare_point, rank_points, write_state
from distillflow.tasks.sweep.config import SweepConfig


def base_config(tmp_path: Path, sweep: dict) -> dict:
    (tmp_path / "ds" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "response": ["r"]}), tmp_path / "ds" / "data" / "part-00000.parquet")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    return {
        "name": "t",
        "output_dir": str(tmp_path / "ds"),
        "seeds": [{"path": str(tmp_path / "set.jsonl")}],
        "teacher": {"backend": "local", "model": str(tmp_path / "teacher")},
        "training": {
            "dataset_dir": str(tmp_path / "ds"),
            "output_dir": str(tmp_path / "run"),
            "teacher": str(tmp_path / "teacher"),
            "derive_student": {"num_layers": 2},
            "objective": "kd_topk",
        },
        "evaluation": {
            "output_dir": str(tmp_path / "eval"),
            "models": [{"name": "teacher", "path": str(tmp_path / "teacher")}],
            "eval_sets": [{"path": str(tmp_path / "set.jsonl")}],
            "reference_model": "teacher",
        },
        "sweep": {"output_dir": str(tmp_path / "sweep"), **sweep},
    }


def test_the_grid_expands_to_every_combination_with_readable_names():
    sweep = SweepConfig(
        output_dir="s",
        grid={"temperature": [1.0, 2.0, 4.0], "alpha": [0.25, 0.5, 1.0]},
        points=[{"objective": "sft"}, {"temperature": 1.0, "alpha": 0.25}],  # the second repeats a grid point
    )
    points = expand_points(sweep)
    assert len(points) == 10
    assert points[:3] == [{"temperature": 1.0, "alpha": a} for a in (0.25, 0.5, 1.0)]  # the last key varies fastest
    assert points[-1] == {"objective": "sft"}
    names = [point_name(p) for p in points]
    assert names[0] == "temperature=1_alpha=0.25" and names[-1] == "objective=sft"
    assert len(set(names)) == 10
    assert point_name({"derive_student": {"num_layers": 2, "hidden_size": 96}}) == "derive_student=L2-h96"
    assert point_name({"student": "/runs/small/final"}) == "student=small"


def test_unknown_fixed_and_empty_keys_are_errors_that_name_them(tmp_path):
    for sweep, needle in (
        ({"grid": {"temprature": [1.0]}}, "grid.temprature is not a training key"),
        ({"grid": {"output_dir": ["x"]}}, "the sweep sets output_dir itself"),
        ({"grid": {"alpha": []}}, "grid.alpha is an empty list"),
        ({}, "nothing to sweep"),
        ({"grid": {"alpha": [0.5]}, "paralel": 2}, "paralel"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config(base_config(tmp_path, sweep), "c.yaml")


def test_a_bad_value_fails_before_anything_runs_and_names_the_point(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)sweep point alpha=1.5.*training.alpha.*less than or equal to 1"):
        parse_config(base_config(tmp_path, {"grid": {"alpha": [0.5, 1.5]}}), "c.yaml")
    assert not (tmp_path / "sweep").exists()


def test_changed_settings_or_data_make_a_point_start_from_scratch(tmp_path):
    data = base_config(tmp_path, {"grid": {"alpha": [0.5]}})
    point = plan_sweep(parse_config(data, "c.yaml"), "c.yaml").points[0]
    prepare_point(point)
    (point.train_dir / "checkpoints").mkdir(parents=True)
    write_state(point, {"train_key": point.train_key, "train": {"steps": 1}})
    again = plan_sweep(parse_config(data, "c.yaml"), "c.yaml").points[0]
    assert again.train_key == point.train_key
    prepare_point(again)
    assert (point.train_dir / "checkpoints").is_dir()  # same settings and data: kept (resumable)

    data["training"]["learning_rate"] = 1e-3
    changed = plan_sweep(parse_config(data, "c.yaml"), "c.yaml").points[0]
    assert changed.train_key != point.train_key and changed.name == point.name
    prepare_point(changed)
    assert not point.train_dir.exists()  # old checkpoints belong to other settings

    data["training"]["learning_rate"] = 1e-4
    pq.write_table(pa.table({"id": ["b"], "prompt": ["q"], "response": ["s"]}), tmp_path / "ds" / "data" / "part-00000.parquet")
    assert plan_sweep(parse_config(data, "c.yaml"), "c.yaml").points[0].train_key != point.train_key


def test_ranking_by_accuracy_or_gap_puts_failed_points_last():
    results = [
        {"name": "a", "status": "done", "row": {"clean_acc": 0.5, "gap": 0.1}},
        {"name": "b", "status": "failed", "row": None},
        {"name": "c", "status": "reused", "row": {"clean_acc": 0.7, "gap": 0.3}},
        {"name": "d", "status": "done", "row": {"clean_acc": 0.6, "gap": 0.05}},
    ]
    assert [r["name"] for r in rank_points([dict(r) for r in results], "clean_acc")] == ["c", "d", "a", "b"]
    ranked = rank_points([dict(r) for r in results], "gap")
    assert [r["name"] for r in ranked] == ["d", "a", "c", "b"] and ranked[-1]["rank"] is None
    assert pareto_front([(1, 0.9), (2, 0.8), (1.5, 0.7), (3, 0.2)]) == [0, 1, 3]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_sweep_ranks_points_reuses_them_and_resumes_a_crashed_one(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((tiny_demo["workdir"] / "demo.yaml").read_text())
    config["training"].update(max_steps=3, checkpoint_every=0)
    config["sweep"] = {
        "output_dir": str(tmp_path / "sweep"),
        "grid": {"alpha": [0.25, 0.5]},  # the demo's sampled capture trains at T = 1 only
        "points": [{"deepspeed_config": str(tmp_path / "broken.json")}],  # fails when DeepSpeed reads it
        "retries": 0,
    }
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = CliRunner().invoke(app, ["sweep", "sweep.yaml"])
    assert result.exit_code == 1
    assert "1 of 3 sweep points failed: deepspeed_config=broken.json" in result.output

    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    points = {p["name"]: p for p in summary["points"]}
    assert set(points) == {"alpha=0.25", "alpha=0.5", "deepspeed_config=broken.json"}
    assert [p["rank"] for p in summary["points"]] == [1, 2, None]  # failed last, unranked
    for name in ("alpha=0.25", "alpha=0.5"):
        assert points[name]["status"] == "done" and points[name]["train"]["steps"] == 3
        assert points[name]["row"]["clean_acc"] is not None and points[name]["speedup"] > 0
    best = summary["points"][0]
    assert best["row"]["clean_acc"] >= summary["points"][1]["row"]["clean_acc"]
    best_config = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert best_config["training"]["alpha"] == best["settings"]["alpha"]
    for name in ("sweep.md", "sweep.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert summary["reference"]["name"] == "teacher" and summary["reference"]["row"]["tok_s_at_1"] > 0
    assert "alpha=0.25" in result.output and "failed:" in result.output

    # A point whose student is not a model directory is refused before anything runs.
    config["sweep"]["points"] = [{"student": str(tmp_path / "no-such-student")}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    refused = CliRunner().invoke(app, ["sweep", "bad.yaml"])
    assert refused.exit_code == 1 and "sweep point student=no-such-student" in refused.output
    assert not (tmp_path / "sweep" / "points" / "student=no-such-student").exists()

    # A rerun trains nothing that finished; the failing point is tried again.
    metrics = tmp_path / "sweep" / "points" / "alpha=0.25" / "train" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["sweep", "sweep.yaml"])
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {p["name"]: p["status"] for p in again["points"]}["alpha=0.25"] == "reused"
    assert again["timing"]["points_reused"] == 2 and again["timing"]["points_run"] == 1
    assert metrics.stat().st_mtime_ns == stamp

    # A point that crashed after its last checkpoint continues from it.
    point_dir = tmp_path / "sweep" / "points" / "alpha=0.5"
    state = json.loads((point_dir / "point.json").read_text())
    state.pop("train"), state.pop("row")
    (point_dir / "point.json").write_text(json.dumps({**state, "status": "failed"}))
    import shutil

    shutil.rmtree(point_dir / "train" / "final")
    CliRunner().invoke(app, ["sweep", "sweep.yaml"])
    final = json.loads((point_dir / "train" / "metrics.json").read_text())
    assert final["resumed_from_step"] == 3 and (point_dir / "train" / "final" / "config.json").is_file()
    assert {p["name"]: p["status"] for p in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]}["alpha=0.5"] == "done"
