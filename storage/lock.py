"""One writer per output directory.

Two runs that write the same `output_dir` at once (two deployment runs with the same
parameters, a `distill build` started while a scheduled one runs) would share one staging
area: the second one's clean start removes the files the first is writing. `output_lock`
takes an exclusive `flock` on `output_dir/.distill.lock` for the length of a run; a second
run is refused at once with an error that names the holder. The kernel drops the lock when
its process ends, however it ends (SIGKILL included), so a rerun after a crash never waits
for a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from distillflow.failures import disk_writes

LOCK_NAME = ".distill.lock"


class OutputInUse(RuntimeError):
    """Another run holds the output directory."""


def _holder(handle: object) -> str:
    """Who holds the lock, as its holder wrote it: "pid 123 on host, distill build, since 12:00:01"."""
    try:
        handle.seek(0)  # type: ignore[attr-defined]
        info = json.loads(handle.read() or "{}")  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('what', 'a run')}, since {since})"


@contextlib.contextmanager
def output_lock(output_dir: str | Path, what: str) -> Iterator[None]:
    """Hold `output_dir` for this run (`what`: "build", "capture-logits", ...). Raises
    `OutputInUse` naming the other holder when another process holds it."""
    output_dir = Path(output_dir)
    path = output_dir / LOCK_NAME
    with disk_writes(path, "the output directory's lock file"):
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  # held open for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(
                f"{output_dir} is being written by {_holder(handle)}: two runs must not write one output "
                "directory at once. Wait for that run to finish (or stop it), or give this run another output_dir."
            ) from None
        with disk_writes(path, "the output directory's lock file"):
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}))
            handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock
