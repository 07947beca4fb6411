"""Base models (no chat template) as teacher and student, the preflight, and one error paragraph.

A "base model" here is a tiny Llama whose tokenizer was saved without a chat template, as
pretrained base checkpoints ship.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.config import ConfigError, load_config
from distillflow.training.scratch import build_tiny_llama
from tests.conftest import free_port
from tests.test_build import GOOD, write_seeds

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def save_as_base_model(model_dir: Path) -> Path:
    """Drop the chat template from a saved tokenizer (file and tokenizer_config.json)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(model_dir))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config.get("chat_template") is None and not (model_dir / "chat_template.jinja").exists()
    return model_dir


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base-model")
    build_tiny_llama(path, hidden_size=64, num_heads=2, num_layers=2, vocab_size=320, seed=1)
    return save_as_base_model(path)


def build_config(tmp_path: Path, teacher: Path, **top_level) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    config = {
        "name": "base-build",
        "output_dir": str(tmp_path / "out"),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"num_prompts": 6, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0}},
        "teacher": {
            "backend": "local",
            "model": str(teacher),
            "api_key_env": None,
            "device": "cpu",
            "local_batch_size": 6,
            "generation": {"temperature": 0.0, "max_tokens": 8},
        },
        "filters": {"drop_truncated": False, "near_dedup": {"enabled": False},
                    "quality": {"repetition": False, "refusal": False, "prompt_echo": False}},
        **top_level,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_error_paragraph(stderr: str) -> str:
    """The `error:` paragraph, checked to be the only one and the last thing printed."""
    assert stderr.count("error: ") == 1, stderr
    paragraph = stderr[stderr.index("error: "):].strip()
    assert "\n\n" not in paragraph, paragraph
    return paragraph


@pytest.mark.parametrize("command", ["build", "run"])
def test_a_base_model_teacher_fails_in_the_preflight_without_a_teacher_call(base_model, tmp_path, monkeypatch, command):
    from distillflow.tasks.teacher import local as teacher_local
    loaded = []
    monkeypatch.setattr(teacher_local.LocalTeacher, "__init__", lambda *args: loaded.append(args))
    config = build_config(tmp_path, base_model)
    result = runner.invoke(app, [command, str(config)], env={"DISTILL_LOG_DIR": str(tmp_path / "logs")})
    assert result.exit_code == 1
    paragraph = one_error_paragraph(result.output)
    assert result.output.startswith("error: ")  # nothing ran before it: no flow, no progress lines
    assert str(config) in paragraph and "teacher.model" in paragraph
    assert "has no chat template" in paragraph and "chat_template: plain" in paragraph
    assert "Traceback" not in result.output
    assert loaded == []  # the teacher was never loaded, so never asked
    assert not (tmp_path / "out").exists()  # no ledger, no dataset


def test_an_unknown_preset_names_the_key_and_the_presets(base_model, tmp_path):
    config = build_config(tmp_path, base_model, chat_template="chatml-ish")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "chat_template" in str(caught.value) and "presets are: plain" in str(caught.value)
    path = build_config(tmp_path, base_model, chat_template="templates/missing.jinja")
    with pytest.raises(ConfigError, match="chat template file templates/missing.jinja not found"):
        load_config(path)


def test_the_shared_template_reaches_teacher_training_and_capture(base_model, tmp_path):
    from distillflow.tasks.capture.logits import resolve_capture_settings

    path = build_config(tmp_path, base_model, chat_template="plain")
    data = yaml.safe_load(path.read_text())
    data["training"] = {"dataset_dir": str(tmp_path / "out"), "output_dir": str(tmp_path / "run"),
                        "student": str(base_model), "teacher": str(base_model), "objective": "kd_topk"}
    data["capture"] = {"source": "local"}
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.teacher.chat_template == config.training.chat_template == "plain"
    assert resolve_capture_settings(config).chat_template == "plain"
    data["capture"]["chat_template"] = "{{ messages[0]['content'] }}"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="capture.chat_template .* differs from training.chat_template"):
        load_config(path)


