"""The on_policy objective: config checks, the student's own samples as training rows, the loss
going down, and (DeepSpeed, through `python -m distillflow.training.train`) a resumed run that
replays the same samples and losses while the teacher server is paid once per sequence."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distillflow.training.config import TeacherServerConfig, TrainingConfig
from distillflow.training.data import IGNORE_INDEX, collate, tokenize_dataset
from distillflow.training.model import DistillationModel, load_causal_lm, load_teacher
from distillflow.training.on_policy import (
    micro_batch,
    sampling_generator,
    student_answer_rows,
    student_answers_wanted,
)
from distillflow.training.vocabulary import load_tokenizer
from tests.conftest import ROOT, free_port

RUN_TIMEOUT_S = 240
RUN_MAX_NEW_TOKENS = 8  # of the DeepSpeed runs
TOP_K = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.fixtures import build_tiny_setup_once

    return build_tiny_setup_once(tmp_path_factory.getbasetemp() / "tiny-distill", num_rows=16)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny["teacher"])


def config_for(tiny, tmp_path, **overrides) -> TrainingConfig:
    values = {
        "dataset_dir": tiny["dataset"], "output_dir": tmp_path / "run", "student": tiny["student"],
        "teacher": tiny["teacher"], "objective": "on_policy", "max_length": 64, "max_new_tokens": 12,
    }
    return TrainingConfig(**(values | overrides))


def sample_rows(student, rows, tokenizer, seed: int, step: int, micro_step: int = 0, max_new_tokens: int = 12):
    return student_answer_rows(
        student, rows, max_new_tokens=max_new_tokens, max_length=64, temperature=1.0, stop_ids={tokenizer.eos_token_id},
        pad_id=tokenizer.pad_token_id, generator=sampling_generator(seed, step, micro_step, 0),
        vocab_size=len(tokenizer),
    )


# --- config and pure pieces ------------------------------------------------------------------


def test_config_checks_the_on_policy_fields(tiny, tmp_path):
    assert config_for(tiny, tmp_path).lmbda == 0.5
    with pytest.raises(ValueError, match="lmbda"):
        config_for(tiny, tmp_path, lmbda=1.5)
    with pytest.raises(ValueError, match="sampling_temperature"):
        config_for(tiny, tmp_path, sampling_temperature=0)
    with pytest.raises(ValueError, match="packing: false"):
        config_for(tiny, tmp_path, packing=True)
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        config_for(tiny, tmp_path, max_new_tokens=64)
    with pytest.raises(ValueError, match="needs a teacher"):
        config_for(tiny, tmp_path, teacher=None)
    server = {"base_url": "http://127.0.0.1:8000/v1", "model": "teacher"}
    with pytest.raises(ValueError, match="set objective: on_policy"):
        config_for(tiny, tmp_path, objective="kd_logits", teacher_server=server)
    with pytest.raises(ValueError, match="base_url"):
        TeacherServerConfig(base_url="127.0.0.1:8000", model="teacher")
    assert config_for(tiny, tmp_path).teacher_in_process
    assert not config_for(tiny, tmp_path, teacher_server=server).teacher_in_process


def test_lmbda_is_the_share_of_student_micro_batches_and_the_same_on_replay():
    decisions = [student_answers_wanted(0, step, micro, 0.25) for step in range(400) for micro in range(4)]
    assert abs(np.mean(decisions) - 0.25) < 0.04
    assert decisions == [student_answers_wanted(0, step, micro, 0.25) for step in range(400) for micro in range(4)]
    assert not any(student_answers_wanted(0, step, 0, 0.0) for step in range(50))
    assert all(student_answers_wanted(0, step, 0, 1.0) for step in range(50))


def test_a_sampled_answer_ends_where_the_templates_next_turn_starts(tiny, tokenizer, tmp_path):
    """A base-model student (`plain` template) runs on into "\nUser: …"; its on-policy samples
    are cut where a turn stop starts and end in eos, as its training answers do."""
    from collections import Counter

    from distillflow.training.on_policy import TurnEnd, sample_answers

    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 64, tmp_path)[:8]
    student = load_causal_lm(tiny["student"])
    prompts = [row["input_ids"][: int(np.flatnonzero(row["labels"] != IGNORE_INDEX)[0])] for row in examples]
    eos = tokenizer.eos_token_id

    def sample(turn_end):
        return sample_answers(student, prompts, 12, 1.0, {eos}, tokenizer.pad_token_id,
                              sampling_generator(0, 1, 0, 0), len(tokenizer), turn_end)

    free = sample(None)
    texts = [tokenizer.decode([t for t in answer if t != eos]) for answer in free]
    stop = Counter("".join(texts)).most_common(1)[0][0]  # the untrained student's most frequent character
    cut = sample(TurnEnd((stop,), tokenizer.decode, eos))
    assert any(stop in text for text in texts)
    for before, after, text in zip(free, cut, texts):
        if stop not in text:
            assert after == before  # untouched, and the same draws
            continue
        assert after[-1] == eos and stop not in tokenizer.decode(after[:-1])
        assert after[:-1] == before[: len(after) - 1]  # a prefix of what it would have sampled
        assert text.startswith(tokenizer.decode(after[:-1]))


@pytest.mark.slow
def test_student_rows_keep_the_prompt_and_supervise_only_the_students_samples(tiny, tokenizer, tmp_path):
    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 64, tmp_path)[:4]
    student = load_causal_lm(tiny["student"])
    rows = sample_rows(student, examples, tokenizer, seed=0, step=3)
    again = sample_rows(student, examples, tokenizer, seed=0, step=3)
    other_step = sample_rows(student, examples, tokenizer, seed=0, step=4)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, again))  # replayable
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, other_step))
    for example, row in zip(examples, rows):
        prompt_length = int(np.flatnonzero(example["labels"] != IGNORE_INDEX)[0])
        assert np.array_equal(row["input_ids"][:prompt_length], example["input_ids"][:prompt_length])
        answer = row["input_ids"][prompt_length:]
        assert np.array_equal(row["labels"][prompt_length:], answer) and (row["labels"][:prompt_length] == IGNORE_INDEX).all()
        assert 1 <= len(answer) <= 12
        assert not np.array_equal(answer, example["input_ids"][prompt_length:])  # not the dataset's answer
        eos = np.flatnonzero(answer == tokenizer.eos_token_id)
        assert len(eos) == 0 or eos[0] == len(answer) - 1  # sampling stops at eos
    # A sampled token is one the student gives real probability, far above the teacher's choices'.
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = torch.log_softmax(student(input_ids=batch.input_ids, position_ids=batch.position_ids).logits, -1)
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    picked = logprobs[:, :-1].gather(-1, batch.labels[:, 1:].clamp_min(0)[..., None])[..., 0][mask]
    assert torch.isfinite(picked).all() and picked.min() > -20


@pytest.mark.slow
def test_on_policy_lowers_the_divergence_on_the_students_own_samples(tiny, tokenizer, tmp_path):
    config = config_for(tiny, tmp_path, lmbda=1.0, divergence="reverse_kl", loss_chunk_tokens=16)
    torch.manual_seed(0)
    model = DistillationModel(load_causal_lm(tiny["student"]), config, len(tokenizer), load_teacher(tiny["teacher"]))
    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 64, tmp_path)[:6]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        rows = sample_rows(model.student, examples, tokenizer, seed=0, step=step)  # fresh samples each step
        batch = micro_batch(rows, tokenizer.pad_token_id, True, None)
        sums = model(batch)  # (4,) sums: total, kd, ce, hidden
        loss = sums[0] / batch.num_supervised
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert sums[0].item() == pytest.approx(sums[1].item())  # divergence only: no cross-entropy on own samples
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses


# --- DeepSpeed runs with a teacher server ----------------------------------------------------


def run_training(tiny, output_dir: Path, **overrides) -> list[dict]:
    section = {
        "dataset_dir": str(tiny["dataset"]),
        "output_dir": str(output_dir),
        "tokenized_cache_dir": str(output_dir.parent / "tokenized"),
        "student": str(tiny["student"]),
        "teacher": str(tiny["teacher"]),
        "objective": "on_policy",
        "divergence": "jsd",
        "max_length": 64,
        "max_new_tokens": RUN_MAX_NEW_TOKENS,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "loss_chunk_tokens": 16,
        "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
    } | overrides
    config = output_dir.parent / f"{output_dir.name}.yaml"
    config.write_text(yaml.safe_dump({"training": section}))
    from distillflow.training.launch import build_launch_command, launch_env

    env = launch_env() | {"DISTILLFLOW_SHM_COMM": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        build_launch_command(config, int(section.get("num_processes", 1)), master_port=free_port()),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_after(output_dir: Path, step: int) -> None:
    """Make a finished run look like one that crashed after its step-`step` checkpoint."""
    checkpoints = output_dir / "checkpoints"
    for later in sorted(checkpoints.glob("step-*")):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"step-{step:08d}")
    shutil.rmtree(output_dir / "final")
    (output_dir / "metrics.json").unlink()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_server_teacher_scores_the_students_samples_once_across_a_resume(tiny, tokenizer, tmp_path):
    from distillflow.training.train import micro_batches, step_rows
    from tests.openai_server import FaultyOpenAIServer, ServerThread

    server = FaultyOpenAIServer(api_key="EMPTY", model="tiny-teacher", scoring_model=str(tiny["teacher"]))
    with ServerThread(server, free_port()) as thread:
        teacher_server = {"base_url": thread.base_url, "model": "tiny-teacher", "top_k": TOP_K, "batch_size": 2}
        output_dir = tmp_path / "run"
        first = run_training(tiny, output_dir, lmbda=1.0, max_steps=3, checkpoint_every=2, teacher_server=teacher_server)
        paid_first = sum(server.scored_sequences.values())
        interrupt_after(output_dir, 2)  # the step-3 samples were scored but never checkpointed
        resumed = run_training(tiny, output_dir, lmbda=1.0, max_steps=3, checkpoint_every=2, teacher_server=teacher_server)

    # lmbda = 1: every row of every step is a student answer, scored token by token.
    assert [record["student_answer_rows"] for record in first] == [4, 4, 4]
    assert [record["loss"] for record in resumed] == pytest.approx([record["loss"] for record in first], rel=1e-6, abs=1e-9)
    # Step 3 was replayed: the same samples, so the same requests, all read back from the ledger.
    assert paid_first == 3 * 4 and sum(server.scored_sequences.values()) == paid_first
    assert set(server.scored_sequences.values()) == {1}
    # The scored tokens are the initial student's own samples for step 1's prompts.
    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 64, tmp_path / "tok")
    student = load_causal_lm(tiny["student"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training process's kernels, for bit-identical logits
    try:
        for micro_step, indices in enumerate(micro_batches(step_rows(0, len(examples), 4, 0), 2, 1, 0)):
            rows = sample_rows(
                student, [examples[i] for i in indices], tokenizer, seed=0, step=0, micro_step=micro_step,
                max_new_tokens=RUN_MAX_NEW_TOKENS,
            )
            for row in rows:
                assert tuple(int(token) for token in row["input_ids"]) in server.scored_sequences
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_two_processes_in_process_teacher_resume_replays_the_same_samples(tiny, tmp_path):
    settings = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    (tmp_path / "zero3.json").write_text(json.dumps(settings))
    # seed 4, lmbda 0.5: steps 1 and 3 sample the student's answers, step 2 uses the dataset's
    overrides = {
        "seed": 4, "lmbda": 0.5, "max_steps": 3, "checkpoint_every": 2, "num_processes": 2,
        "gradient_accumulation_steps": 1, "deepspeed_config": str(tmp_path / "zero3.json"),
    }
    output_dir = tmp_path / "run"
    first = run_training(tiny, output_dir, **overrides)
    assert [record["student_answer_rows"] for record in first] == [4, 0, 4]
    assert all(np.isfinite(record["loss"]) and record["kd"] > 0 for record in first)
    interrupt_after(output_dir, 2)
    resumed = run_training(tiny, output_dir, **overrides)
    assert [record["loss"] for record in resumed] == pytest.approx([record["loss"] for record in first], rel=1e-6, abs=1e-9)
    assert json.loads((output_dir / "metrics.json").read_text())["resumed_from_step"] == 2
