"""Training checkpoints that a resume can trust.

DeepSpeed writes a checkpoint as a directory of files (`checkpoints/step-00000200/`) and
then a `latest` file naming it. A save cut short (a full disk, a SIGKILL between two files)
leaves a directory that looks like a checkpoint and is not one. So a checkpoint counts only
when its completion marker exists: `complete.json`, written atomically into its directory
after every process has written its files. A resume takes the newest checkpoint with a
marker and ignores the rest; a save prunes them.

A save that the file system refuses (no space, a quota, a read-only mount) raises
`DiskWriteError` naming the directory, the free space and the fix, and the partial
directory is removed (rank 0), so the previous checkpoint stays the one a rerun resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distillflow.failures import DiskWriteError, disk_message, disk_problem, filesystem_problem
from distillflow.storage.atomic import write_json_atomic

COMPLETE = "complete.json"  # the marker, written last into a checkpoint's directory
TAG_PREFIX = "step-"


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint directories with their completion marker, oldest first."""
    return sorted(path.parent for path in checkpoint_dir.glob(f"{TAG_PREFIX}*/{COMPLETE}"))


def incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint directories without their marker: saves that were cut short."""
    return sorted(path for path in checkpoint_dir.glob(f"{TAG_PREFIX}*") if path.is_dir() and not (path / COMPLETE).exists())


def resume_tag(checkpoint_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint, or None when there is none."""
    complete = complete_checkpoints(checkpoint_dir)
    return complete[-1].name if complete else None


def save_checkpoint(engine, checkpoint_dir: Path, step: int, keep: int, rank: int) -> None:  # engine: DeepSpeedEngine
    """Save the engine's state as `step-<step>`, mark it complete once every process has
    written its part, then keep only the newest `keep` complete checkpoints."""
    tag = checkpoint_tag(step)
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step}, save_latest=False)
    except Exception as error:
        refused = _refused(error, checkpoint_dir / tag)
        if refused is None:
            raise
        if rank == 0:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)  # never resumed from: no marker
        raise refused from error
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process's files are written
    if rank == 0:
        write_json_atomic(checkpoint_dir / tag / COMPLETE, {"step": step})
        (checkpoint_dir / "latest").write_text(tag)  # for DeepSpeed's own tools (zero_to_fp32)
        prune_checkpoints(checkpoint_dir, keep)


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Remove cut-short checkpoints and all but the newest `keep` complete ones."""
    for path in incomplete_checkpoints(checkpoint_dir) + complete_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _refused(error: BaseException, tag_dir: Path) -> DiskWriteError | None:
    """A failed save as a `DiskWriteError` when the file system refused it. torch reports a
    full disk as a RuntimeError ("file write failed"), so the file system is asked too."""
    problem = disk_problem(error) or filesystem_problem(tag_dir)
    return DiskWriteError(disk_message(problem, tag_dir, "the training checkpoint")) if problem else None
