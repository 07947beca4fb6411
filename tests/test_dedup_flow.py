"""`distill dedup IN_DIR OUT_DIR`: streaming over shards, rejects carried over, manifest last,
same result for any shard layout and engine."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distillflow.records import content_id
from distillflow.storage.manifest import read_manifest, write_manifest
from distillflow.storage.parquet import REJECT_SCHEMA, ShardWriter, accepted_schema, read_table
from distillflow.tasks.filters.dataset import filter_dataset
from distillflow.tasks.filters.config import FiltersConfig

from .test_dedup import planted_corpus

GOOD = "A helpful answer with enough distinct words to pass every quality check here."


def make_dataset(root: Path, rows_per_shard: int = 64) -> list[dict]:
    texts, _ = planted_corpus(seed=3)
    rows = []
    for index, text in enumerate(texts):
        response = GOOD if index % 50 else "   "  # a few empty answers
        rows.append(
            {
                "id": content_id(text),
                "prompt": text,
                "response": f"{response} ({index})" if response.strip() else response,
                "strategy": "seed" if index % 7 else "edge_case:typo",
                "parent_id": None,
                "teacher_model": "teacher",
                "finish_reason": "stop",
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "created_at": None,
            }
        )
    with ShardWriter(root / "data", accepted_schema(), rows_per_shard=rows_per_shard) as writer:
        writer.write(rows)
    with ShardWriter(root / "rejects", REJECT_SCHEMA) as writer:
        writer.write([{"id": "e1", "prompt": "p", "strategy": "seed", "parent_id": None, "reason": "teacher_error:400",
                       "detail": "bad request", "duplicate_of": None, "response": None}])
    write_manifest(root, {"name": "planted", "config": {"filters": {}}})
    return rows


CONFIG = FiltersConfig(near_dedup={"threshold": 0.7}, batch_size=50)


def decisions(out_dir: Path) -> tuple[list[str], list[tuple]]:
    data = read_table(out_dir / "data")
    rejects = read_table(out_dir / "rejects")
    return data.column("id").to_pylist(), sorted(
        zip(*(rejects.column(c).to_pylist() for c in ("id", "reason", "duplicate_of"))), key=str
    )


def test_filter_dataset_streams_shards_and_accounts_for_every_row(tmp_path):
    rows = make_dataset(tmp_path / "in")
    manifest = filter_dataset(tmp_path / "in", tmp_path / "out", CONFIG)
    out = tmp_path / "out"
    assert read_manifest(out) == manifest
    kept_ids, rejects = decisions(out)
    reasons = {reason for _, reason, _ in rejects}
    assert {"empty", "near_duplicate", "teacher_error:400"} <= reasons
    assert len(kept_ids) + len(rejects) == len(rows) + 1  # + the carried-over reject
    assert manifest["invariant"]["holds"]
    assert manifest["counts"]["input_rejects_carried"] == 1
    assert sum(manifest["filter_reject_reasons"].values()) == len(rows) - len(kept_ids)
    # duplicates point at kept rows; kept rows keep input order; all columns preserved
    kept_set = set(kept_ids)
    assert all(dup in kept_set for _, reason, dup in rejects if reason.endswith("duplicate"))
    order = [r["id"] for r in rows]
    assert [order.index(i) for i in kept_ids] == sorted(order.index(i) for i in kept_ids)
    assert read_table(out / "data").schema.names == accepted_schema().names
    # the responses of dropped rows were paid for: they are kept in rejects/
    empty = [r for r in read_table(out / "rejects").to_pylist() if r["reason"] == "empty"]
    assert empty and all(r["response"] == "   " for r in empty)
    import datasets

    assert datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train").num_rows == len(kept_ids)


def test_same_result_for_any_shard_layout_and_batch_size(tmp_path):
    make_dataset(tmp_path / "a", rows_per_shard=1000)
    make_dataset(tmp_path / "b", rows_per_shard=37)
    filter_dataset(tmp_path / "a", tmp_path / "a-out", CONFIG)
    filter_dataset(tmp_path / "b", tmp_path / "b-out", FiltersConfig(near_dedup={"threshold": 0.7}, batch_size=11))
    assert decisions(tmp_path / "a-out") == decisions(tmp_path / "b-out")


def test_dedup_command_reads_the_filters_section_and_reports_bad_keys(tmp_path, prefect_harness):
    from distillflow.config import ConfigError
    from distillflow.flows.dedup import dedup_command

    make_dataset(tmp_path / "in")
    config = tmp_path / "config.yaml"
    config.write_text("filters:\n  near_dedup: {threshold: 0.7}\n  batch_size: 50\n")
    manifest = dedup_command(tmp_path / "in", tmp_path / "out", config)  # the Prefect flow
    filter_dataset(tmp_path / "in", tmp_path / "ref", CONFIG)
    assert decisions(tmp_path / "out") == decisions(tmp_path / "ref")
    assert manifest["config"]["filters"]["near_dedup"]["threshold"] == 0.7
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"] == manifest["counts"]

    config.write_text("filters:\n  near_dedup: {treshold: 0.7}\n")
    with pytest.raises(ConfigError, match="filters.near_dedup.treshold: unknown key"):
        dedup_command(tmp_path / "in", tmp_path / "out2", config)
    with pytest.raises(ConfigError, match="must differ"):
        dedup_command(tmp_path / "in", tmp_path / "in", None, engine="local")


@pytest.mark.slow
def test_dask_engine_gives_the_same_result(tmp_path, prefect_harness):
    """The distributed path: the per-shard map runs in Dask worker processes."""
    pytest.importorskip("prefect_dask")
    from distillflow.flows.dedup import dedup_command

    make_dataset(tmp_path / "in")
    config = tmp_path / "config.yaml"
    config.write_text("filters:\n  near_dedup: {threshold: 0.7}\n  batch_size: 50\n")
    dedup_command(tmp_path / "in", tmp_path / "out", config, engine="dask", workers=2)
    filter_dataset(tmp_path / "in", tmp_path / "ref", CONFIG)
    assert decisions(tmp_path / "out") == decisions(tmp_path / "ref")
    assert pq.read_metadata(next((tmp_path / "out" / "data").glob("*.parquet"))).num_rows > 0
