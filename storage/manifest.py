"""manifest.json (written last, atomically) and the dataset card."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from distillflow.failures import disk_writes

MANIFEST_NAME = "manifest.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` to `path` via a temp file, fsync, then rename. A full disk (or a
    read-only one) raises `DiskWriteError` and leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_writes(path, "the JSON file"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=False, ensure_ascii=False, default=str)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the original error is the one to report
                tmp.unlink(missing_ok=True)
            raise


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
