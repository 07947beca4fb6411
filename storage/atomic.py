"""Atomic file writes: every file the project writes goes to a temporary name beside its
target, is flushed to disk, and is renamed into place, so a reader sees the old file or
the whole new one, never a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillflow.failures import disk_writes


@contextlib.contextmanager
def atomic_path(path: Path, what: str = "the file") -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends, the file is fsynced and
    renamed onto `path`. An error leaves `path` as it was and no temporary file behind; a
    full (or read-only) disk raises `DiskWriteError` naming `what` it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_writes(path, what):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the original error is the one to report
                tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: Path, text: str, what: str = "the file") -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON (and a final newline) to `path` atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"
    write_text_atomic(path, text, "the JSON file")
