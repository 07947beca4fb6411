"""Read seed prompts from JSONL, JSON, Parquet, CSV or a `datasets.save_to_disk` directory.

A whole-file problem (missing file, missing prompt column, unreadable format) is a
`ConfigError` that names the file and the fix. A bad row inside a readable file
(undecodable bytes, broken JSON, an empty or non-text prompt) becomes a `Reject` with a
`bad_seed:*` reason and the file:line in `detail`, and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillflow.config import ConfigError, SeedSource
from distillflow.records import PromptRecord, Reject, content_id


def _format_of(source: SeedSource) -> str:
    if source.format != "auto":
        return source.format
    if source.path.is_dir():
        return "hf_disk"
    suffix = source.path.suffix.lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if suffix not in formats:
        raise ConfigError(
            f"seeds: {source.path}: cannot tell the format from the suffix {suffix!r}; "
            "use .jsonl/.json/.parquet/.csv, a datasets directory, or set `format:`"
        )
    return formats[suffix]


def _bad(raw: str, reason: str, where: str, detail: str) -> Reject:
    text = raw if raw.strip() else f"<{reason} at {where}>"
    return Reject(
        id=content_id(f"{where}\n{raw}"), prompt=text, strategy="seed", reason=reason, detail=f"{where}: {detail}"
    )


def _missing_column(source: SeedSource, column: str, available: list[str]) -> ConfigError:
    return ConfigError(
        f"seeds: {source.path}: no column {column!r} (found: {', '.join(map(str, available)) or 'none'}); "
        f"set `prompt_column:` on this seed (or pass --prompt-column)"
    )


def _row_to_record(value: Any, where: str, raw: str) -> PromptRecord | Reject:
    if not isinstance(value, str):
        return _bad(raw, "bad_seed:not_text", where, f"prompt is {type(value).__name__}, not text")
    if not value.strip():
        return _bad(raw, "bad_seed:empty", where, "empty prompt")
    return PromptRecord.make(value, "seed")


def read_seed_source(source: SeedSource, prompt_column: str | None = None) -> tuple[list[PromptRecord], list[Reject]]:
    column = prompt_column or source.prompt_column
    fmt = _format_of(source)
    records: list[PromptRecord | Reject] = []
    name = str(source.path)
    match fmt:
        case "jsonl":
            for number, line in enumerate(_lines(source.path), start=1):
                where = f"{name}:{number}"
                if not line.strip():
                    continue  # blank separator lines are not rows
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    records.append(_bad(line.decode("utf-8", "replace"), "bad_seed:encoding", where, str(error)))
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    records.append(_bad(text, "bad_seed:json", where, str(error)))
                    continue
                if not isinstance(row, dict):
                    records.append(_bad(text, "bad_seed:json", where, "line is not a JSON object"))
                    continue
                if column not in row:
                    if number == 1 or not records:
                        raise _missing_column(source, column, list(row))
                    records.append(_bad(text, "bad_seed:missing_column", where, f"no {column!r} key"))
                    continue
                records.append(_row_to_record(row[column], where, text))
        case "json":
            try:
                rows = json.loads(source.path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ConfigError(f"seeds: {name}: not valid UTF-8 JSON ({error}); fix the file or use JSONL") from None
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ConfigError(f"seeds: {name}: expected a JSON list of objects with a {column!r} key")
            if rows and column not in rows[0]:
                raise _missing_column(source, column, list(rows[0]))
            for number, row in enumerate(rows):
                records.append(_row_to_record(row.get(column), f"{name}[{number}]", json.dumps(row, ensure_ascii=False)))
        case "csv":
            text = source.path.read_bytes().decode("utf-8", "replace")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if column not in (reader.fieldnames or []):
                raise _missing_column(source, column, list(reader.fieldnames or []))
            for number, row in enumerate(reader, start=2):
                value = row.get(column)
                where = f"{name}:{number}"
                if value is not None and "\ufffd" in value:
                    records.append(_bad(value, "bad_seed:encoding", where, "undecodable bytes"))
                    continue
                records.append(_row_to_record(value, where, json.dumps(row, ensure_ascii=False)))
        case "parquet" | "hf_disk":
            if fmt == "parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(source.path)
                columns, values = table.column_names, None
                if column in columns:
                    values = table.column(column).to_pylist()
            else:
                import datasets

                try:
                    dataset = datasets.load_from_disk(str(source.path))
                except FileNotFoundError as error:
                    raise ConfigError(f"seeds: {name}: not a datasets.save_to_disk directory ({error})") from None
                if isinstance(dataset, datasets.DatasetDict):
                    split = "train" if "train" in dataset else next(iter(dataset))
                    dataset = dataset[split]
                columns, values = dataset.column_names, None
                if column in columns:
                    values = dataset[column]
            if values is None:
                raise _missing_column(source, column, columns)
            for number, value in enumerate(values):
                records.append(_row_to_record(value, f"{name}#{number}", "" if value is None else str(value)))
        case _:
            raise ConfigError(f"seeds: {name}: unsupported format {fmt!r}")
    if source.limit is not None:
        records = records[: source.limit]
    prompts = [r for r in records if isinstance(r, PromptRecord)]
    rejects = [r for r in records if isinstance(r, Reject)]
    return prompts, rejects


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a file as `bytes.splitlines` would split it, read one physical line at a
    time (a seed file is never held in memory whole)."""
    with open(path, "rb") as handle:
        for physical in handle:
            yield from physical.splitlines()


class SeedRows:
    """The seed rows of one build, read once (`load_seeds`) before its flow starts and handed
    to the flow as they are. A plain slotted class, not a dataclass: Prefect records a flow's
    parameters, and this one stands in that record as `<SeedRows>`, not as every row."""

    __slots__ = ("prompts", "rejects")

    def __init__(self, prompts: list[PromptRecord], rejects: list[Reject]) -> None:
        self.prompts = prompts
        self.rejects = rejects


def load_seeds(
    sources: list[SeedSource], prompt_column: str | None = None, config_path: str | Path = "<config>"
) -> tuple[list[PromptRecord], list[Reject]]:
    """All seeds in file order, and the rejects of bad rows. Fails if no usable seed is left."""
    if not sources:
        raise ConfigError(
            f"{config_path}: seeds: no seed file given; this command makes prompts from seeds, so add "
            "`seeds: [{path: my_prompts.jsonl}]` (a .jsonl/.json/.parquet/.csv file or a dataset directory)"
        )
    prompts: list[PromptRecord] = []
    rejects: list[Reject] = []
    for source in sources:
        if not source.path.exists():
            raise ConfigError(f"{config_path}: seeds: {source.path} does not exist; fix the path")
        file_prompts, file_rejects = read_seed_source(source, prompt_column)
        prompts.extend(file_prompts)
        rejects.extend(file_rejects)
    if not prompts:
        raise ConfigError(
            f"{config_path}: seeds: no usable prompt in {', '.join(str(s.path) for s in sources)} "
            f"({len(rejects)} bad row(s)); add prompts or fix prompt_column"
        )
    return prompts, rejects


def split_repeated_seeds(seeds: list[PromptRecord]) -> tuple[list[PromptRecord], list[Reject]]:
    """A seed prompt that appears again (same text) is a reject pointing at its first copy."""
    first: set[str] = set()
    unique: list[PromptRecord] = []
    repeated: list[Reject] = []
    for seed in seeds:
        if seed.id in first:
            repeated.append(Reject.of(seed, "exact_duplicate", "seed repeated in the input", duplicate_of=seed.id))
        else:
            first.add(seed.id)
            unique.append(seed)
    return unique, repeated