def test_the_preflight_checks_the_context_and_the_vocabularies(tmp_path):
    short = tmp_path / "short"
    build_tiny_llama(short, hidden_size=64, num_heads=2, num_layers=1, vocab_size=320, max_position_embeddings=32)
    result = runner.invoke(app, ["build", str(build_config(tmp_path, short))], env={"DISTILL_LOG_DIR": str(tmp_path / "logs")})
    paragraph = one_error_paragraph(result.output)
    assert result.exit_code == 1 and "max_position_embeddings" in paragraph
    assert "teacher.generation.max_tokens (8) + the longest seed prompt" in paragraph
    assert re.search(r"lower teacher.generation.max_tokens to -?\d+|shorten the longest seeds", paragraph)

    other = tmp_path / "other"  # another vocabulary: a tokenizer trained on other text
    build_tiny_llama(other, hidden_size=64, num_heads=2, num_layers=1, corpus=["completely different words"] * 3)
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({
        "dataset_dir": str(tmp_path / "ds"), "output_dir": str(tmp_path / "run"), "student": str(other),
        "teacher": str(short), "objective": "kd_logits", "max_length": 32,
    }))
    result = runner.invoke(app, ["train", str(train)], env={"DISTILL_LOG_DIR": str(tmp_path / "logs")})
    paragraph = one_error_paragraph(result.output)
    assert result.exit_code == 1 and "training.teacher and training.student" in paragraph
    assert "objective: kd_greybox" in paragraph and " or sft" in paragraph and "Traceback" not in result.output


def test_a_failure_inside_a_task_is_one_paragraph_and_the_log_holds_the_traceback(base_model, tmp_path, prefect_server):
    # Weights that do not load pass the preflight (config and tokenizer are fine) and fail
    # inside the build's first teacher task.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in base_model.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = build_config(tmp_path, broken, chat_template="plain")
    env = {**os.environ, **prefect_server, "DISTILL_LOG_DIR": str(tmp_path / "logs"), "PREFECT_LOGGING_LEVEL": "INFO"}
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.cli", "build", str(config)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr
    paragraph = one_error_paragraph(result.stderr)
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr
    assert "Task run failed" not in result.stderr and "Finished in state Failed" not in result.stderr
    assert result.stderr.rstrip().endswith(paragraph)  # nothing printed after it
    assert f"the weights in {broken} do not load" in paragraph
    assert re.search(r"in task run 'answer-batch-\w+' of flow run '[\w-]+'", paragraph), paragraph
    log = Path(re.search(r"full traceback: (\S+?\.log)", paragraph).group(1))
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in answer_batch_task" in text
    assert "prefect.task_runs - Task run failed" in text  # Prefect's own report is kept in the file


def test_verbose_prints_the_traceback(base_model, tmp_path, prefect_server):
    missing_column = tmp_path / "missing.yaml"
    config = yaml.safe_load(build_config(tmp_path, base_model, chat_template="plain").read_text())
    config["seeds"][0]["prompt_column"] = "question"  # the seeds have `prompt`
    missing_column.write_text(yaml.safe_dump(config))
    env = {**os.environ, **prefect_server, "DISTILL_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(
        [sys.executable, "-m", "distillflow.cli", "build", str(missing_column), "--verbose"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "storage/seeds.py" in result.stderr
    assert "no column 'question'" in one_error_paragraph(result.stderr)


def plain_kd_config(tmp_path: Path, base_model: Path) -> Path:
    path = build_config(tmp_path, base_model, chat_template="plain")
    data = yaml.safe_load(path.read_text())
    data["capture"] = {"source": "local", "k": 4, "device": "cpu"}
    data["training"] = {
        "dataset_dir": str(tmp_path / "out"), "output_dir": str(tmp_path / "run"), "student": str(base_model),
        "teacher": str(base_model), "objective": "kd_topk", "max_length": 64, "max_steps": 1,
        "micro_batch_size": 2, "master_port": free_port(),
    }
    path.write_text(yaml.safe_dump(data))
    return path


def build_and_capture(path: Path) -> dict:
    from distillflow.flows.build import build_command
    from distillflow.flows.capture_logits import capture_logits_command

    manifest = build_command(path)
    assert manifest["counts"]["teacher_answered"] == 6 and manifest["teacher_usage"]["paid_requests"] == 6
    capture = capture_logits_command(path)
    assert capture["rows"] == manifest["counts"]["accepted"] > 0
    return manifest


def test_a_base_model_with_the_plain_template_builds_and_captures_aligned_logits(base_model, tmp_path, prefect_harness):
    from distillflow.storage.parquet import read_table
    from distillflow.storage.topk import decode_topk
    from distillflow.training.chat_template import PLAIN
    from distillflow.training.data import IGNORE_INDEX, encode_example
    from distillflow.training.vocabulary import load_tokenizer

    build_and_capture(plain_kd_config(tmp_path, base_model))
    rows = read_table(tmp_path / "out" / "data").to_pylist()
    tokenizer = load_tokenizer(base_model)
    assert tokenizer.chat_template is None  # the student tokenizer itself has none
    for row in rows:
        assert row["response"] and row["teacher_topk_model"]
        # What training will supervise, tokenised with the shared template: one top-k row each.
        labels = encode_example(tokenizer, row["prompt"], row["response"], max_length=64, chat_template=PLAIN)["labels"]
        supervised = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        ids, _ = decode_topk(row["teacher_topk"])
        assert ids.shape == (supervised, 4)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_base_model_with_the_plain_template_builds_captures_and_trains(base_model, tmp_path, prefect_harness):
    from distillflow.flows.train import train_command
    from distillflow.training.chat_template import PLAIN

    path = plain_kd_config(tmp_path, base_model)
    build_and_capture(path)
    metrics = train_command(path)  # kd_topk reads the captured positions: they line up or it fails
    assert metrics["steps"] == 1 and metrics["objective"] == "kd_topk"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "run" / "final")).chat_template == PLAIN


