"""The demo teacher: built once per version key, deterministic, and it answers in sentences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distillflow.config import TeacherConfig
from distillflow.demo import STAMP_FILE, DemoTrainingSettings, demo_corpus, ensure_demo_teacher
from tasks.teacher_local import LocalTeacher

ROOT = Path(__file__).resolve().parents[1]
QUICK = DemoTrainingSettings(steps=4, batch_size=8)


def weights_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_corpus_is_deterministic_and_has_refusals():
    assert demo_corpus(0) == demo_corpus(0)
    assert demo_corpus(0) != demo_corpus(1)
    answers = {answer for _, answer in demo_corpus(0)}
    assert "I'm sorry, but I can't help with that." in answers
    assert "The capital of France is Paris." in answers


def test_built_once_then_reused_and_rebuilt_on_a_new_version(tmp_path):
    model_dir = ensure_demo_teacher(tmp_path, QUICK)
    assert model_dir == tmp_path / "demo-teacher"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    stamp = json.loads((model_dir / STAMP_FILE).read_text())
    built_at = (model_dir / "model.safetensors").stat().st_mtime_ns

    assert ensure_demo_teacher(tmp_path, QUICK) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == built_at  # not rebuilt

    other = DemoTrainingSettings(steps=5, batch_size=8)
    ensure_demo_teacher(tmp_path, other)
    assert json.loads((model_dir / STAMP_FILE).read_text())["version_key"] != stamp["version_key"]
    assert not list(tmp_path.glob(".demo-teacher.tmp-*"))  # no staging dir left behind


def test_same_settings_give_the_same_weights(tmp_path):
    first = ensure_demo_teacher(tmp_path / "a", QUICK)
    second = ensure_demo_teacher(tmp_path / "b", QUICK)
    assert weights_digest(first) == weights_digest(second)


@pytest.mark.slow
def test_trained_teacher_answers_short_sentences():
    # The real thing, in the cache `distill demo` uses (trained once per machine, ~1 min).
    model_dir = ensure_demo_teacher(ROOT / ".cache" / "demo")
    stamp = json.loads((model_dir / STAMP_FILE).read_text())
    assert stamp["final_loss"] < 0.5 * stamp["first_loss"]

    config = TeacherConfig(
        backend="local", model=str(model_dir), device="cpu", generation={"temperature": 0.0, "max_tokens": 48}
    )
    prompts = ["What is the capital of France?", "How many legs does a spider have?", "Explain gravity."]
    answers = LocalTeacher(config).answer_batch([[{"role": "user", "content": p}] for p in prompts])
    assert [a.content for a in answers] == [
        "The capital of France is Paris.",
        "A spider has 8 legs.",
        "Gravity is the force that pulls masses toward each other.",
    ]
    assert all(a.finish_reason == "stop" for a in answers)
