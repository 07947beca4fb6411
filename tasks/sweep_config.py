"""Config of `distill sweep` (the `sweep:` section): which training settings to try and how
to rank them. Unknown keys are errors; every point is validated as a full `training:`
section when the config loads, before anything trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Keys a point may not set: where the run reads and writes is the sweep's business.
FIXED_TRAINING_KEYS = frozenset({"dataset_dir", "output_dir", "tokenized_cache_dir", "resume"})

Metric = Literal["clean_acc", "robust_acc", "gap", "agreement", "judge_win_rate"]
# Higher is better for every metric but the robustness gap.
LOWER_IS_BETTER = frozenset({"gap"})


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Field(
        ...,
        description="Sweep directory: points/<name>/ (config.yaml, train/, eval/, point.json) per point, "
        "reference/ (the reference model's eval), sweep.json, sweep.md, sweep.png, best.yaml.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Training keys and the values to try; every combination is a point (in the "
        "order given, the last key varying fastest). Any `training:` key but dataset_dir, "
        "output_dir, tokenized_cache_dir and resume, e.g. objective, temperature, alpha, divergence, "
        "learning_rate, derive_student (a list of mappings) or student (a list of model dirs).",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra points, each a mapping of training keys to one value (after the grid's).",
    )
    metric: Metric = Field(
        "clean_acc",
        description="Ranking: clean_acc, robust_acc, agreement, judge_win_rate (higher is better) or "
        "gap (clean minus robust accuracy, lower is better).",
    )
    parallel: int = Field(1, ge=1, le=64, description="Points trained and evaluated at once (1 on a CPU).")
    retries: int = Field(
        1, ge=0, le=10, description="Times a failed point is tried again (training resumes from its last checkpoint)."
    )

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give at least one value or remove the key")
        return grid

    @model_validator(mode="after")
    def _keys(self) -> SweepConfig:
        from distillflow.training.config import TrainingConfig

        if not self.grid and not self.points:
            raise ValueError("nothing to sweep: give `grid` (key: [values]) and/or `points` (a list of mappings)")
        known = set(TrainingConfig.model_fields) - FIXED_TRAINING_KEYS
        used = [("grid", key) for key in self.grid] + [
            (f"points[{index}]", key) for index, point in enumerate(self.points) for key in point
        ]
        for where, key in used:
            if key in FIXED_TRAINING_KEYS:
                raise ValueError(f"{where}.{key}: the sweep sets {key} itself (one run directory per point); remove it")
            if key not in known:
                raise ValueError(
                    f"{where}.{key} is not a training key; sweepable keys: {', '.join(sorted(known))}"
                )
        return self
