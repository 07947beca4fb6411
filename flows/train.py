"""`distill train CONFIG`: student training as a Prefect flow (one task: the hand-off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from distillflow.config import load_training_config
from distillflow.tasks.train.student import train_student


@flow(name="train")
def train(
    config_path: str,
    num_processes: int | None = None,
    command: list[str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    return train_student(config_path, num_processes=num_processes, command=command, timeout_s=timeout_s)


def train_command(config_path: str | Path, num_processes: int | None = None) -> dict[str, Any]:
    """Validate the config (and preflight its models), run the flow, print the final metrics."""
    from distillflow.tasks.preflight import preflight_training

    config = load_training_config(config_path)
    preflight_training(config, str(config_path))  # models, template, vocabulary, context
    metrics = train(str(config_path), num_processes=num_processes)
    shown = ", ".join(f"{key}={value}" for key, value in metrics.items() if not isinstance(value, dict | list))
    print(f"trained → {config.output_dir}: {shown}")
    return metrics
