"""manifest.json (written last, atomically): what a build puts in it, and how it is read.

Outside storage/, a manifest is read as a `Manifest` (`load_manifest`, `Manifest.of`): the keys
readers use are typed fields, and a file that lacks one or holds the wrong type is refused
with the file and the field named. Keys a writer adds that no reader needs stay as extras and
are written back unchanged.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

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
        "created_at": datetime.now(UTC).isoformat(),
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


class ManifestError(ValueError):
    """A manifest.json that is not one distillflow wrote (or one from a version it cannot read)."""


class Manifest(BaseModel):
    """A dataset's manifest.json, typed. `counts`: a build's has `accepted`, `rejected` and the
    prompt side's counts, `distill dedup`'s also `input_rows`, `distill mine`'s `mined`; a
    dataset written by other tools may have none. `shards` lists the files of each part
    (`data`, `rejects`) with their rows, bytes and sha256."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    format_version: int = 1
    created_at: str | None = None
    config: dict[str, Any] = {}
    counts: dict[str, int] = {}
    reject_reasons: dict[str, int] = {}
    filter_reject_reasons: dict[str, int] = {}
    accepted_per_strategy: dict[str, int] = {}
    prompt_report: dict[str, Any] = {}
    teacher_usage: dict[str, Any] = {}
    teacher_failures: dict[str, Any] = {}
    teacher_logprobs: dict[str, Any] | None = None  # what the build's stored API logprobs cover
    stopped_by: str | None = None
    elapsed_s: float = 0.0
    shards: dict[str, list[dict[str, Any]]] = {}
    capture: dict[str, Any] | None = None  # `distill capture-logits`: what was captured, how
    mining: dict[str, Any] | None = None  # `distill mine`: the parent, the scores, what was kept

    @property
    def accepted(self) -> int:
        """Rows in the dataset: its count, else the rows its data shards list."""
        if "accepted" in self.counts:
            return self.counts["accepted"]
        return sum(int(shard.get("rows", 0)) for shard in self.shards.get("data", []))

    @property
    def rejected(self) -> int:
        return self.counts.get("rejected", 0)

    @property
    def output_dir(self) -> str | None:
        """Where the build that wrote it was told to write (its config's `output_dir`)."""
        return self.config.get("output_dir")

    def shard_digests(self, part: str = "data") -> dict[str, str]:
        """Relative shard path → sha256, as the writer recorded them."""
        return {shard["path"]: shard["sha256"] for shard in self.shards.get(part, []) if "sha256" in shard}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def of(cls, data: dict[str, Any], source: str = "the manifest") -> Manifest:
        """`data` (a manifest as a flow returns it or a file holds it) as a Manifest."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ManifestError(
                f"{source} is not a manifest this version of distillflow can read ({fields}); "
                "rebuild the dataset, or point at the directory `distill build` wrote"
            ) from None


def load_manifest(output_dir: str | Path) -> Manifest:
    """The manifest of a finished dataset, typed (FileNotFoundError when there is none)."""
    path = Path(output_dir) / MANIFEST_NAME
    try:
        data = read_manifest(output_dir)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); rebuild the dataset") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} holds a JSON {type(data).__name__}, not an object; rebuild the dataset")
    return Manifest.of(data, str(path))


def _replace_shard_entries(value: Any, shards: dict[str, dict[str, Any]]) -> Any:
    """Every {"path": ..., "sha256": ...} entry of the manifest whose path was rewritten gets
    the new rows / bytes / sha256 (the manifest layout may nest shard lists)."""
    if isinstance(value, dict):
        if value.get("path") in shards and "sha256" in value:
            return {**value, **shards[value["path"]]}
        return {key: _replace_shard_entries(item, shards) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_shard_entries(item, shards) for item in value]
    return value


def captured_manifest(source: dict[str, Any], rewritten: dict[str, dict[str, Any]], capture: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a dataset after `distill capture-logits`: its input's (`source`), the
    entries of the `rewritten` shards (path → rows, bytes, sha256) updated, and `capture`."""
    return {**_replace_shard_entries(source, rewritten), "capture": capture}


def mined_manifest(
    parent: Manifest, parent_dir: Path, parent_rows: int, mined_per_strategy: dict[str, int], mining: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of `distill mine`'s dataset: the parent's (less its shards and capture),
    renamed `<parent>-mined`, its rows plus the mined ones (`mining["kept"]`), and `mining`."""
    inherited = {key: value for key, value in parent.to_dict().items() if key not in ("shards", "capture")}
    return {
        **inherited,
        "name": f"{parent.name}-mined",
        "created_at": datetime.now(UTC).isoformat(),
        "counts": {**parent.counts, "accepted": parent_rows + mining["kept"], "mined": mining["kept"]},
        "accepted_per_strategy": {**parent.accepted_per_strategy, **mined_per_strategy},
        "mining": mining,
    }
