"""Add columns to an existing Parquet shard, streaming, atomically (temp name + rename).

Used to enrich a finished dataset (e.g. teacher top-k logprobs) without holding a whole
shard in memory. The output may be the input itself: the temp file is renamed over it
only once it is complete, so a crash leaves either the old shard or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.storage.atomic import atomic_path
from distillflow.storage.parquet import ShardInfo, file_sha256

# Schema metadata key under which a shard records how its added columns were made.
PROVENANCE_KEY = b"distillflow.added_columns"


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance a shard was written with by `add_columns_atomic`, or None."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw is not None else None


def add_columns_atomic(
    in_path: Path,
    out_path: Path,
    new_fields: list[pa.Field],
    compute: Callable[[pa.RecordBatch], list[pa.Array]],
    provenance: dict[str, Any],
    root: Path,
    batch_size: int = 256,
    compression: str = "zstd",
) -> ShardInfo:
    """Write `in_path` + one new column per field of `new_fields` to `out_path`.

    `compute(batch)` returns the new columns of one record batch, in `new_fields` order.
    Columns of the input with the same names are replaced. `provenance` (JSON-able) is
    stored in the schema metadata; `root` is what the returned shard path is relative to.
    """
    source = pq.ParquetFile(in_path)
    replaced = {field.name for field in new_fields}
    kept = [field for field in source.schema_arrow if field.name not in replaced]
    metadata = dict(source.schema_arrow.metadata or {})
    metadata.pop(b"huggingface", None)  # a `datasets` feature list would miss the new columns
    metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode("utf-8")
    schema = pa.schema(kept + list(new_fields), metadata=metadata)

    rows = 0
    with atomic_path(out_path, "the Parquet file") as tmp, pq.ParquetWriter(tmp, schema, compression=compression) as writer:
        for batch in source.iter_batches(batch_size=batch_size, columns=[f.name for f in kept]):
            columns = [batch.column(field.name) for field in kept] + list(compute(batch))
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            rows += batch.num_rows
        if rows == 0:
            writer.write_table(schema.empty_table())
    return ShardInfo(
        path=str(out_path.relative_to(root)),
        rows=rows,
        bytes=out_path.stat().st_size,
        sha256=file_sha256(out_path),
    )


def column_compressed_bytes(path: Path, column: str) -> int:
    """On-disk (compressed) bytes of one column of a Parquet file, over all row groups."""
    metadata = pq.ParquetFile(path).metadata
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    return sum(
        metadata.row_group(group).column(index).total_compressed_size
        for group in range(metadata.num_row_groups)
    )
