"""kd_greybox: training from the build's stored API top-k logprobs with a student whose
tokenizer differs from the teacher's (training/greybox.py), its preflight, and a build →
train run against the fake OpenAI-compatible server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from distillflow.storage.parquet import TOP_LOGPROBS_TYPE, write_table_atomic
from distillflow.training.token_align import NONE
from tests.openai_server import _fake_logprobs

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Name fact {i} about rivers and lakes." for i in range(12)]
# Learnable answers (a tiny student memorises them in a few dozen steps), with words the
# student's BPE splits and merges differently from the teacher's one-token-per-word.
RESPONSES = ["The river is long and wide.", "A lake is calm, deep and cold.", "Rivers run to the sea, day after day."]
K = 5


def stored_logprobs(response: str, k: int = K) -> list[dict]:
    """What the build stores from the API's `logprobs.content` (tasks/teacher: token, logprob, top)."""
    return [
        {"token": item["token"], "logprob": item["logprob"],
         "top": [{"token": alt["token"], "logprob": alt["logprob"]} for alt in item["top_logprobs"]]}
        for item in _fake_logprobs(response.split(" "), k)
    ]


def write_api_dataset(out: Path, with_logprobs: bool = True) -> Path:
    rows = []
    for index, prompt in enumerate(PROMPTS):
        response = RESPONSES[index % len(RESPONSES)]
        row = {"id": f"row-{index}", "prompt": prompt, "response": response}
        if with_logprobs:
            row["top_logprobs"] = stored_logprobs(response)
        rows.append(row)
    fields = [("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())]
    if with_logprobs:
        fields.append(("top_logprobs", TOP_LOGPROBS_TYPE))
    write_table_atomic(pa.Table.from_pylist(rows, schema=pa.schema(fields)), out / "data" / "part-00000.parquet")
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose byte-level BPE (trained in process on the demo's corpus) splits the
    teacher's word tokens its own way."""
    from distillflow.training.scratch import build_tiny_llama

    path = tmp_path_factory.mktemp("greybox") / "student"
    build_tiny_llama(path, hidden_size=64, num_layers=2, num_heads=2, vocab_size=300, seed=2)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_api_dataset(tmp_path_factory.mktemp("greybox-data"))


def greybox_examples(student_dir: Path, dataset: Path, cache: Path):
    from distillflow.training.data import tokenize_dataset
    from distillflow.training.greybox import attach_greybox
    from distillflow.training.vocabulary import load_tokenizer

    tokenizer = load_tokenizer(student_dir)
    examples = tokenize_dataset(dataset, tokenizer, None, 256, cache)
    coverage = attach_greybox(examples, dataset, tokenizer)
    return tokenizer, examples, coverage


def test_a_different_tokenizer_gets_teacher_distributions_at_most_positions(student_dir, dataset, tmp_path):
    tokenizer, examples, coverage = greybox_examples(student_dir, dataset, tmp_path)
    counts = coverage.to_dict()
    # every answer token but the end-of-turn token the template adds (which the API never reports)
    assert counts["none"] == len(examples)
    assert counts["exact"] > 0 and counts["merged"] > 0, counts
    assert counts["covered_share"] > 0.8, counts
    for example in examples:
        supervised = int((example["labels"] != -100).sum())
        assert example["topk_ids"].shape[0] == supervised == example["row_kind"].shape[0]
        assert example["topk_ids"].max() < len(tokenizer)
        kinds = example["row_kind"]
        taught = kinds != NONE
        mass = (torch.from_numpy(example["topk_logprobs"]).exp() * torch.from_numpy(example["topk_valid"])).sum(-1)
        assert bool((mass[torch.from_numpy(taught)] <= 1.0 + 1e-5).all())


def _train(student_dir: Path, dataset: Path, tmp_path: Path, objective: str, steps: int = 60):
    from distillflow.training.config import TrainingConfig
    from distillflow.training.data import collate
    from distillflow.training.model import DistillationModel, load_causal_lm

    tokenizer, examples, _ = greybox_examples(student_dir, dataset, tmp_path / "cache")
    config = TrainingConfig(
        dataset_dir=dataset, output_dir=tmp_path / objective, student=student_dir, objective=objective,
        alpha=1.0 if objective == "kd_greybox" else 0.5, learning_rate=3e-3, max_length=256,
    )
    torch.manual_seed(0)
    model = DistillationModel(load_causal_lm(student_dir), config, len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    history = []
    for _ in range(steps):
        sums = model(batch)
        optimizer.zero_grad()
        (sums[0] / batch.num_supervised).backward()
        optimizer.step()
        history.append((sums / batch.num_supervised).detach())
    return model, batch, history


def test_kd_greybox_teaches_the_teachers_alternatives_that_sft_never_shows(student_dir, dataset, tmp_path):
    """The user-visible effect: the grey-box student's next-token distributions end up much
    closer to the teacher's (including the second choices the teacher reported) than an sft
    student's after the same steps, on the same answers, with another tokenizer."""
    kd_model, batch, kd_history = _train(student_dir, dataset, tmp_path, "kd_greybox")
    sft_model, _, _ = _train(student_dir, dataset, tmp_path, "sft")
    assert kd_history[0][1] > 0 and kd_history[-1][1] < 0.5 * kd_history[0][1]  # the KD term is there and falls
    with torch.no_grad():
        kd_distance = (kd_model(batch)[1] / batch.num_supervised).item()
        sft_as_kd = type(kd_model)(sft_model.student, kd_model.config, kd_model.vocab_size)
        sft_distance = (sft_as_kd(batch)[1] / batch.num_supervised).item()
    assert kd_distance < 0.5 * sft_distance, (kd_distance, sft_distance)  # measured: 0.031 against 0.131

    rows = ((batch.row_kind != NONE) & batch.topk_valid[:, 1]).nonzero()[:, 0]  # a second teacher choice
    second_ids, teacher_second = batch.topk_ids[rows, 1], batch.topk_logprobs[rows, 1].exp()

    def second_choice_probability(model):
        from distillflow.training.losses import select_supervised

        with torch.no_grad():
            hidden = model.student.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
            states, _ = select_supervised(hidden, batch.labels)
            probs = torch.softmax(model.student.get_output_embeddings()(states), -1)
        return probs[rows, second_ids]

    kd_error = (second_choice_probability(kd_model) - teacher_second).abs().mean()
    sft_error = (second_choice_probability(sft_model) - teacher_second).abs().mean()
    assert kd_error < 0.5 * sft_error, (kd_error, sft_error)  # measured: 0.007 against 0.063


def test_no_logprobs_fails_in_preflight_naming_the_fix(student_dir, tmp_path):
    from distillflow.tasks.preflight import PreflightError, preflight_training
    from distillflow.training.config import TrainingConfig
    from distillflow.training.greybox import NoTeacherLogprobs, attach_greybox
    from distillflow.training.vocabulary import load_tokenizer

    bare = write_api_dataset(tmp_path / "bare", with_logprobs=False)
    config = TrainingConfig(dataset_dir=bare, output_dir=tmp_path / "run", student=student_dir, objective="kd_greybox")
    with pytest.raises(PreflightError) as error:
        preflight_training(config, "run.yaml")
    message = str(error.value)
    assert "\n" not in message and "run.yaml" in message
    assert "teacher.generation.top_logprobs" in message and "distill build" in message and "top_logprobs column" in message
    # training itself refuses as well (it never falls back to sft)
    with pytest.raises(NoTeacherLogprobs, match="teacher.generation.top_logprobs"):
        attach_greybox([], bare, load_tokenizer(student_dir))


def test_a_provider_that_returned_no_logprobs_is_named(student_dir, tmp_path):
    from distillflow.training.greybox import NoTeacherLogprobs, check_greybox_dataset

    rows = [{"id": "a", "prompt": "p", "response": "r", "top_logprobs": None}]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("top_logprobs", TOP_LOGPROBS_TYPE)])
    write_table_atomic(pa.Table.from_pylist(rows, schema=schema), tmp_path / "ds" / "data" / "part-00000.parquet")
    with pytest.raises(NoTeacherLogprobs, match="the provider returned none"):
        check_greybox_dataset(tmp_path / "ds")


def test_run_preflight_refuses_kd_greybox_when_the_build_stores_no_logprobs(tmp_path):
    from distillflow.config import DistillConfig
    from distillflow.tasks.preflight import PreflightError, preflight_run

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"prompt": "hi"}) + "\n")
    config = DistillConfig.model_validate({
        "name": "g", "output_dir": str(tmp_path / "out"), "seeds": [{"path": str(seeds)}],
        "teacher": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "generation": {"top_logprobs": 0}},
        "training": {"dataset_dir": str(tmp_path / "out"), "output_dir": str(tmp_path / "run"), "student": str(tmp_path / "s"),
                     "objective": "kd_greybox"},
    })
    with pytest.raises(PreflightError, match="teacher.generation.top_logprobs is 0"):
        preflight_run(config, "run.yaml", ["hi"])


