"""Parquet shards, written atomically: buffer rows, rotate files, temp name + rename.

A shard is complete the moment it has its final name; `manifest.json` (see
`storage.manifest`) is written after every shard, so its presence means the dataset is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.storage.atomic import atomic_path

TOKEN_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float32())])
TOP_LOGPROBS_TYPE = pa.list_(
    pa.struct([("token", pa.string()), ("logprob", pa.float32()), ("top", pa.list_(TOKEN_LOGPROB))])
)

ACCEPTED_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),
    pa.field("teacher_model", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
]



class TokenLogprob(TypedDict):
    token: str
    logprob: float


class AnswerTokenLogprobs(TypedDict):
    """One answer token as the API reported it, with its alternatives (`top_logprobs`)."""

    token: str
    logprob: float
    top: list[TokenLogprob]


class _AnsweredColumns(TypedDict):
    id: str
    prompt: str
    response: str
    strategy: str
    parent_id: str | None
    teacher_model: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime


class AnsweredRow(_AnsweredColumns, total=False):
    """One accepted row, as the build makes it and `data/part-*.parquet` holds it (the
    columns of `accepted_schema`, which a test keeps in step with these keys);
    `top_logprobs` only with teacher.generation.top_logprobs."""

    top_logprobs: list[AnswerTokenLogprobs] | None


REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("parent_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("response", pa.string()),
    ]
)


def accepted_schema(with_top_logprobs: bool = False) -> pa.Schema:
    fields = list(ACCEPTED_FIELDS)
    if with_top_logprobs:
        fields.append(pa.field("top_logprobs", TOP_LOGPROBS_TYPE))
    return pa.schema(fields)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    path: str  # relative to the dataset root, e.g. "data/part-00000.parquet"
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_table_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` via a temp file in the same directory, fsync, then rename.
    A full disk (or a read-only one) raises `DiskWriteError` and leaves no temp file behind."""
    with atomic_path(path, "the Parquet file") as tmp:
        pq.write_table(table, tmp, compression=compression)


class ShardWriter:
    """The one shard writer: buffers rows (dicts, or Arrow tables) and writes `prefix-00000.parquet`, `prefix-00001.parquet`, ... into `directory`.

    `root` is the dataset root that shard paths in `shards` are relative to; `first_index`
    numbers the first file (a streaming build writes shard k of a run as `part-0000k`).
    """

    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema | None,
        rows_per_shard: int = 100_000,
        prefix: str = "part",
        root: str | Path | None = None,
        first_index: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.root = Path(root) if root is not None else self.directory.parent
        self.first_index = first_index
        self.shards: list[ShardInfo] = []
        self._buffer: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []  # Arrow rows waiting, ahead of `_buffer`
        self._table_rows = 0
        self.rows_written = 0

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._buffer.append(row)
            if len(self._buffer) + self._table_rows >= self.rows_per_shard:
                self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append Arrow rows (not split: a shard may hold a little more than rows_per_shard).
        A writer made with `schema=None` takes the first table's schema."""
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows:
            if self._buffer:  # keep the order of rows and tables
                self._tables.append(pa.Table.from_pylist(self._buffer, schema=self.schema))
                self._table_rows += len(self._buffer)
                self._buffer = []
            self._tables.append(table)
            self._table_rows += table.num_rows
        if self._table_rows >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer and not self._tables:
            return
        parts = [*self._tables]
        if self._buffer:
            parts.append(pa.Table.from_pylist(self._buffer, schema=self.schema))
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        self._tables, self._table_rows = [], 0
        path = self._path(len(self.shards))
        write_table_atomic(table, path)
        self.shards.append(
            ShardInfo(
                path=str(path.relative_to(self.root)),
                rows=table.num_rows,
                bytes=path.stat().st_size,
                sha256=file_sha256(path),
            )
        )
        self.rows_written += table.num_rows
        self._buffer = []

    def close(self) -> list[ShardInfo]:
        """Flush what is buffered; a writer that saw no row still writes one empty shard,
        so that readers (`datasets`, pyarrow) find a schema."""
        if self._buffer or self._tables or not self.shards:
            if not self._buffer and not self._tables:
                path = self._path(0)
                write_table_atomic(self.schema.empty_table(), path)
                self.shards.append(
                    ShardInfo(str(path.relative_to(self.root)), 0, path.stat().st_size, file_sha256(path))
                )
            else:
                self._flush()
        return self.shards

    def _path(self, number: int) -> Path:
        return self.directory / f"{self.prefix}-{self.first_index + number:05d}.parquet"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def list_shards(directory: str | Path) -> list[Path]:
    """The finished shards of a directory, in order (temp files are skipped)."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def iter_batches(
    directory: str | Path, batch_size: int = 65_536, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream record batches over every shard of a directory (bounded memory)."""
    for path in list_shards(directory):
        parquet_file = pq.ParquetFile(path)
        yield from parquet_file.iter_batches(batch_size=batch_size, columns=columns)


def read_table(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"{directory}: no .parquet shards found")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in shards], promote_options="default")
