"""`distill demo`: the whole pipeline on the embedded default, on CPU, offline.

1. a tiny local teacher (trained on first use, cached in `.cache/demo`),
2. `build_dataset` with the in-process teacher: seed, edge-case and adversarial prompts,
3. `train` a student derived from the teacher (every other layer) with DeepSpeed ZeRO-2,
4. a summary of the dataset and the training metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def demo_config(workdir: Path, teacher_dir: Path) -> dict[str, Any]:
    """configs/demo.yaml with the teacher, the output dirs and a training section filled in."""
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    config["output_dir"] = str(workdir / "dataset")
    config["seeds"] = [
        {**seed, "path": str((ROOT / seed["path"]) if not Path(seed["path"]).is_absolute() else seed["path"])}
        for seed in config["seeds"]
    ]
    config["teacher"]["model"] = str(teacher_dir)
    config.setdefault("training", {})
    config["training"] = {
        "dataset_dir": str(workdir / "dataset"),
        "output_dir": str(workdir / "student"),
        "teacher": str(teacher_dir),
        "derive_student": {"layer_stride": 2},
        "objective": "sft",
        "max_length": 256,
        "micro_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 30,
        "log_every": 5,
        "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
        **config["training"],
    }
    return config


def demo_command(workdir: str | Path = "runs/demo", train_student: bool = True) -> dict[str, Any]:
    from distillflow.demo import ensure_demo_teacher
    from flows.build import build_command
    from storage.inspect import inspect_dataset

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print("[demo] preparing the tiny local teacher (first run trains it, ~1 min)…", file=sys.stderr, flush=True)
    teacher_dir = ensure_demo_teacher(ROOT / ".cache" / "demo")
    config_path = workdir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(workdir, teacher_dir), sort_keys=False), encoding="utf-8")

    print(f"[demo] building the dataset ({config_path})…", file=sys.stderr, flush=True)
    manifest = build_command(config_path)
    print(inspect_dataset(workdir / "dataset", samples=3))
    result: dict[str, Any] = {"dataset": str(workdir / "dataset"), "counts": manifest["counts"]}
    if train_student:
        from flows.train import train_command

        print("[demo] training a student with DeepSpeed (ZeRO-2, CPU)…", file=sys.stderr, flush=True)
        result["training"] = train_command(config_path)
        result["student"] = str(workdir / "student" / "final")
    print(f"[demo] done: dataset in {workdir / 'dataset'}; student in {workdir / 'student'}", file=sys.stderr)
    return result
