"""Against a real vLLM server on CPU (`.venv-vllm`): chat + logprobs, and a dataset build.

Run with `make test-vllm` (or `pytest -m vllm -o addopts=""`). The teacher is the demo
teacher (head_dim 32, float32), trained on first use in `.cache/demo`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from tests.vllm_server import VLLMServer, vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="no .venv-vllm; run `bash scripts/setup_vllm_venv.sh`"),
]

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "demo-teacher"
PROMPTS = ["What is the capital of France?", "How many legs does a spider have?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    from distillflow.tasks.train.demo_teacher import ensure_demo_teacher

    return ensure_demo_teacher(ROOT / ".cache" / "demo")


@pytest.fixture(scope="module")
def server(teacher_dir):
    with VLLMServer(teacher_dir, served_model_name=SERVED_NAME) as running:
        print(f"\n[vllm] server ready in {running.startup_s:.1f} s", file=sys.stderr)
        yield running


def test_chat_completions_with_top_logprobs_match_transformers(server, teacher_dir):
    import openai

    from distillflow.config import TeacherConfig
    from distillflow.tasks.teacher.local import LocalTeacher

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    local = LocalTeacher(
        TeacherConfig(
            backend="local",
            model=str(teacher_dir),
            device="cpu",
            generation={"temperature": 0.0, "max_tokens": 48, "top_logprobs": 5},
        )
    )
    expected = local.answer_batch([[{"role": "user", "content": p}] for p in PROMPTS])
    for prompt, local_answer in zip(PROMPTS, expected):
        response = client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=48,
            logprobs=True,
            top_logprobs=5,
        )
        choice = response.choices[0]
        assert choice.message.content == local_answer.content
        assert choice.finish_reason == local_answer.finish_reason
        assert response.usage.prompt_tokens == local_answer.prompt_tokens
        assert response.usage.completion_tokens == local_answer.completion_tokens  # eos included
        tokens = choice.logprobs.content
        assert tokens and all(len(token.top_logprobs) == 5 for token in tokens)
        # float32 on both sides: the same distribution (vLLM returns raw logprobs by default).
        local_logprobs = [entry["logprob"] for entry in local_answer.top_logprobs]
        assert [token.logprob for token in tokens] == pytest.approx(local_logprobs, abs=1e-3)


def test_build_dataset_with_top_logprobs_through_vllm(server, prefect_harness, tmp_path):
    from distillflow.flows.build import build_command

    config = {
        "name": "vllm-smoke",
        "output_dir": str(tmp_path / "dataset"),
        "seeds": [{"path": str(ROOT / "prompts" / "seeds" / "general.jsonl")}],
        "prompts": {"num_prompts": 24, "strategies": {"seed": 1.0, "edge_case": 0.3, "adversarial": 0.3}},
        "teacher": {
            "backend": "openai",
            "base_url": server.base_url,
            "model": SERVED_NAME,
            "api_key_env": None,
            "max_concurrency": 8,
            "generation": {"temperature": 0.0, "max_tokens": 48, "top_logprobs": 5},
        },
    }
    config_path = tmp_path / "vllm.yaml"
    config_path.write_text(yaml.safe_dump(config))

    started = time.monotonic()
    manifest = build_command(config_path)
    print(f"\n[vllm] dataset build took {time.monotonic() - started:.1f} s", file=sys.stderr)

    table = pads.dataset(tmp_path / "dataset" / "data", format="parquet").to_table()
    assert table.num_rows > 0
    assert table.num_rows == manifest["counts"]["accepted"]
    assert "top_logprobs" in table.column_names
    rows = table.to_pylist()
    assert all(row["response"] and row["teacher_model"] == SERVED_NAME for row in rows)
    for row in rows:
        entries = row["top_logprobs"]
        assert entries, row["prompt"]
        assert all(len(entry["top"]) == 5 for entry in entries)
        assert all(entry["logprob"] <= 0.0 for entry in entries)
