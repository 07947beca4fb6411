"""The filtering stage over an existing dataset directory, streaming over its Parquet shards.

Three passes, memory bounded by the per-row features (not by the rows):

1. map, `shard_features` (one call per input shard, any order, any worker): stream the
   shard in batches of `filters.batch_size` rows; keep only the per-row features (exact key
   8 B, MinHash signature 4·num_perm B, eval overlap 4 B), the response-side verdict,
   and the prompt text (for semantic dedup / diversity, which need it again).
2. reduce, `resolve_dataset`: response filters first (the answers are already paid for,
   so a duplicate with a good answer should survive a kept twin with a bad one), then
   the prompt-side filters over every remaining row at once.
3. `write_filtered_dataset`: stream the shards again; kept rows go to `data/` (one output
   shard per input shard, all columns preserved), dropped rows to `rejects/` with their
   reason, detail, `duplicate_of` id and response; the input's rejects are carried over;
   `manifest.json` is written last.

For 10^6 prompts at num_perm=128 the features take ~0.6 GB; the prompts ~0.15 GB.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillflow.config import load_filters_config
from distillflow.progress import progress
from distillflow.storage.manifest import Manifest, load_manifest, remove_manifest
from distillflow.storage.parquet import (
    REJECT_SCHEMA,
    ShardWriter,
    list_shards,
)
from distillflow.tasks.filters.dedup import KEEP
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.passes import Embed, PromptFeatures, prompt_features, resolve_prompt_filters
from distillflow.tasks.filters.quality import ResponseChecker

STAGING = ".staging"


@dataclass(slots=True)
class ShardFeatures:
    """What pass 1 keeps of one shard: features, prompts, ids, response verdicts."""

    path: str
    features: PromptFeatures
    ids: pa.Array
    prompts: pa.Array
    strategies: list[str]
    response_drops: dict[int, tuple[str, str]]  # row in shard -> (reason, detail)


def shard_features(path: str | Path, config: FiltersConfig) -> ShardFeatures:
    """Pass 1 over one shard (the unit of parallel work)."""
    parquet_file = pq.ParquetFile(path)
    names = parquet_file.schema_arrow.names
    missing = [name for name in ("id", "prompt") if name not in names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} missing; a distillflow data shard has id, prompt, response, ...")
    has_response = "response" in names
    columns = [c for c in ("id", "prompt", "strategy", "response", "finish_reason") if c in names]
    check = ResponseChecker(config) if has_response else None
    parts: list[PromptFeatures] = []
    ids, prompts, strategies = [], [], []
    response_drops: dict[int, tuple[str, str]] = {}
    offset = 0
    with progress(f"dedup {Path(path).name}", total=parquet_file.metadata.num_rows, unit="rows") as bar:
        for batch in parquet_file.iter_batches(batch_size=config.batch_size, columns=columns):
            texts = batch.column("prompt").to_pylist()
            parts.append(prompt_features(texts, config))
            ids.append(batch.column("id"))
            prompts.append(batch.column("prompt"))
            strategies += batch.column("strategy").to_pylist() if "strategy" in names else [""] * len(texts)
            if check is not None:
                responses = batch.column("response").to_pylist()
                reasons = batch.column("finish_reason").to_pylist() if "finish_reason" in names else [None] * len(texts)
                row_strategies = strategies[offset : offset + len(texts)]
                for i, (prompt, response, finish) in enumerate(zip(texts, responses, reasons)):
                    verdict = check(prompt or "", response, finish, row_strategies[i] or "")
                    if verdict is not None:
                        response_drops[offset + i] = (verdict.reason, verdict.detail)
            offset += len(texts)
            bar.advance(len(texts))
    empty = pa.array([], type=pa.string())
    return ShardFeatures(
        path=str(path),
        features=PromptFeatures.concat(parts) if parts else prompt_features([], config),
        ids=pa.concat_arrays([a.cast(pa.large_string()) for a in ids]) if ids else empty.cast(pa.large_string()),
        prompts=pa.concat_arrays([a.cast(pa.large_string()) for a in prompts]) if prompts else empty.cast(pa.large_string()),
        strategies=[s or "" for s in strategies],
        response_drops=response_drops,
    )


@dataclass(slots=True)
class DatasetDecisions:
    """Per global row (shards concatenated in order): reason code (None = keep), detail, kept row."""

    shard_rows: list[int]
    reason: list[str | None]
    detail: dict[int, str]
    duplicate_of: np.ndarray  # (N,) int64, -1 where not a duplicate
    ids: pa.Array

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r for r in self.reason if r is not None).items()))


def resolve_dataset(shards: list[ShardFeatures], config: FiltersConfig, embed: Embed | None = None) -> DatasetDecisions:
    """Pass 2: response verdicts, then the prompt-side filters over all rows at once.

    Consumes the shards' features (they are concatenated, then released)."""
    features = PromptFeatures.concat([s.features for s in shards])
    shard_rows = [s.features.num_rows for s in shards]
    for shard in shards:
        shard.features = PromptFeatures(num_rows=shard.features.num_rows)  # release the arrays
    prompts = pa.chunked_array([s.prompts for s in shards], type=pa.large_string())
    ids = pa.concat_arrays([s.ids for s in shards]) if shards else pa.array([], pa.large_string())
    strategies = [strategy for s in shards for strategy in s.strategies]
    num_rows = features.num_rows
    reason: list[str | None] = [None] * num_rows
    detail: dict[int, str] = {}
    duplicate_of = np.full(num_rows, KEEP, dtype=np.int64)
    offset = 0
    for shard in shards:
        for row, (code, text) in shard.response_drops.items():
            reason[offset + row], detail[offset + row] = code, text
        offset += shard.features.num_rows
    alive = np.array([i for i in range(num_rows) if reason[i] is None], dtype=np.int64)

    def texts_of(rows: np.ndarray) -> list[str]:
        return prompts.take(pa.array(rows, type=pa.int64())).to_pylist()

    decisions = resolve_prompt_filters(features, texts_of, strategies, config, alive=alive, embed=embed)
    for drop in decisions.drops:
        reason[drop.row], detail[drop.row], duplicate_of[drop.row] = drop.reason, drop.detail, drop.duplicate_of
    return DatasetDecisions(shard_rows, reason, detail, duplicate_of, ids)


