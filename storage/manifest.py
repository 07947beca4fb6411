"""manifest.json (written last, atomically) and the dataset card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillflow.storage.atomic import write_json_atomic

MANIFEST_NAME = "manifest.json"


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