def test_the_vocabulary_refusal_names_the_grey_box_objective(student_dir, tmp_path):
    from distillflow.training.scratch import train_tokenizer
    from distillflow.training.vocabulary import VocabularyMismatch, load_tokenizer, vocabulary_preflight

    student = load_tokenizer(student_dir)
    teacher = train_tokenizer(tmp_path / "teacher-tok", corpus=["completely different text " * 5], vocab_size=280)
    with pytest.raises(VocabularyMismatch, match="objective: kd_greybox"):
        vocabulary_preflight(teacher, student, len(teacher), len(student))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_build_then_train_kd_greybox_with_another_tokenizer_and_resume(prefect_harness, student_dir, tmp_path, monkeypatch):
    """`distill build` against the fake OpenAI-compatible server (logprobs in the API's shape)
    → `python -m distillflow.training.train` with kd_greybox: the coverage is logged and saved,
    the KD term is there, and a rerun with more steps resumes from the checkpoint."""
    import distillflow.tasks.teacher.openai_client as teacher_module
    from distillflow.flows.build import build_command
    from distillflow.storage.parquet import read_table
    from tests.conftest import free_port
    from tests.openai_server import FaultyOpenAIServer, ServerThread
    from tests.test_build import API_KEY, write_config, write_seeds

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, PROMPTS[:8])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as server:
        config = write_config(
            tmp_path / "build.yaml", seeds, tmp_path / "out", server.base_url,
            generation={"temperature": 0.0, "max_tokens": 256, "top_logprobs": K},
        )
        build_command(config)
    rows = read_table(tmp_path / "out" / "data").to_pylist()
    assert rows and all(len(row["top_logprobs"][0]["top"]) == K for row in rows)
    # What the stored logprobs give, in the manifest, the dataset card and `distill inspect`.
    from distillflow.storage.inspect import inspect_dataset

    coverage = json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher_logprobs"]
    tokens = sum(len(row["top_logprobs"]) for row in rows)
    assert coverage["rows"] == coverage["rows_with_logprobs"] == len(rows)
    assert coverage["answer_tokens"] == coverage["tokens_with_alternatives"] == tokens
    assert coverage["mean_alternatives"] == coverage["fewest_alternatives"] == coverage["requested_alternatives"] == K
    line = f"answer tokens with alternatives: {tokens} of {tokens} (100.0%)"
    assert line in (tmp_path / "out" / "README.md").read_text()
    assert line in inspect_dataset(tmp_path / "out")
    # The HTML report counts every shard too, also for a dataset whose manifest predates the count.
    import shutil

    from distillflow.storage.inspect import load_view
    from distillflow.storage.report import render_html

    assert line in render_html(load_view(tmp_path / "out"))
    older = shutil.copytree(tmp_path / "out", tmp_path / "older")
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["teacher_logprobs"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert line in render_html(load_view(older))

    out = tmp_path / "run"

    def train(steps: int) -> subprocess.CompletedProcess:
        path = tmp_path / f"train-{steps}.yaml"
        path.write_text(yaml.safe_dump({"training": {
            "dataset_dir": str(tmp_path / "out"), "output_dir": str(out), "student": str(student_dir),
            "objective": "kd_greybox", "temperature": 2.0, "alpha": 0.5, "max_length": 256, "max_steps": steps,
            "micro_batch_size": 2, "checkpoint_every": 1, "master_port": free_port(),
        }}))
        env = dict(os.environ, PYTHONPATH=str(ROOT.parent), MASTER_PORT=str(free_port()))
        return subprocess.run([sys.executable, "-m", "distillflow.training.train", "--config", str(path)],
                              capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "grey-box targets:" in first.stdout and "carry a teacher distribution" in first.stdout
    summary = json.loads((out / "metrics.json").read_text())
    coverage = summary["greybox_coverage"]
    assert coverage["covered_share"] > 0.5 and coverage["exact"] + coverage["merged"] > 0, coverage
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(step["kd"] > 0 and math.isfinite(step["loss"]) for step in steps)

    again = train(3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    steps_after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step["step"] for step in steps_after] == [1, 2, 3]
    assert steps_after[:2] == steps[:2] or [s["loss"] for s in steps_after[:2]] == [s["loss"] for s in steps[:2]]


# -- a teacher we run ourselves, with another vocabulary, through `distill capture-logits` --


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, dataset): a tiny Llama whose BPE (320 tokens) is not the student's (300),
    and the rows of `write_api_dataset` with its top-k captured in its own tokenisation."""
    from distillflow.tasks.capture.logits import capture_dataset
    from tests.test_capture_logits import settings_for, write_dataset

    root = tmp_path_factory.mktemp("greybox-capture")
    teacher = opinionated_teacher(root / "teacher")
    dataset = write_dataset(root / "data", rows=answer_rows(), rows_per_shard=8)
    capture_dataset(settings_for(teacher, dataset, dataset, max_length=256))
    return teacher, dataset


def answer_rows() -> list[tuple[str, str]]:
    return [(prompt, RESPONSES[index % len(RESPONSES)]) for index, prompt in enumerate(PROMPTS)]


def opinionated_teacher(path: Path) -> Path:
    """A tiny Llama (head_dim 32, as vLLM's CPU attention needs) over a 320-token BPE."""
    from transformers import AutoModelForCausalLM

    from distillflow.training.scratch import build_tiny_llama

    build_tiny_llama(path, hidden_size=64, num_heads=2, num_layers=2, vocab_size=320, seed=1)
    # A random tiny model is near uniform over its vocabulary; scaling the final norm makes its
    # distributions peaked (a teacher with opinions), so that the top-k carries most of the mass.
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(str(path))
    return path


def test_captured_topk_of_a_teacher_with_another_vocabulary_trains_kd_greybox(student_dir, captured, tmp_path):
    """capture-logits with the teacher's own tokenizer → kd_greybox with the student's: most
    answer positions carry the teacher's distribution, and training moves the student's
    distributions towards it much more than sft on the same answers."""
    from distillflow.training.vocabulary import load_tokenizer

    teacher, dataset = captured
    assert load_tokenizer(teacher).get_vocab() != load_tokenizer(student_dir).get_vocab()
    _, examples, coverage = greybox_examples(student_dir, dataset, tmp_path / "cache")
    counts = coverage.to_dict()
    assert counts["exact"] > 0 and counts["merged"] > 0 and counts["covered_share"] > 0.8, counts

    kd_model, batch, kd_history = _train(student_dir, dataset, tmp_path, "kd_greybox", steps=40)
    sft_model, _, _ = _train(student_dir, dataset, tmp_path, "sft", steps=40)
    assert kd_history[0][1] > 0.5 and kd_history[-1][1] < 0.1 * kd_history[0][1]  # measured: 2.39 → 0.039
    with torch.no_grad():
        kd_distance = (kd_model(batch)[1] / batch.num_supervised).item()
        sft_as_kd = type(kd_model)(sft_model.student, kd_model.config, kd_model.vocab_size)
        sft_distance = (sft_as_kd(batch)[1] / batch.num_supervised).item()
    assert kd_distance < 0.2 * sft_distance, (kd_distance, sft_distance)  # measured: 0.033 against 4.04


def test_preflight_takes_a_different_vocabulary_teacher_for_kd_greybox_and_names_it_otherwise(
    student_dir, captured, tmp_path
):
    from distillflow.config import DistillConfig
    from distillflow.tasks.capture.logits import resolve_capture_settings
    from distillflow.tasks.preflight import PreflightError, preflight_capture, preflight_training
    from distillflow.training.config import TrainingConfig

    teacher, dataset = captured
    training = TrainingConfig(dataset_dir=dataset, output_dir=tmp_path / "run", student=student_dir,
                              teacher=teacher, objective="kd_greybox")
    preflight_training(training, "run.yaml")  # no vocabulary refusal: the captured top-k is aligned

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"prompt": "hi"}) + "\n")

    def config(objective: str) -> DistillConfig:
        return DistillConfig.model_validate({
            "name": "g", "output_dir": str(dataset), "seeds": [{"path": str(seeds)}],
            "teacher": {"backend": "local", "model": str(teacher)},
            "capture": {"source": "local", "k": K},
            "training": {"dataset_dir": str(dataset), "output_dir": str(tmp_path / "run"), "student": str(student_dir),
                         "objective": objective},
        })

    greybox = config("kd_greybox")
    assert resolve_capture_settings(greybox).tokenizer == str(teacher)  # the teacher tokenises itself
    preflight_capture(greybox, "run.yaml")
    with pytest.raises(PreflightError) as error:
        preflight_capture(config("kd_topk"), "run.yaml")  # positions in the student's ids: refused
    assert "training.objective: kd_greybox" in str(error.value) and "distill capture-logits" in str(error.value)