def _reject_table(table: pa.Table, offset: int, decisions: DatasetDecisions) -> pa.Table:
    """The rows of `table` (global rows offset, offset+1, ...) that were dropped, as reject rows."""
    local = np.array([i for i in range(table.num_rows) if decisions.reason[offset + i] is not None], dtype=np.int64)
    dropped = table.take(pa.array(local, type=pa.int64()))
    rows = local + offset
    kept = decisions.duplicate_of[rows]
    duplicate_of = decisions.ids.take(pa.array(np.where(kept == KEEP, 0, kept), type=pa.int64()))
    duplicate_of = pa.array(
        [value if k != KEEP else None for value, k in zip(duplicate_of.to_pylist(), kept.tolist())], pa.string()
    )

    def column(name: str, default: pa.Array) -> pa.Array:
        field = REJECT_SCHEMA.field(name)
        return dropped.column(name).cast(field.type) if name in dropped.column_names else default

    strategy = column("strategy", pa.array([""] * len(local), pa.string()))
    return pa.Table.from_arrays(
        [
            column("id", pa.nulls(len(local), pa.string())),
            column("prompt", pa.nulls(len(local), pa.string())),
            pa.array(["" if v is None else v for v in strategy.to_pylist()], pa.string()),
            column("parent_id", pa.nulls(len(local), pa.string())),
            pa.array([decisions.reason[r] for r in rows.tolist()], pa.string()),
            pa.array([decisions.detail.get(r, "") for r in rows.tolist()], pa.string()),
            duplicate_of,
            column("response", pa.nulls(len(local), pa.string())),
        ],
        schema=REJECT_SCHEMA,
    )


def _carried_rejects(in_dir: Path) -> pa.Table | None:
    """The input's rejects, cast to the reject schema (missing columns become null)."""
    shards = list_shards(in_dir / "rejects")
    if not shards:
        return None
    tables = []
    for path in shards:
        table = pq.read_table(path)
        arrays = [
            table.column(field.name).cast(field.type) if field.name in table.column_names
            else pa.nulls(table.num_rows, field.type)
            for field in REJECT_SCHEMA
        ]
        tables.append(pa.Table.from_arrays(arrays, schema=REJECT_SCHEMA))
    return pa.concat_tables(tables)


