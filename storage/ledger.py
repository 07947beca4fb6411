"""The teacher ledger: every paid-for answer, durable the moment it arrives.

Why SQLite in WAL mode: one file, one transaction per answer (~tens of µs, no fsync per
commit with `synchronous=NORMAL`), readers never block the writer, and a process killed
with SIGKILL loses nothing that was committed — the WAL is replayed on the next open. The
only loss window is a power cut or OS crash, which `durability="full"` closes at the cost
of an fsync per answer. Append-only segment files would be as fast but need their own
compaction and torn-write handling; SQLite already solves both.

A write the file system refuses (a full disk, a quota, a read-only mount) raises
`DiskWriteError` naming the ledger's path and the space left, never SQLite's secondary
"cannot rollback" error: SQLite has already rolled back a COMMIT that found the disk full.

Keys are content hashes of the full request (messages, model, generation parameters),
so a rerun of the same config finds every answer it already paid for, and a change of
any parameter that changes the answer is a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from distillflow.failures import disk_writes
from distillflow.records import TeacherAnswer

# Ledgers live in <output_dir>/.ledger/: the build's teacher answers (shared by every command
# that asks the build's teacher), and eval's endpoints and judge beside it.
LEDGER_DIR = Path(".ledger")
TEACHER_LEDGER = LEDGER_DIR / "teacher.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key         TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    answer      TEXT NOT NULL
);
-- Batch API mode: every uploaded input file, recorded before its batch is created, and
-- its batch id, recorded before the first poll, so a crashed run resumes polling the
-- same batches (and pays for nothing twice). state: uploaded | submitted | done.
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY,
    batch_id      TEXT,
    state         TEXT NOT NULL,
    status        TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    key           TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    PRIMARY KEY (key, input_file_id)
);
CREATE INDEX IF NOT EXISTS batch_requests_by_key ON batch_requests (key);
"""


def request_key(messages: list[dict[str, Any]], model: str, params: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything that determines the teacher's answer."""
    payload = json.dumps(
        {"messages": messages, "model": model, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


_INSERT_ANSWER = "INSERT OR IGNORE INTO answers (key, created_at, answer) VALUES (?, ?, ?)"


def _payload(answer: TeacherAnswer) -> str:
    return json.dumps(
        {
            "content": answer.content,
            "finish_reason": answer.finish_reason,
            "model": answer.model,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "top_logprobs": answer.top_logprobs,
            "error": answer.error,
            "error_detail": answer.error_detail,
        },
        ensure_ascii=False,
    )


class Ledger:
    """Append-only store of teacher answers keyed by `request_key`. Single-writer."""

    def __init__(self, path: str | Path, durability: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        with self._writing():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
                self._db.execute("PRAGMA busy_timeout=30000")
                self._db.executescript(SCHEMA)
            except BaseException:
                self._db.close()
                raise
        self._lock = threading.Lock()  # one connection, used from task threads and the teacher loop

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """A write to the ledger: one the file system refuses raises `DiskWriteError`."""
        return disk_writes(self.path, "the ledger")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, under the lock: committed when the block ends, rolled back if it raises."""
        with self._lock, self._writing():
            self._db.execute("BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that found the disk full was rolled back by SQLite itself, and a
                # ROLLBACK would only raise "no transaction is active" over the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[TeacherAnswer, float]]:
        """Answers already recorded for `keys`: key → (answer, created_at unix seconds)."""
        found: dict[str, tuple[TeacherAnswer, float]] = {}
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            placeholders = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT key, created_at, answer FROM answers WHERE key IN ({placeholders})", chunk
                ).fetchall()
            for key, created_at, payload in rows:
                answer = TeacherAnswer(**json.loads(payload))
                answer.from_ledger = True
                found[key] = (answer, created_at)
        return found

    def put(self, key: str, answer: TeacherAnswer, created_at: float | None = None) -> float:
        """Record one answer now (its own transaction). Returns its created_at."""
        created_at = time.time() if created_at is None else created_at
        with self._lock, self._writing():
            self._db.execute(_INSERT_ANSWER, (key, created_at, _payload(answer)))
        return created_at

    def put_many(self, entries: Sequence[tuple[str, TeacherAnswer, float]]) -> None:
        """Record (key, answer, created_at) entries now, in one transaction: a commit costs
        about five times an insert, so answers that arrive together are committed together."""
        rows = [(key, created_at, _payload(answer)) for key, answer, created_at in entries]
        with self._transaction() as db:
            db.executemany(_INSERT_ANSWER, rows)

    # -- Batch API bookkeeping -------------------------------------------------------------

    def record_upload(self, input_file_id: str, keys: list[str]) -> None:
        """An input file of the requests `keys` was uploaded (its batch not yet created)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO batches VALUES (?, NULL, 'uploaded', NULL, ?, ?)", (input_file_id, now, now))
            db.executemany("INSERT OR IGNORE INTO batch_requests VALUES (?, ?)", [(key, input_file_id) for key in keys])

    def record_batch(self, input_file_id: str, batch_id: str | None, state: str, status: str | None = None) -> None:
        """The batch of an input file: its id (once created), our state, the API's status."""
        with self._lock, self._writing():
            self._db.execute(
                "UPDATE batches SET batch_id = COALESCE(?, batch_id), state = ?, status = COALESCE(?, status), "
                "updated_at = ? WHERE input_file_id = ?",
                (batch_id, state, status, time.time(), input_file_id),
            )

    def open_batches(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Batches not yet collected that hold any of `keys`: input_file_id → {batch_id,
        state, status, keys (all of the batch's)}."""
        keys = list(keys)
        files: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            placeholders = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    "SELECT DISTINCT r.input_file_id FROM batch_requests r JOIN batches b USING (input_file_id) "
                    f"WHERE b.state != 'done' AND r.key IN ({placeholders})",
                    chunk,
                ).fetchall()
            files.update(row[0] for row in rows)
        found: dict[str, dict[str, Any]] = {}
        for input_file_id in sorted(files):
            with self._lock:
                batch_id, state, status = self._db.execute(
                    "SELECT batch_id, state, status FROM batches WHERE input_file_id = ?", (input_file_id,)
                ).fetchone()
            batch_keys = self.batch_keys(input_file_id)
            found[input_file_id] = {"batch_id": batch_id, "state": state, "status": status, "keys": batch_keys}
        return found

    def batch_keys(self, input_file_id: str) -> list[str]:
        """The request keys of one uploaded batch input file."""
        with self._lock:
            rows = self._db.execute("SELECT key FROM batch_requests WHERE input_file_id = ?", (input_file_id,)).fetchall()
        return [row[0] for row in rows]

    def batches(self) -> list[dict[str, Any]]:
        """Every batch recorded, oldest first (for inspection and tests)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT input_file_id, batch_id, state, status FROM batches ORDER BY created_at"
            ).fetchall()
        return [dict(zip(("input_file_id", "batch_id", "state", "status"), row)) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
