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

from tests.test_greybox import student_dir  # noqa: F401  # the student fixture, another vocabulary
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


def test_capture_through_vllm_with_another_vocabulary_matches_local_and_feeds_kd_greybox(student_dir, tmp_path):
    """`capture.source: vllm` for a teacher whose vocabulary is not the student's: the top-k a
    real vLLM server gives equals the in-process capture (same tokens, logprobs within 1e-3
    in float32), and kd_greybox aligns it to the student's tokens as it does the local one."""
    import numpy as np

    from distillflow.storage.parquet import read_table
    from distillflow.storage.topk import decode_topk
    from distillflow.tasks.capture.logits import capture_dataset
    from distillflow.training.vocabulary import load_tokenizer
    from tests.test_capture_logits import settings_for, write_dataset
    from tests.test_greybox import answer_rows, greybox_examples, opinionated_teacher

    teacher = opinionated_teacher(tmp_path / "teacher")
    assert load_tokenizer(teacher).get_vocab() != load_tokenizer(student_dir).get_vocab()
    local = write_dataset(tmp_path / "local", rows=answer_rows(), rows_per_shard=8)
    served = write_dataset(tmp_path / "served", rows=answer_rows(), rows_per_shard=8)
    capture_dataset(settings_for(teacher, local, local, max_length=256))
    with VLLMServer(teacher, served_model_name="opinionated") as server:
        capture_dataset(settings_for(teacher, served, served, max_length=256, source="vllm", model="opinionated",
                                     base_url=server.base_url, device="auto", timeout_s=300.0))

    def blobs(dataset: Path) -> dict[str, tuple]:
        table = read_table(dataset / "data", columns=["id", "teacher_topk"]).to_pylist()
        return {row["id"]: decode_topk(row["teacher_topk"]) for row in table}

    expected, got = blobs(local), blobs(served)
    assert expected.keys() == got.keys() and len(expected) == len(answer_rows())
    for row_id, (ids, logprobs) in expected.items():
        served_ids, served_logprobs = got[row_id]
        assert served_logprobs.shape == logprobs.shape
        np.testing.assert_allclose(served_logprobs, logprobs, atol=1e-3)
        # The same tokens, except where two alternatives are tied (their order is then arbitrary).
        gaps = np.abs(np.diff(logprobs, axis=1)) < 1e-3  # (T, k - 1)
        tied = np.zeros(ids.shape, dtype=bool)
        tied[:, :-1] |= gaps
        tied[:, 1:] |= gaps
        assert not ((served_ids != ids) & ~tied).any(), row_id

    local_coverage = greybox_examples(student_dir, local, tmp_path / "cache-local")[2].to_dict()
    served_coverage = greybox_examples(student_dir, served, tmp_path / "cache-served")[2].to_dict()
    assert served_coverage == local_coverage and served_coverage["covered_share"] > 0.8, served_coverage