def write_filtered_dataset(
    in_dir: str | Path,
    out_dir: str | Path,
    shard_paths: list[Path],
    decisions: DatasetDecisions,
    config: FiltersConfig,
    elapsed_s: float,
) -> dict[str, Any]:
    """Pass 3: kept rows to data/, drops (and the input's rejects) to rejects/, manifest last."""
    from distillflow.storage.dataset import dataset_card, finish_dataset

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(out_dir)
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    data_writer = ShardWriter(staging / "data", None, root=staging)
    reject_writer = ShardWriter(staging / "rejects", REJECT_SCHEMA, root=staging)
    carried = _carried_rejects(in_dir)
    carried_reasons: Counter[str] = Counter()
    if carried is not None:
        carried_reasons.update(carried.column("reason").to_pylist())
        reject_writer.write_table(carried)
    keep_all = np.array([r is None for r in decisions.reason], dtype=bool)
    accepted_per_strategy: Counter[str] = Counter()
    offset = 0
    with progress("dedup write", total=len(decisions.reason), unit="rows") as bar:
        for path in shard_paths:
            parquet_file = pq.ParquetFile(path)
            data_writer.schema = data_writer.schema or parquet_file.schema_arrow
            for batch in parquet_file.iter_batches(batch_size=config.batch_size):
                table = pa.Table.from_batches([batch])
                kept = table.filter(pa.array(keep_all[offset : offset + table.num_rows]))
                data_writer.write_table(kept)
                if "strategy" in kept.column_names:
                    accepted_per_strategy.update(kept.column("strategy").to_pylist())
                reject_writer.write_table(_reject_table(table, offset, decisions))
                offset += table.num_rows
                bar.advance(table.num_rows)
    data_shards = data_writer.close()
    reject_shards = reject_writer.close()

    try:
        source: Manifest | None = load_manifest(in_dir)
    except FileNotFoundError:
        source = None
    new_reasons = decisions.counts()
    all_reasons = Counter(carried_reasons)
    all_reasons.update(new_reasons)
    input_rows = len(decisions.reason)
    accepted = int(keep_all.sum())
    manifest = {
        "format_version": 1,
        "name": source.name if source else in_dir.name,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "source": {"dir": str(in_dir), "name": source and source.name, "created_at": source and source.created_at},
        "config": {**(source.config if source else {}), "filters": config.model_dump(mode="json")},
        "counts": {
            "input_rows": input_rows,
            "input_rejects_carried": int(carried.num_rows) if carried is not None else 0,
            "accepted": accepted,
            "rejected_here": input_rows - accepted,
            "rejected": sum(all_reasons.values()),
        },
        "reject_reasons": dict(sorted(all_reasons.items())),
        "filter_reject_reasons": new_reasons,
        "accepted_per_strategy": dict(sorted(accepted_per_strategy.items())),
        "teacher_usage": source.teacher_usage if source else {},
        "invariant": {"input_rows": input_rows, "accepted_plus_rejected_here": accepted + sum(new_reasons.values()),
                      "holds": input_rows == accepted + sum(new_reasons.values())},
        "elapsed_s": round(elapsed_s + time.time() - started, 3),
    }
    shards = {"data": [s.to_dict() for s in data_shards], "rejects": [s.to_dict() for s in reject_shards]}
    return finish_dataset(out_dir, staging, shards, manifest, dataset_card(manifest))


def filters_config_for(in_dir: str | Path, config_path: str | Path | None) -> FiltersConfig:
    """The filters of `distill dedup`: the config's `filters:` section; without a config, the
    filters recorded in IN_DIR's manifest, else the defaults."""
    if config_path is not None:
        return load_filters_config(config_path)
    try:
        filters = load_manifest(in_dir).config.get("filters")
    except FileNotFoundError:
        filters = None
    return FiltersConfig.model_validate(filters) if filters else FiltersConfig()


def input_shards(in_dir: str | Path) -> list[Path]:
    in_dir = Path(in_dir)
    shards = list_shards(in_dir / "data")
    if not shards:
        raise FileNotFoundError(f"{in_dir / 'data'}: no .parquet shards; IN_DIR must be a dataset directory with data/")
    return shards


def filter_dataset(in_dir: str | Path, out_dir: str | Path, config: FiltersConfig, embed: Embed | None = None) -> dict[str, Any]:
    """All three passes in this process (the flow in flows/dedup.py runs pass 1 as parallel tasks)."""
    if Path(out_dir).resolve() == Path(in_dir).resolve():
        raise ValueError("OUT_DIR must differ from IN_DIR (the input is read again while the output is written)")
    started = time.time()
    paths = input_shards(in_dir)
    shards = [shard_features(path, config) for path in paths]
    decisions = resolve_dataset(shards, config, embed=embed)
    del shards
    return write_filtered_dataset(in_dir, out_dir, paths, decisions, config, time.time() - started)


# -- Prefect tasks (wired by flows/) --------------------------------------------------------


@task(name="shard-features", cache_policy=NO_CACHE, task_run_name="shard-features-{path}")
def shard_features_task(path: str, config: FiltersConfig) -> ShardFeatures:
    return shard_features(path, config)


@task(name="resolve-filters", cache_policy=NO_CACHE)
def resolve_filters_task(shards: list[ShardFeatures], config: FiltersConfig) -> DatasetDecisions:
    return resolve_dataset(shards, config)


@task(name="write-filtered", cache_policy=NO_CACHE)
def write_filtered_task(
    in_dir: str, out_dir: str, paths: list[str], decisions: DatasetDecisions, config: FiltersConfig, elapsed_s: float
) -> dict[str, Any]:
    return write_filtered_dataset(in_dir, out_dir, [Path(p) for p in paths], decisions, config, elapsed_s)
