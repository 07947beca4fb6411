"""Config of `distill mine` (the `mining:` section): hard-prompt mining around a dataset.

Candidates come from the project's own generators (the `prompts:` section's edge-case,
adversarial, evolve and domain settings) seeded with the dataset's prompts; the teacher
answers them; the current student is scored on each; the hardest join a new version of
the dataset, and the student is trained again on it and evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distillflow.base_config import StrictModel

CANDIDATE_FAMILIES = ("edge_case", "adversarial", "evolve", "self_instruct")


class MiningConfig(StrictModel):
    """Mine prompts the student gets wrong: generate candidates, let the teacher answer
    them, score the student against the teacher, add the hardest to a new dataset
    version, and retrain."""

    dataset_dir: Path | None = Field(
        None, description="The dataset to mine around (default: training.dataset_dir, else output_dir)."
    )
    output_dir: Path | None = Field(
        None,
        description="The new dataset version: the parent's rows plus the mined ones (default: "
        "<dataset_dir>-mined). candidates.parquet beside data/ keeps every scored candidate.",
    )
    student: Path | None = Field(
        None, description="The current student, a model directory (default: <training.output_dir>/final)."
    )
    candidates: int = Field(2000, ge=1, le=10_000_000, description="Candidate prompts to generate and score.")
    strategies: dict[str, float] = Field(
        default_factory=lambda: {"adversarial": 1.0, "edge_case": 0.5},
        description="Generator families of the candidates and their mix weights: edge_case, adversarial, "
        "evolve, self_instruct (their settings are the `prompts:` section's).",
    )
    keep: int = Field(500, ge=1, description="Candidates added to the dataset (the hardest, or a random draw).")
    max_share_per_kind: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="At most this share of the kept rows from one kind (e.g. adversarial:typo), so one "
        "generator does not take over; the rest are filled from the next-hardest of other kinds.",
    )
    score: Literal["auto", "ce", "kl", "disagreement"] = Field(
        "auto",
        description="How far the student is from the teacher on a candidate: ce (student's mean "
        "cross-entropy per token of the teacher's answer), kl (mean per-token KL(teacher || student), "
        "needs an in-process teacher with the student's vocabulary), disagreement (1 - token F1 of "
        "the student's greedy answer against the teacher's; black-box). auto: kl for white-box "
        "objectives with a local teacher, else ce.",
    )
    selection: Literal["hardest", "random"] = Field(
        "hardest", description="hardest: the top scores; random: the same count drawn at random (a control)."
    )
    retrain: Literal["from_scratch", "continue", "none"] = Field(
        "from_scratch",
        description="After mining: train the student again on the new dataset from its initialisation, "
        "continue from the current student, or stop (none).",
    )
    train_output_dir: Path | None = Field(
        None, description="Run directory of the retrained student (default: <training.output_dir>-mined)."
    )
    eval_output_dir: Path | None = Field(
        None, description="Where the retrained student's eval goes (default: <evaluation.output_dir>-mined)."
    )
    batch_size: int = Field(32, ge=1, description="Sequences per forward pass when scoring.")
    random_seed: int = Field(0, description="Seed of the candidate generators and of the random selection.")

    @field_validator("strategies")
    @classmethod
    def _families(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(CANDIDATE_FAMILIES))
        if unknown:
            raise ValueError(
                f"strategies: unknown {unknown}; candidates come from {', '.join(CANDIDATE_FAMILIES)} "
                "(seed prompts are already in the dataset)"
            )
        if not any(weight > 0 for weight in value.values()) or any(weight < 0 for weight in value.values()):
            raise ValueError("strategies: give at least one family a weight > 0 (and none below 0)")
        return value

    @model_validator(mode="after")
    def _counts(self) -> MiningConfig:
        if self.keep > self.candidates:
            raise ValueError(f"keep ({self.keep}) is more than candidates ({self.candidates}); raise candidates")
        return self