def test_a_successful_command_leaves_no_log_file(tmp_path):
    (tmp_path / "ds" / "data").mkdir(parents=True)
    logs = tmp_path / "logs"
    result = runner.invoke(app, ["inspect", str(tmp_path / "ds")], env={"DISTILL_LOG_DIR": str(logs)})
    assert result.exit_code == 0, result.output
    assert not logs.exists() or list(logs.iterdir()) == []
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing")], env={"DISTILL_LOG_DIR": str(logs)})
    assert result.exit_code == 1 and one_error_paragraph(result.output)
    assert len(list(logs.iterdir())) == 1  # a failure keeps its log


def test_eval_preflights_its_model_directories(base_model, tmp_path):
    eval_set = tmp_path / "questions.jsonl"
    eval_set.write_text(json.dumps({"prompt": "What is 2+2?", "reference": "4"}) + "\n")
    config = tmp_path / "eval.yaml"
    evaluation = {"output_dir": str(tmp_path / "eval"), "eval_sets": [{"path": str(eval_set)}],
                  "models": [{"name": "base", "path": str(base_model)}], "speed": None}
    config.write_text(yaml.safe_dump({"evaluation": evaluation}))
    result = runner.invoke(app, ["eval", str(config)])
    paragraph = one_error_paragraph(result.output)
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "evaluation.models.0.path" in paragraph and "evaluation.models.0.chat_template" in paragraph
    assert not (tmp_path / "eval").exists()  # no flow started


def test_the_preflight_loads_no_torch_and_a_broken_config_json_is_one_paragraph(tmp_path):
    """`distill train` checks its model directories before it launches the trainer process,
    which imports torch itself: the check must not import torch too (~2 s of every start)."""
    model = tmp_path / "model"
    build_tiny_llama(model, hidden_size=64, num_heads=2, num_layers=1, vocab_size=320, max_position_embeddings=64)
    check = (
        "import sys\n"
        "from distillflow.tasks.preflight import preflight_training\n"
        "from distillflow.training.config import TrainingConfig\n"
        f"config = TrainingConfig(dataset_dir={str(tmp_path / 'ds')!r}, output_dir={str(tmp_path / 'run')!r},\n"
        f"    student={str(model)!r}, teacher={str(model)!r}, objective='kd_logits', max_length=64)\n"
        "preflight_training(config, 'train.yaml')\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout

    from transformers import AutoTokenizer

    from distillflow.tasks.preflight import PreflightError, load_model_dir
    from distillflow.training.vocabulary import load_tokenizer

    loaded, auto = load_tokenizer(model), AutoTokenizer.from_pretrained(str(model))
    assert type(loaded) is type(auto) and loaded.get_vocab() == auto.get_vocab()
    assert load_model_dir(model, "training.student", "train.yaml").context == 64

    (model / "config.json").write_text('{"model_type": "llama", ')  # cut short
    with pytest.raises(PreflightError, match=r"train.yaml: training.student: .*config.json does not load .*save_pretrained"):
        load_model_dir(model, "training.student", "train.yaml")