def test_kd_greybox_refuses_a_sampled_capture_naming_the_fix(student_dir, captured, tmp_path):
    """Sampled draws are not the teacher's top-k: aligning them as such (and multiplying their
    draw frequencies over a merged student token) would train on a wrong target, silently."""
    from distillflow.tasks.capture.logits import capture_dataset
    from distillflow.tasks.preflight import PreflightError, preflight_training
    from distillflow.training.config import TrainingConfig
    from distillflow.training.greybox import NoTeacherLogprobs, teacher_entries
    from tests.test_capture_logits import settings_for, write_dataset

    teacher, _ = captured
    dataset = write_dataset(tmp_path / "data", rows=answer_rows()[:4], rows_per_shard=4)
    capture_dataset(settings_for(teacher, dataset, dataset, max_length=256, method="sampled"))
    training = TrainingConfig(dataset_dir=dataset, output_dir=tmp_path / "run", student=student_dir,
                              teacher=teacher, objective="kd_greybox")
    with pytest.raises(PreflightError, match=r"run.yaml: training.dataset_dir: .*capture.method: sampled.*capture.method: topk"):
        preflight_training(training, "run.yaml")
    with pytest.raises(NoTeacherLogprobs, match="capture.method: sampled"):
        teacher_entries(dataset)  # what training reads, had the preflight been skipped
