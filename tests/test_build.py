"""`distill build` end to end: real Prefect, real openai client, the faulty test server, real Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import distillflow.tasks.teacher.openai_client as teacher_module
from distillflow.config import ConfigError, load_config
from distillflow.records import content_id
from distillflow.storage.manifest import read_manifest
from distillflow.storage.parquet import file_sha256, read_table
from tests.openai_server import FaultyOpenAIServer, ServerThread, expected_answer

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-0123456789abcdef"

GOOD = [f"Explain topic number {i} in two sentences." for i in range(30)]
FAULTY = [
    "Rate limited once [[429x1]]",
    "Server hiccup [[500x1]]",
    "Connection dropped once [[dropx1]]",
    "Rejected by the API [[400]]",
    "Cut short [[truncate]] by the length limit",
    "Nothing comes back [[empty]]",
]


def write_seeds(path: Path, prompts: list[str], extra_lines: list[bytes] = ()) -> None:
    lines = [json.dumps({"prompt": p}).encode() for p in prompts] + list(extra_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_config(path: Path, seeds: Path, out: Path, base_url: str, **teacher) -> Path:
    config = {
        "name": "test-build",
        "output_dir": str(out),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"num_prompts": 1000, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0, "evolve": 0.0}},
        "teacher": {
            "backend": "openai",
            "base_url": base_url,
            "model": "test-teacher",
            "api_key_env": "DISTILL_TEST_KEY",
            "max_concurrency": 8,
            "timeout_s": 5,
            "max_retries": 3,
            "batch_size": 16,
            "generation": {"temperature": 0.0, "max_tokens": 256},
            **teacher,
        },
        "filters": {"near_dedup": {"enabled": False}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def server(port):
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as running:
        yield running


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)


def test_build_writes_a_complete_dataset_and_loses_nothing(prefect_harness, server, tmp_path):
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    bad_lines = [b'{"prompt": "broken json', b'{"prompt": "caf\xe9 latin-1"}', b'{"prompt": "   "}']
    write_seeds(seeds, GOOD + FAULTY, bad_lines)
    out = tmp_path / "dataset"
    manifest = build_command(write_config(tmp_path / "c.yaml", seeds, out, server.base_url))

    data = read_table(out / "data").to_pylist()
    rejects = read_table(out / "rejects").to_pylist()
    kept_prompts = {row["prompt"] for row in data}
    assert kept_prompts == set(GOOD) | {FAULTY[0], FAULTY[1], FAULTY[2]}
    for row in data:  # every response belongs to its own prompt
        assert row["response"] == expected_answer(row["prompt"])
        assert row["id"] == content_id(row["prompt"])
        assert row["strategy"] == "seed" and row["teacher_model"] == "test-teacher"
        assert row["finish_reason"] == "stop" and row["completion_tokens"] > 0

    reasons = {row["prompt"]: row["reason"] for row in rejects}
    assert reasons[FAULTY[3]] == "teacher_error:400"
    assert reasons[FAULTY[4]] == "truncated"
    assert reasons[FAULTY[5]] == "empty"
    assert sorted(r for r in reasons.values() if r.startswith("bad_seed")) == [
        "bad_seed:empty",
        "bad_seed:encoding",
        "bad_seed:json",
    ]
    # Invariant: every prompt that entered lands in exactly one of data/ or rejects/.
    ids = [row["id"] for row in data] + [row["id"] for row in rejects]
    assert len(ids) == len(set(ids)) == len(GOOD) + len(FAULTY) + len(bad_lines)
    assert manifest["invariant"]["holds"]
    # The truncated answer was paid for: its text is kept in the reject row.
    truncated = next(row for row in rejects if row["reason"] == "truncated")
    assert truncated["response"]

    on_disk = read_manifest(out)
    assert on_disk["counts"]["accepted"] == len(data)
    assert on_disk["reject_reasons"]["teacher_error:400"] == 1
    assert on_disk["teacher_usage"]["completion_tokens"] > 0
    for shard in on_disk["shards"]["data"] + on_disk["shards"]["rejects"]:
        assert file_sha256(out / shard["path"]) == shard["sha256"]
        assert pq.read_metadata(out / shard["path"]).num_rows == shard["rows"]
        assert pq.read_metadata(out / shard["path"]).row_group(0).column(0).compression == "ZSTD"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\n---\n\n# test-build\n" in card  # Hugging Face header, then the card

    # The key never reaches the dataset, its manifest, card or ledger.
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path

    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert loaded.num_rows == len(data)
    assert set(loaded.column_names) >= {
        "id", "prompt", "response", "strategy", "parent_id", "teacher_model",
        "finish_reason", "prompt_tokens", "completion_tokens", "created_at",
    }


def test_rebuild_pays_nothing_and_gives_the_same_rows(prefect_harness, server, tmp_path, monkeypatch):
    import distillflow.storage.seeds as seeds_module
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:10])
    config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url)
    reads = []
    read_seed_source = seeds_module.read_seed_source
    monkeypatch.setattr(seeds_module, "read_seed_source", lambda *a: reads.append(a) or read_seed_source(*a))
    first = build_command(config)
    assert len(reads) == 1  # the seed file is read once per build
    requests_after_first = server.server.total_requests
    second = build_command(config)
    assert server.server.total_requests == requests_after_first
    assert second["teacher_usage"]["paid_requests"] == 0
    assert second["teacher_usage"]["ledger_hits"] == 10
    assert first["shards"]["data"][0]["sha256"] == second["shards"]["data"][0]["sha256"]


def test_top_logprobs_are_stored_when_asked(prefect_harness, server, tmp_path):
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:4])
    config = write_config(
        tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url,
        generation={"temperature": 0.0, "max_tokens": 256, "top_logprobs": 4},
    )
    build_command(config)
    rows = read_table(tmp_path / "out" / "data").to_pylist()
    for row in rows:
        tokens = row["top_logprobs"]
        assert "".join(t["token"] for t in tokens) == row["response"]
        assert all(len(t["top"]) == 4 for t in tokens)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(temperatur=0.3), "temperatur: unknown key"),
        (lambda c: c["teacher"].update(max_concurrency="many"), "teacher.max_concurrency"),
        (lambda c: c.pop("teacher"), "teacher: required key is missing"),
        (lambda c: c["seeds"][0].update(path="/nowhere/seeds.jsonl"), "seeds.0.path: /nowhere/seeds.jsonl does not exist"),
        (lambda c: c["teacher"].update(api_key_env="sk-live-abcdef0123456789"), "NAME of an environment variable"),
    ],
)
def test_bad_config_fails_before_any_teacher_call(tmp_path, server, change, message):
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    path = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url)
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as raised:
        build_command(path)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)
    assert server.server.total_requests == 0


def test_seed_problems_name_the_file_and_the_fix(tmp_path, server, monkeypatch):
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"question": "hi"}) + "\n")
    path = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url)
    with pytest.raises(ConfigError, match=r"no column 'prompt' \(found: question\).*prompt_column"):
        build_command(path)
    seeds.write_text("\n\n")
    with pytest.raises(ConfigError, match="no usable prompt"):
        build_command(path)
    monkeypatch.delenv("DISTILL_TEST_KEY")
    write_seeds(seeds, GOOD[:2])
    with pytest.raises(ConfigError, match="DISTILL_TEST_KEY is not set"):
        build_command(path)
    assert server.server.total_requests == 0


@pytest.mark.parametrize("fmt", ["csv", "parquet", "hf_disk", "json"])
def test_seed_formats_and_prompt_column(tmp_path, fmt):
    import datasets

    from distillflow.config import SeedSource
    from distillflow.storage.seeds import read_seed_source

    rows = [{"q": "first question"}, {"q": "second question"}, {"q": ""}]
    path = tmp_path / f"seeds.{fmt}"
    dataset = datasets.Dataset.from_list(rows)
    match fmt:
        case "csv":
            dataset.to_csv(str(path), index=False)
        case "parquet":
            dataset.to_parquet(str(path))
        case "json":
            path.write_text(json.dumps(rows))
        case "hf_disk":
            dataset.save_to_disk(str(path))
    prompts, rejects = read_seed_source(SeedSource(path=path, prompt_column="q"))
    assert [p.prompt for p in prompts] == ["first question", "second question"]
    assert [r.reason for r in rejects] == ["bad_seed:empty"]


def test_cli_wrong_key_fails_fast_with_a_clear_message(tmp_path, server):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD)
    config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url, max_concurrency=32)
    # No PREFECT_API_URL: the CLI runs on Prefect's temporary local server, as on a laptop.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DISTILL_TEST_KEY": "sk-wrong-key-000000"}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.cli", "build", str(config)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode != 0
    assert "401" in result.stderr and "DISTILL_TEST_KEY" in result.stderr
    assert "sk-wrong-key-000000" not in result.stderr + result.stdout
    assert server.server.total_requests <= 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_load_config_accepts_the_example_configs():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path, check_files=False)


def test_mixed_strategies_are_traceable_to_their_seeds(prefect_harness, server, tmp_path):
    from distillflow.flows.build import build_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:20])
    path = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url)
    config = yaml.safe_load(path.read_text())
    config["prompts"] = {"num_prompts": 60, "strategies": {"seed": 1.0, "edge_case": 0.5, "adversarial": 0.5}}
    config["filters"] = {}  # defaults: exact + near-duplicate dedup on
    path.write_text(yaml.safe_dump(config))
    manifest = build_command(path)

    data = read_table(tmp_path / "out" / "data").to_pylist()
    rejects = read_table(tmp_path / "out" / "rejects").to_pylist()
    families = {row["strategy"].split(":")[0] for row in data}
    assert {"seed", "edge_case", "adversarial"} <= families
    seed_ids = {content_id(p) for p in GOOD[:20]}
    for row in data + rejects:
        if row["strategy"] != "seed":
            assert row["parent_id"] in seed_ids, row
    for row in rejects:
        if row["reason"] in ("exact_duplicate", "near_duplicate"):
            assert row["duplicate_of"], row
    assert manifest["invariant"]["holds"]
    assert set(manifest["prompt_report"]["per_strategy"]) >= {r["strategy"] for r in data}
    # Same config, same prompts: a rebuild reproduces the dataset byte for byte.
    again = build_command(path)
    assert again["shards"]["data"][0]["sha256"] == manifest["shards"]["data"][0]["sha256"]


def test_local_backend_builds_with_top_logprobs(prefect_harness, tmp_path):
    from distillflow.training.scratch import build_tiny_llama
    from distillflow.flows.build import build_command

    build_tiny_llama(tmp_path / "teacher", seed=3)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    config = {
        "name": "local-build",
        "output_dir": str(tmp_path / "out"),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"num_prompts": 6, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0}},
        "teacher": {
            "backend": "local",
            "model": str(tmp_path / "teacher"),
            "api_key_env": None,
            "local_batch_size": 4,
            "generation": {"temperature": 0.0, "max_tokens": 8, "top_logprobs": 3},
        },
        "filters": {"drop_truncated": False, "quality": {"repetition": False, "refusal": False, "prompt_echo": False}},
    }
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    manifest = build_command(path)
    rows = read_table(tmp_path / "out" / "data").to_pylist()
    rejects = read_table(tmp_path / "out" / "rejects").to_pylist()
    assert len(rows) + len(rejects) == 6 and manifest["invariant"]["holds"]
    answered = [r for r in rows] + [r for r in rejects if r["response"]]
    assert answered, "the local teacher answered nothing"
    for row in rows:
        assert row["teacher_model"] and row["completion_tokens"] <= 8
        assert len(row["top_logprobs"]) == row["completion_tokens"]
        assert all(len(t["top"]) == 3 for t in row["top_logprobs"])
    # Rebuilding takes every answer from the ledger: the model is not even loaded again.
    again = build_command(path)
    assert again["teacher_usage"]["paid_requests"] == 0
