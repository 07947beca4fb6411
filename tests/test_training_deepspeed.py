"""DeepSpeed on CPU, end to end through `python -m training.train` (subprocesses, gloo).

One 1-process reference run (ZeRO-2, 4 steps, checkpoint every 2) is shared: 2-process
ZeRO-2 and ZeRO-3 runs must reproduce its loss curve, a run resumed from its step-2
checkpoint must reproduce steps 3-4, and its export must load with from_pretrained.
Global batch: 1 process x 2 accumulation steps x 2 rows = 2 processes x 1 x 2 rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, free_port
from distillflow.training.launch import build_launch_command, launch_env

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

STEPS = 4
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.fixtures import build_tiny_setup_once

    return build_tiny_setup_once(tmp_path_factory.getbasetemp() / "tiny-distill", num_rows=16)


def run_training(tiny, output_dir: Path, processes: int, **overrides) -> list[dict]:
    section = {
        "dataset_dir": str(tiny["dataset"]),
        "output_dir": str(output_dir),
        "tokenized_cache_dir": str(output_dir.parent / "tokenized"),
        "student": str(tiny["student"]),
        "teacher": str(tiny["teacher"]),
        "objective": "kd_logits",
        "divergence": "jsd",
        "max_length": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2 // processes,
        "learning_rate": 3e-3,
        "max_steps": STEPS,
        "checkpoint_every": 2,
        "loss_chunk_tokens": 16,
        "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
    } | overrides
    config = output_dir.parent / f"{output_dir.name}.yaml"
    config.write_text(yaml.safe_dump({"training": section}))
    env = launch_env() | {
        "DISTILLFLOW_SHM_COMM": "0",  # skip the shared-memory all-reduce C++ build
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        build_launch_command(config, processes, master_port=free_port()),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ds") / "one-process"
    return output_dir, run_training(tiny, output_dir, processes=1)


def losses(metrics: list[dict]) -> list[float]:
    return [record["loss"] for record in metrics]


def test_one_process_run_learns_and_writes_its_outputs(reference):
    output_dir, metrics = reference
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= metrics[0].keys()
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    summary = json.loads((output_dir / "metrics.json").read_text())
    assert summary["steps"] == STEPS and summary["params"] > 0 and summary["tokens_per_s"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_reproduce_the_one_process_loss_curve(tiny, reference, tmp_path, stage):
    reference_dir, reference_metrics = reference
    settings = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    # partition every parameter, however small (the default keeps tiny ones whole)
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    deepspeed_config = tmp_path / f"zero{stage}.json"
    deepspeed_config.write_text(json.dumps(settings))
    extra = {}
    if stage == 3:  # and partition the teacher too (ZeRO-3 inference: no optimizer state)
        teacher_settings = json.loads((ROOT / "configs" / "deepspeed" / "zero3_inference.json").read_text())
        teacher_settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "teacher.json").write_text(json.dumps(teacher_settings))
        extra = {"teacher_zero3_inference": True, "teacher_deepspeed_config": str(tmp_path / "teacher.json")}
    metrics = run_training(
        tiny, tmp_path / f"zero{stage}", processes=2, deepspeed_config=str(deepspeed_config), **extra
    )
    assert losses(metrics) == pytest.approx(losses(reference_metrics), rel=1e-4, abs=1e-5)
    # the exported weights agree too (ZeRO-3 gathers its partitions for save_pretrained)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / f"zero{stage}" / "final").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference_dir / "final").state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(exported[name], tensor, atol=1e-4), name


def test_resume_from_a_checkpoint_continues_the_same_loss_curve(tiny, reference, tmp_path):
    reference_dir, reference_metrics = reference
    # An interrupted run: only the step-2 checkpoint and the first two metric lines exist.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(reference_dir, resumed_dir)
    checkpoints = resumed_dir / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{STEPS:08d}")
    (checkpoints / "latest").write_text("step-00000002")
    shutil.rmtree(resumed_dir / "final")
    (resumed_dir / "metrics.json").unlink()
    metrics = run_training(tiny, resumed_dir, processes=1)
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    assert losses(metrics) == pytest.approx(losses(reference_metrics), rel=1e-6, abs=1e-7)
    assert json.loads((resumed_dir / "metrics.json").read_text())["resumed_from_step"] == 2


def test_rerunning_a_finished_run_keeps_its_curve_and_reports_its_last_loss(tiny, reference, tmp_path):
    reference_dir, reference_metrics = reference
    again_dir = tmp_path / "again"
    shutil.copytree(reference_dir, again_dir)
    metrics = run_training(tiny, again_dir, processes=1)
    assert losses(metrics) == losses(reference_metrics)  # nothing retrained, nothing lost
    summary = json.loads((again_dir / "metrics.json").read_text())
    assert summary["resumed_from_step"] == STEPS
    assert summary["final_loss"] == pytest.approx(reference_metrics[-1]["loss"])
    assert summary["tokens_per_s"] is None


def test_exported_student_loads_with_from_pretrained(tiny, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, _ = reference
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny["student"])
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values()))
    assert changed  # it is the trained student, not a copy of the initial one
