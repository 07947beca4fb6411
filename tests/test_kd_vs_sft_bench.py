"""bench/kd_vs_sft.py: who each student is compared with, and which trained students a rerun reuses."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    """bench/kd_vs_sft.py as `bench.kd_vs_sft`, the way scripts/render_tables.py imports it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.kd_vs_sft")


def test_each_kd_student_is_paired_with_sft_at_its_own_learning_rate():
    bench = load_bench()
    # At the demo's rate, `sft` itself trains at 3.75e-4: every KD student at that rate meets it.
    present = ["sft", "sft_eighth_lr", "kd_topk", "kd_sampled_eighth_lr", "kd_sampled_half_lr", "sft_half_lr"]
    assert bench.sft_of("kd_topk", 3.75e-4, present) == "sft"
    assert bench.sft_of("kd_sampled_eighth_lr", 3.75e-4, present) == "sft"
    assert bench.sft_of("kd_sampled_half_lr", 3.75e-4, present) == "sft_half_lr"
    # At 3e-3 (the first tables), `sft` is at 3e-3 and the eighth-rate KD student meets sft_eighth_lr.
    assert bench.sft_of("kd_sampled_eighth_lr", 3e-3, present) == "sft_eighth_lr"
    assert bench.sft_of("kd_topk", 3e-3, present) == "sft"
    assert bench.sft_of("sft_eighth_lr", 3e-3, present) == "sft"
    assert bench.sft_of("kd_greybox", 3e-3, present) == "sft_bpe"
    # A student of another shape meets sft of its own shape.
    small = ["sft_small", "sft_small_quarter_lr", "kd_sampled_small", "kd_sampled_small_quarter_lr"]
    assert bench.sft_of("kd_sampled_small_quarter_lr", 3.75e-4, small) == "sft_small_quarter_lr"
    assert bench.sft_of("kd_sampled_small", 3.75e-4, small) == "sft_small"
    assert bench.sft_of("sft_small_quarter_lr", 3.75e-4, small) == "sft_small"
    assert [name for name in bench.OBJECTIVES if bench.uses_sampled_capture(name)] == [
        "kd_sampled", "kd_sampled_half_lr", "kd_sampled_quarter_lr", "kd_sampled_eighth_lr",
        "kd_sampled_small", "kd_sampled_small_quarter_lr",
    ]  # fmt: skip


def test_a_rerun_reuses_a_student_only_if_it_was_trained_with_the_same_settings(tmp_path, monkeypatch):
    bench = load_bench()
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    dataset = tmp_path / "dataset"
    trained = []

    def fake_training(command, **kwargs):  # what `python -m distillflow.training.train` leaves behind
        run = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
        final = Path(run["training"]["output_dir"]) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        trained.append(run["training"]["learning_rate"])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_training)
    first = bench.train_student(config, tmp_path, "sft-seed0", dataset, None, seed=0, objective="sft", learning_rate=3e-3)
    again = bench.train_student(config, tmp_path, "sft-seed0", dataset, None, seed=0, objective="sft", learning_rate=3e-3)
    assert again == first and trained == [3e-3]  # the same settings: reused, not trained again

    with pytest.raises(SystemExit, match="trained with other settings") as refused:
        bench.train_student(config, tmp_path, "sft-seed0", dataset, None, seed=0, objective="sft", learning_rate=3.75e-4)
    assert "--workdir" in str(refused.value) and trained == [3e-3]
    # The refused run did not overwrite the record of how the student was trained.
    record = yaml.safe_load((tmp_path / "configs" / "sft-seed0.yaml").read_text())
    assert record["training"]["learning_rate"] == 3e-3


def test_a_second_stage_starts_from_the_first_stages_student_of_its_seed(tmp_path, monkeypatch):
    bench = load_bench()
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    runs = []

    def fake_training(command, **kwargs):
        run = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
        final = Path(run["training"]["output_dir"]) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        runs.append(run["training"])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_training)
    data = tmp_path / "dataset"
    trainings = [
        (f"{objective}-seed{seed}", data, {"init": None, "max_steps": 1200, "seed": seed, **bench.OBJECTIVES[objective]})
        for seed in (0, 1) for objective in ("on_policy_after_kd_sampled", "kd_sampled")
    ]  # fmt: skip
    students = bench.train_in_stages(config, tmp_path, trainings, jobs=2)
    assert [run["objective"] for run in runs] == ["kd_topk", "kd_topk", "on_policy", "on_policy"]
    for seed in (0, 1):
        second = yaml.safe_load((tmp_path / "configs" / f"on_policy_after_kd_sampled-seed{seed}.yaml").read_text())["training"]
        assert second["student"] == str(students[f"kd_sampled-seed{seed}"])
        assert second["derive_student"] is None and second["teacher"] == config["training"]["teacher"]
        assert (second["lmbda"], second["max_steps"], second["seed"]) == (1.0, 300, seed)
        assert "from" not in second


def test_a_second_stage_without_its_first_is_refused(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["kd_vs_sft.py", "--objectives", "sft", "on_policy_after_kd_sampled"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "list kd_sampled too" in capsys.readouterr().err
