"""manifest.json (written last, atomically): what a build puts in it, and how it is read."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distillflow
from distillflow.storage.atomic import write_json_atomic

if TYPE_CHECKING:
    from distillflow.config import DistillConfig

MANIFEST_NAME = "manifest.json"


def build_manifest(
    config: DistillConfig,
    *,
    counts: dict[str, int],
    reject_reasons: dict[str, int],
    accepted_per_strategy: dict[str, int],
    prompt_report: dict[str, Any],
    teacher_usage: dict[str, Any],
    teacher_failures: dict[str, Any],
    build: dict[str, Any],
    stopped_by: str | None,
    budget: dict[str, Any] | None,
    elapsed_s: float,
    stage_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a finished build (`shards` are added when the dataset is swapped in).
    Raises when its invariant does not hold: every prompt that entered the build (`counts`:
    bad seed rows, generated prompts, generation rejects) ends accepted or rejected."""
    entered = counts["bad_seed_rows"] + counts["prompts_generated"] + counts["generation_rejects"]
    out = counts["accepted"] + counts["rejected"]
    manifest = {
        "format_version": 1,
        "name": config.name,
        "distillflow_version": distillflow.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config.redacted(),
        "counts": counts,
        "reject_reasons": reject_reasons,
        "accepted_per_strategy": accepted_per_strategy,
        "prompt_report": prompt_report,
        "teacher_usage": teacher_usage,
        "teacher_failures": teacher_failures,
        "build": build,
        "stopped_by": stopped_by,
        "budget": budget,
        "invariant": {"entered": entered, "accepted_plus_rejected": out, "holds": entered == out},
        "elapsed_s": elapsed_s,
        "stage_seconds": stage_seconds,
    }
    if entered != out:
        raise RuntimeError(f"internal error: {entered} prompts entered but {out} rows out")
    return manifest


def write_manifest(output_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(output_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {output_dir} is not a finished distillflow dataset "
            "(the manifest is written last; a missing one means the build did not complete)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def remove_manifest(output_dir: str | Path) -> None:
    """Mark a dataset as incomplete before rewriting its shards."""
    path = Path(output_dir) / MANIFEST_NAME
    if path.exists():
        path.unlink()
