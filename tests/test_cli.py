"""The `distill` command line: help everywhere, inspect, and the deployment form schema."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distillflow.cli import app
from tests.test_build import API_KEY, GOOD, write_config, write_seeds
from tests.openai_server import FaultyOpenAIServer, ServerThread

runner = CliRunner()
COMMANDS = ["build", "dedup", "capture-logits", "train", "eval", "inspect", "demo", "run", "serve", "deploy", "server"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_missing_config_is_a_one_paragraph_error(tmp_path):
    result = runner.invoke(app, ["build", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "config file not found" in result.output


def test_inspect_shows_counts_histograms_and_samples(prefect_harness, tmp_path, port, monkeypatch):
    from distillflow.flows.build import build_command

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:12] + ["refused [[400]]"])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        build_command(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", server.base_url))
    result = runner.invoke(app, ["inspect", str(tmp_path / "out"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "dataset  test-build" in text
    assert "accepted rows per strategy (12 rows)" in text
    assert "teacher_error:400" in text
    assert "response length (chars):" in text and "p50" in text
    assert text.count("    prompt:   ") == 2

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert {"test-build-counts", "test-build-prompts"} <= keys
    table = next(a for a in artifact if a.key == "test-build-counts")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {"stage": "accepted", "reason": "", "count": 12} in rows


def test_inspect_a_directory_without_manifest_warns(tmp_path):
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0
    assert "WARNING: no manifest.json" in result.output


def test_build_deployment_exposes_the_config_as_a_form(tmp_path):
    from distillflow.flows.build import build_dataset

    deployment = build_dataset.to_deployment(name="form-check")
    schema = deployment._parameter_openapi_schema.model_dump()
    assert schema["required"] == ["config"]
    definitions = schema["definitions"]
    teacher = definitions["TeacherConfig"]["properties"]
    assert {"base_url", "model", "api_key_env", "max_concurrency", "generation"} <= set(teacher)
    assert "api_key" not in teacher  # only the env var's name is a parameter
    assert definitions["TeacherConfig"]["properties"]["max_concurrency"]["minimum"] == 1
