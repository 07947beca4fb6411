"""The build's shard writer: response filters and shard files in a process of their own.

During the teacher stage one event-loop thread issues every request, and it needs the
interpreter lock for nearly all of its time. Filtering the answered rows and writing the
Parquet files in the same process takes that lock from it (~25 µs a row, about 3 % of the
stage at the default settings), so a large build hands them to `ShardWriterProcess`: a
child process (`python -m distillflow.tasks.build.shard_writer`, a fresh interpreter) that
runs a `tasks.build.shards.ShardCollector`: it filters each batch of rows as it is answered
(`add`) and writes a shard's files when its last batch is in (`write`), exactly as the
build's own `ShardCollector` would (tests/test_streaming_build.py compares the two).

The child ignores SIGINT (the build decides when to stop, and `close` ends the child at
once), exits when the build's end of the pipe closes (the build died), and every wait for
it is bounded: a child that dies is reported with its exit code, and one that does not
answer within `timeout_s` is killed and reported.
"""

from __future__ import annotations

import contextlib
import subprocess
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from distillflow.failures import DiskWriteError
from distillflow.records import Reject
from distillflow.storage.parquet import AnsweredRow
from distillflow.tasks.child import child_connections, start_child
from distillflow.tasks.filters.config import FiltersConfig

WRITE_TIMEOUT_S = 600.0  # the longest a shard's write may take (a 50,000-row shard takes ~3 s)


class ShardWriterError(RuntimeError):
    """The shard writer process failed, died or stopped answering."""


class ShardWriterProcess:
    """A child process that filters answered rows and writes shard files (see module doc)."""

    def __init__(
        self, filters: FiltersConfig, staging: Path, with_top_logprobs: bool, timeout_s: float = WRITE_TIMEOUT_S
    ) -> None:
        self._process, self._to_child, self._from_child = start_child(__name__)  # tasks/child.py
        self.timeout_s = timeout_s
        self._send(("start", filters.model_dump(mode="json"), str(staging), with_top_logprobs))

    def add(self, index: int, rows: list[AnsweredRow], teacher_rejects: Sequence[Reject] = ()) -> None:
        """`ShardCollector.add` in the child: filter `rows` into shard `index`."""
        self._send(("add", index, rows, list(teacher_rejects)))

    def write(self, index: int, prompts: int, reject_file_index: int) -> Any:
        """`ShardCollector.write` in the child: shard `index`'s files; its `ShardResult`."""
        self._send(("write", index, prompts, reject_file_index))
        try:
            answered = self._from_child.poll(self.timeout_s)
            if answered:
                status, payload = self._from_child.recv()
        except (EOFError, OSError):
            raise self._died(f"writing shard {index}") from None
        if not answered:
            self.close()
            raise ShardWriterError(
                f"the shard writer process did not finish shard {index} within {self.timeout_s:.0f} s; it was "
                "stopped. Rerun the same command: finished shards are kept."
            )
        if status == "refused":
            raise DiskWriteError(payload)
        if status != "ok":
            error = payload.strip().splitlines()[-1] if payload.strip() else "unknown error"
            raise ShardWriterError(f"the shard writer process failed on shard {index}: {error}\n{payload}")
        return payload

    def close(self) -> None:
        """Stop the child now (whatever it was doing: a shard file appears only once complete)."""
        if self._process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._to_child.send(("stop",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(2)
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)
        for connection in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                connection.close()
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def __enter__(self) -> ShardWriterProcess:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: tuple) -> None:
        try:
            self._to_child.send(message)
        except (OSError, ValueError):
            raise self._died(f"receiving {message[0]!r}") from None

    def _died(self, doing: str) -> ShardWriterError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(5)
        return ShardWriterError(
            f"the shard writer process died while {doing} (exit code {self._process.returncode}; -9 is usually the "
            "kernel's out-of-memory killer). Rerun the same command: finished shards are kept."
        )


def _serve(receive: Connection, reply: Connection) -> None:
    """The child: a `start` message, then `add`, `write` and `stop` messages until `stop` or
    until the build's end closes."""
    import pyarrow as pa

    from distillflow.tasks.build.shards import ShardCollector

    # pyarrow imports pandas (when installed) on its first table: done now, while the build
    # is still on its prompt side, rather than when the first shard is due.
    pa.Table.from_pylist([{"warm": 1}])
    try:
        _, filters_json, staging, with_top_logprobs = receive.recv()
    except (EOFError, OSError):
        return
    shards = ShardCollector(FiltersConfig.model_validate(filters_json), Path(staging), with_top_logprobs)
    failed: dict[int, tuple[str, str]] = {}  # shard -> the reply to its `write`: an `add` failed
    while True:
        try:
            message = receive.recv()
        except (EOFError, OSError):
            return
        kind, index = message[0], message[1] if len(message) > 1 else None
        if kind == "stop":
            return
        try:
            if kind == "add":
                if index not in failed:
                    shards.add(index, *message[2:])
            elif index in failed:  # write
                shards.forget(index)
                reply.send(failed.pop(index))
            else:
                reply.send(("ok", shards.write(index, *message[2:])))
        except Exception as error:  # noqa: BLE001 - sent back with (or as) the shard's `write`
            # A full disk is sent as its one paragraph (raised again in the build), anything
            # else with its traceback.
            failure = ("refused", str(error)) if isinstance(error, DiskWriteError) else ("error", traceback.format_exc(limit=8))
            if kind == "add":
                failed[index] = failure
            else:
                reply.send(failure)


def main() -> None:
    """`python -m distillflow.tasks.build.shard_writer`: messages on stdin, replies on stdout."""
    _serve(*child_connections())


if __name__ == "__main__":
    main()
