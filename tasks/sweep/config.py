"""Config of `distill sweep` (the `sweep:` section): which training settings to try and how
to rank them. Unknown keys are errors; every point is validated as a full `training:`
section when the config loads, before anything trains."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from distillflow.base_config import StrictModel

if TYPE_CHECKING:
    from distillflow.training.config import TrainingConfig

# Keys a point may not set: where the run reads and writes is the sweep's business.
FIXED_TRAINING_KEYS = frozenset({"dataset_dir", "output_dir", "tokenized_cache_dir", "resume"})

Metric = Literal["clean_acc", "robust_acc", "gap", "agreement", "judge_win_rate"]
# Higher is better for every metric but the robustness gap.
LOWER_IS_BETTER = frozenset({"gap"})


class SweepConfig(StrictModel):
    """Train and evaluate one student per point of a grid (or a list of points) over
    `training:` keys, and rank them."""

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


def expand_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the grid (last key fastest), then the explicit points; repeats dropped."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[key] for key in keys))] if keys else []
    points += [dict(point) for point in sweep.points]
    unique: list[dict[str, Any]] = []
    seen: set[str] = set()
    for point in points:
        digest = json.dumps(point, sort_keys=True, default=str)
        if digest not in seen:
            seen.add(digest)
            unique.append(point)
    return unique


def point_training_data(base: TrainingConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """The `training:` keys of one point: the base section with the point's settings."""
    data = base.model_dump(mode="json", exclude_unset=False)
    if "student" in settings and settings["student"] is not None:
        data["derive_student"] = None  # a student dir replaces the derivation, and the other way round
    if "derive_student" in settings and settings["derive_student"] is not None:
        data["student"] = None
    data.update(settings)
    return data


def point_problems(base: TrainingConfig, sweep: SweepConfig) -> str | None:
    """What is wrong with the first point whose `training:` section does not validate, or None."""
    from pydantic import ValidationError

    from distillflow.training.config import TrainingConfig

    for settings in expand_points(sweep):
        try:
            TrainingConfig.model_validate(point_training_data(base, settings))
        except ValidationError as error:
            label = "_".join(f"{key}={value}" for key, value in settings.items())
            problems = "; ".join(f"training.{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            return f"sweep point {label}: {problems}"
    return None
