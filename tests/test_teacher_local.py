"""The local teacher on a tiny random Llama: batching, finish reasons, seeds and logprobs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distillflow.config import TeacherConfig
from distillflow.training.scratch import build_tiny_llama
from distillflow.tasks.teacher.local import LocalTeacher

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Explain photosynthesis in one sentence, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 17 and 25."}],
    [{"role": "user", "content": "List three primary colors."}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-teacher")
    build_tiny_llama(path, hidden_size=64, num_heads=2, num_layers=2, seed=0)
    return path


def make_teacher(model_dir, **generation) -> LocalTeacher:
    settings = {"temperature": 0.0, "max_tokens": 10, **generation}
    config = TeacherConfig(
        backend="local", model=str(model_dir), device="cpu", local_batch_size=3, generation=settings
    )
    return LocalTeacher(config)


def test_greedy_batch_equals_one_at_a_time(model_dir):
    teacher = make_teacher(model_dir)
    batched = teacher.answer_batch(PROMPTS)
    single = [teacher.answer_batch([messages])[0] for messages in PROMPTS]
    assert [a.content for a in batched] == [a.content for a in single]
    assert [a.completion_tokens for a in batched] == [a.completion_tokens for a in single]
    assert [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in single]
    assert all(answer.ok and answer.content for answer in batched)
    assert all(answer.model == model_dir.name for answer in batched)


def test_max_tokens_gives_length(model_dir):
    # A random model practically never emits the eos token within 10 steps.
    answers = make_teacher(model_dir, max_tokens=10).answer_batch(PROMPTS[:2])
    assert [a.finish_reason for a in answers] == ["length", "length"]
    assert [a.completion_tokens for a in answers] == [10, 10]


def test_eos_gives_stop(model_dir, tmp_path):
    # Declare the token that greedy decoding emits third as an extra eos id (as models with
    # several end tokens do): the answer must stop right there with finish_reason "stop".
    teacher = make_teacher(model_dir, max_tokens=10, top_logprobs=1)
    answer = teacher.answer_batch(PROMPTS[:1])[0]
    pieces = [entry["token"] for entry in answer.top_logprobs]
    third = teacher.tokenizer.convert_tokens_to_ids(pieces[2])
    first_at = [teacher.tokenizer.convert_tokens_to_ids(piece) for piece in pieces].index(third)

    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [teacher.tokenizer.eos_token_id, third]
    copy = tmp_path / "teacher"
    shutil.copytree(model_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps(generation_config))

    stopped = make_teacher(copy, max_tokens=10).answer_batch(PROMPTS[:1])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == first_at + 1


def test_stop_string_cuts_the_answer(model_dir):
    full = make_teacher(model_dir, max_tokens=10).answer_batch(PROMPTS[:1])[0].content
    stop = next(full[i : i + 2] for i in range(2, len(full) - 1) if full[i : i + 2].isprintable())
    answer = make_teacher(model_dir, max_tokens=10, stop=[stop]).answer_batch(PROMPTS[:1])[0]
    assert answer.finish_reason == "stop"
    assert answer.content == full[: full.find(stop)]


def test_sampling_is_seeded_per_request(model_dir):
    teacher = make_teacher(model_dir, temperature=1.0, top_p=0.9, seed=7)
    batched = [a.content for a in teacher.answer_batch(PROMPTS)]
    single = [teacher.answer_batch([messages])[0].content for messages in PROMPTS]
    reordered = [a.content for a in teacher.answer_batch(PROMPTS[::-1])][::-1]
    assert batched == single == reordered

    other_seed = make_teacher(model_dir, temperature=1.0, top_p=0.9, seed=8)
    assert [a.content for a in other_seed.answer_batch(PROMPTS)] != batched
    greedy = make_teacher(model_dir)
    assert [a.content for a in greedy.answer_batch(PROMPTS)] != batched


def test_top_logprobs_match_a_forward_pass(model_dir):
    k = 5
    teacher = make_teacher(model_dir, max_tokens=8, top_logprobs=k)
    answers = teacher.answer_batch(PROMPTS)
    tokenizer, model = teacher.tokenizer, teacher.model
    for messages, answer in zip(PROMPTS, answers):
        prompt_ids = teacher._encode(messages)
        entries = answer.top_logprobs
        assert len(entries) == answer.completion_tokens
        completion_ids = tokenizer.convert_tokens_to_ids([entry["token"] for entry in entries])
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float()  # (T, V)
        # Position t predicts token t + 1: the completion's logprobs start at the prompt's end.
        logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # (completion, V)
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)
        for step, entry in enumerate(entries):
            assert len(entry["top"]) == k
            # Greedy: the chosen token is the most likely one.
            assert entry["token"] == entry["top"][0]["token"]
            assert entry["logprob"] == pytest.approx(float(logprobs[step, completion_ids[step]]), abs=1e-4)
            got_ids = tokenizer.convert_tokens_to_ids([alt["token"] for alt in entry["top"]])
            assert got_ids == top_ids[step].tolist()
            assert [alt["logprob"] for alt in entry["top"]] == pytest.approx(top_values[step].tolist(), abs=1e-4)


def test_system_prompt_and_too_long_prompt(model_dir):
    plain = make_teacher(model_dir).answer_batch(PROMPTS[:1])[0]
    config = TeacherConfig(
        backend="local",
        model=str(model_dir),
        device="cpu",
        system_prompt="You are a helpful assistant.",
        generation={"temperature": 0.0, "max_tokens": 4},
    )
    with_system = LocalTeacher(config).answer_batch(PROMPTS[:1])[0]
    assert with_system.prompt_tokens > plain.prompt_tokens

    long_prompt = [{"role": "user", "content": "word " * 3000}]
    answers = make_teacher(model_dir).answer_batch([long_prompt, PROMPTS[1]])
    assert answers[0].error == "prompt_too_long" and not answers[0].ok
    assert answers[1].ok


def test_missing_model_dir_says_what_to_do(tmp_path):
    config = TeacherConfig(backend="local", model=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        LocalTeacher(config)
