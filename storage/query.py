"""`distill inspect DIR --sql QUERY`: SQL (DuckDB) over a dataset's Parquet, read-only.

Tables: `data` (every `data/part-*.parquet`), `rejects` (every `rejects/part-*.parquet`)
and, in a mined dataset, `candidates` (`candidates.parquet`). They are Arrow datasets
registered in an in-memory DuckDB whose file-system access is switched off and locked
before the query runs, so a query can read the tables but cannot read, write or attach
any file (`COPY ... TO`, `ATTACH`, `read_parquet(...)` and `INSTALL` all fail).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from distillflow.storage.parquet import list_shards

FORMATS = ("table", "csv", "json")
CELL_WIDTH = 60  # a table cell longer than this is clipped with …


class QueryError(ValueError):
    """A query that DuckDB refused; the message names the tables and their columns."""


def dataset_tables(directory: str | Path) -> dict[str, list[Path]]:
    """The Parquet files behind each table name (tables without a file are left out)."""
    directory = Path(directory)
    tables = {"data": list_shards(directory / "data"), "rejects": list_shards(directory / "rejects")}
    if (directory / "candidates.parquet").is_file():
        tables["candidates"] = [directory / "candidates.parquet"]
    return {name: paths for name, paths in tables.items() if paths}


def _arrow_dataset(paths: list[Path]) -> pads.Dataset:
    schema = pa.unify_schemas([pq.read_schema(path) for path in paths], promote_options="permissive")
    return pads.dataset([str(path) for path in paths], schema=schema, format="parquet")


def describe_tables(directory: str | Path) -> str:
    """`data (id, prompt, ...); rejects (...)`: what a query can use."""
    parts = []
    for name, paths in dataset_tables(directory).items():
        parts.append(f"{name} ({', '.join(_arrow_dataset(paths).schema.names)})")
    return "; ".join(parts) or "none (no Parquet files under data/ or rejects/)"


def run_query(directory: str | Path, query: str) -> pa.Table | None:
    """Run `query` over the dataset in `directory`; its rows, or None for a statement
    without a result. Raises QueryError (naming the tables) when DuckDB refuses it."""
    import duckdb

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such dataset directory")
    tables = dataset_tables(directory)
    if not tables:
        raise FileNotFoundError(
            f"{directory} has no Parquet files under data/ or rejects/: point `distill inspect` at a "
            "dataset directory written by `distill build`"
        )
    connection = duckdb.connect(":memory:")
    try:
        for name, paths in tables.items():
            connection.register(name, _arrow_dataset(paths))
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        try:
            relation = connection.sql(query)
            return None if relation is None else relation.to_arrow_table()
        except duckdb.Error as error:
            message = str(error).strip().replace("\n\n", "\n")
            raise QueryError(
                f"the query failed: {message}\nTables: {describe_tables(directory)}. The query runs "
                "read-only (DuckDB SQL; no file access). Example: distill inspect "
                f"{directory} --sql \"SELECT strategy, count(*) FROM data GROUP BY strategy\""
            ) from None
    finally:
        connection.close()


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return str(value).replace("\r", "").replace("\n", "⏎ ").replace("\t", " ")


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, dict)):
        return json.dumps(_json_value(value), ensure_ascii=False, default=str)
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value


def format_result(table: pa.Table | None, fmt: str = "table", max_rows: int | None = 100) -> str:
    """A result as an aligned text table (clipped cells, at most `max_rows` rows), CSV or
    JSON lines (every row, full values; binary cells as `<N bytes>`)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if table is None:
        return "(the statement ran; it returns no rows)"
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        return "\n".join(json.dumps(_json_value(row), ensure_ascii=False, default=str) for row in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow([_csv_value(row[name]) for name in names])
        return buffer.getvalue().rstrip("\n")
    shown = rows if max_rows is None else rows[:max_rows]
    cells = [[_clip(_cell(row[name])) for name in names] for row in shown]
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(names)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(names, widths))]
    lines.append("  ".join("─" * width for width in widths))
    for line in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    more = f", {len(shown)} shown (--format csv or json prints all)" if len(shown) < len(rows) else ""
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(lines)


def _clip(text: str, width: int = CELL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
