"""A base model's answer ends where its turn ends: chat-template stops, in every teacher path.

The model here is a tiny Llama trained in this file as a *base* model: plain transcripts
("User: …\\nAssistant: …\\n" repeated, no eos between turns), saved without a chat template.
Asked with the `plain` template it answers, then goes on to write the next "User:" turn
itself — as pretrained base models do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillflow.config import ConfigError, GenerationConfig, TeacherConfig, parse_config
from distillflow.records import TeacherAnswer, stopped_answer
from distillflow.training.chat_template import PLAIN, PRESET_STOPS, cut_at_stop, template_stops
from distillflow.training.scratch import CHAT_TEMPLATE, build_tiny_llama
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_base_models import save_as_base_model
from tests.test_build import write_seeds

QA = [
    ("What is the capital of France?", "Paris, a city on the Seine river."),
    ("How many legs does a spider have?", "Eight legs, four on each side of its body."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules and blue light scatters most."),
    ("Name three primary colors.", "Red, blue and yellow."),
    ("What is 7 plus 15?", "Seven plus fifteen makes twenty two."),
    ("Translate good morning to Spanish.", "In Spanish you say buenos dias."),
]
QUESTIONS = [question for question, _ in QA]


def transcript(question: str, answer: str, turns: int = 3) -> str:
    """Pretraining text of a base model: a conversation that repeats itself, no eos between turns."""
    return "".join(f"User: {question}\nAssistant: {answer}\n" for _ in range(turns))


def train_base_model(out_dir: Path, steps: int = 100) -> Path:
    """A tiny Llama trained on `transcript`s (≈10 s on one thread), saved with no chat template."""
    import torch

    texts = [transcript(question, answer) for question, answer in QA]
    model, tokenizer = build_tiny_llama(
        out_dir, hidden_size=64, num_heads=2, num_layers=2, vocab_size=400, corpus=texts, seed=3
    )
    sequences = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)  # (B, T)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = labels[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return save_as_base_model(out_dir)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return train_base_model(tmp_path_factory.mktemp("trained-base-model"))


def local_teacher(model_dir: Path, **teacher):
    from distillflow.tasks.teacher.local import LocalTeacher

    generation = GenerationConfig(temperature=0.0, max_tokens=96, top_logprobs=2)
    config = TeacherConfig(
        backend="local", base_url=None, model=str(model_dir), api_key_env=None, device="cpu",
        local_batch_size=6, generation=generation, **teacher,
    )
    return LocalTeacher(config)


def ask(teacher, questions=QUESTIONS) -> list[TeacherAnswer]:
    return teacher.answer_batch([[{"role": "user", "content": question}] for question in questions])


# -- settings ---------------------------------------------------------------------------------


def test_each_preset_declares_where_its_turn_ends():
    assert template_stops("plain") == template_stops(PLAIN) == PRESET_STOPS["plain"] == ("\nUser:", "\nAssistant:")
    assert template_stops(CHAT_TEMPLATE) == () and template_stops(None) == ()  # a tokenizer's own template: none
    assert cut_at_stop(" Paris.\nUser: and?\nAssistant: x", PRESET_STOPS["plain"]) == (" Paris.", True)
    assert cut_at_stop(" Paris.", PRESET_STOPS["plain"]) == (" Paris.", False)


def config_data(**top_level) -> dict:
    teacher = top_level.pop("teacher", {"backend": "local", "model": "m", "api_key_env": None})
    return {"name": "x", "output_dir": "out", "seeds": [{"path": "s.jsonl"}], "teacher": teacher, **top_level}


def test_chat_template_stop_is_checked_at_load_and_shared_with_the_template():
    config = parse_config(config_data(chat_template="plain"))
    assert config.teacher.stops == ["\nUser:", "\nAssistant:"]
    custom = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    teacher = {"backend": "local", "model": "m", "api_key_env": None, "generation": {"stop": ["END"]}}
    config = parse_config(config_data(chat_template=custom, chat_template_stop=["\nQ:"], teacher=teacher))
    assert config.teacher.chat_template_stop == ["\nQ:"] and config.teacher.stops == ["\nQ:", "END"]
    config = parse_config(config_data(chat_template=custom, teacher=teacher))
    assert config.teacher.stops == ["END"]  # a Jinja template declares none unless told
    config = parse_config(config_data(chat_template="plain", chat_template_stop=[]))
    assert config.teacher.stops == []  # [] turns the preset's off

    with pytest.raises(ConfigError, match="chat_template_stop is set but chat_template is not"):
        parse_config(config_data(chat_template_stop=["\nQ:"]))
    with pytest.raises(ConfigError, match=r"teacher.chat_template_stop is set but teacher.chat_template is not"):
        parse_config(config_data(teacher={"backend": "local", "model": "m", "chat_template_stop": ["\nQ:"]}))
    with pytest.raises(ConfigError, match=r"chat_template_stop: .*a stop string is empty"):
        parse_config(config_data(chat_template="plain", chat_template_stop=[""]))
    with pytest.raises(ConfigError, match=r"teacher.generation.stop: .*list each once"):
        parse_config(config_data(teacher={**teacher, "generation": {"stop": ["END", "END"]}}))
    with pytest.raises(ConfigError, match=r"teacher.chat_template_stops: unknown key"):
        parse_config(config_data(teacher={"backend": "local", "model": "m", "chat_template_stops": ["x"]}))


def test_an_instruct_teacher_sends_what_it_sent_before(monkeypatch):
    from distillflow.storage.ledger import request_key
    from distillflow.tasks.teacher import OpenAITeacher, teacher_params_for_key

    def params(**teacher):
        config = TeacherConfig(model="served", api_key_env=None, **teacher)
        return OpenAITeacher(config).request_params(), teacher_params_for_key(config)

    sent, keyed = params()
    assert "stop" not in sent and "chat_template_stop" not in keyed
    assert params(generation={"stop": ["END"]})[0]["stop"] == ["END"]
    # A base model behind vLLM (--chat-template): its turn end goes out as `stop`, and the
    # ledger key stays the same, so answers recorded before are found (and cut), not bought again.
    sent, keyed_with_stops = params(chat_template_stop=["\nUser:"], generation={"stop": ["END"]})
    assert sent["stop"] == ["\nUser:", "END"]
    messages = [{"role": "user", "content": "hi"}]
    assert request_key(messages, "served", keyed_with_stops) == request_key(
        messages, "served", params(generation={"stop": ["END"]})[1]
    )


def test_an_answer_from_the_ledger_is_cut_and_kept():
    run_on = TeacherAnswer(" Paris.\nUser: What else?\nAssistant: Paris.", "length", "m", 9, 48, from_ledger=True)
    cut = stopped_answer(run_on, PRESET_STOPS["plain"])
    assert (cut.content, cut.finish_reason, cut.completion_tokens, cut.from_ledger) == (" Paris.", "stop", 48, True)
    unchanged = TeacherAnswer(" Paris.", "stop", "m")
    assert stopped_answer(unchanged, PRESET_STOPS["plain"]) is unchanged
    assert stopped_answer(run_on, []) is run_on  # no stops (an instruct template): as today
    failed = TeacherAnswer(None, None, "m", error="timeout")
    assert stopped_answer(failed, PRESET_STOPS["plain"]) is failed


def test_inspect_counts_rows_per_finish_reason(tmp_path):
    import pyarrow as pa

    from distillflow.storage.inspect import DatasetView, render_text

    rows = {"id": ["a", "b", "c"], "prompt": ["p"] * 3, "response": ["r"] * 3, "strategy": ["seed"] * 3,
            "finish_reason": ["stop", "length", "stop"]}
    view = DatasetView(tmp_path, None, pa.table(rows), None)
    assert view.finish_reasons() == {"length": 1, "stop": 2}
    text = render_text(view)
    assert "accepted rows per finish reason" in text
    assert "  stop                             2" in text and "  length                           1" in text
    from distillflow.storage.report import render_html

    assert "<th>finish reason</th>" in render_html(view)


# -- the trained base model -------------------------------------------------------------------


def test_plain_answers_end_where_the_turn_ends(base_model):
    from distillflow.tasks.filters.config import FiltersConfig
    from distillflow.tasks.filters.quality import ResponseChecker

    before = ask(local_teacher(base_model, chat_template="plain", chat_template_stop=[]))
    assert all("\nUser:" in answer.content and answer.finish_reason == "length" for answer in before)
    check = ResponseChecker(FiltersConfig(drop_truncated=False))
    verdicts = [check(question, answer.content, answer.finish_reason) for question, answer in zip(QUESTIONS, before)]
    assert [verdict.reason for verdict in verdicts if verdict is not None].count("repetition") >= 3

    teacher = local_teacher(base_model, chat_template="plain")
    assert teacher.stops == ["\nUser:", "\nAssistant:"]
    after = ask(teacher)
    assert [answer.content for answer in after] == [" " + answer for _, answer in QA]
    for answer, run_on in zip(after, before):
        assert "User:" not in answer.content and answer.finish_reason == "stop"
        assert run_on.content.startswith(answer.content)  # the same answer, cut at its turn end
        assert answer.completion_tokens < 96  # generation halted at the stop
        assert check("", answer.content, answer.finish_reason) is None  # not repetition
        # Logprobs of the answer's tokens only: the stop's own tokens are cut with its text.
        pieces = [entry["token"] for entry in answer.top_logprobs]
        assert teacher.tokenizer.convert_tokens_to_string(pieces).startswith(answer.content)
        assert len(pieces) < answer.completion_tokens


def test_eval_and_mining_models_stop_at_the_turn_end(base_model, tmp_path):
    """A path model with the setting, and a student whose own template is the preset's
    (as training saves it) with no setting, both answer one turn."""
    from distillflow.tasks.evaluation.models import InProcessModel

    with_setting = InProcessModel(base_model, 96, 6, "cpu", None, chat_template="plain")
    answers = with_setting.answer(QUESTIONS[:2])
    with_setting.close()
    assert [a.finish_reason for a in answers] == ["stop", "stop"] and not any("User:" in a.text for a in answers)

    student = tmp_path / "student"
    student.mkdir()
    for item in base_model.iterdir():
        (student / item.name).write_bytes(item.read_bytes())
    config = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PLAIN}))
    own = InProcessModel(student, 96, 6, "cpu", None)
    assert own.runner.stops == ["\nUser:", "\nAssistant:"]
    assert [a.text for a in own.answer(QUESTIONS[:2])] == [a.text for a in answers]
    own.close()


def test_training_and_capture_tokenise_the_trimmed_answer(base_model):
    from distillflow.training.data import IGNORE_INDEX, encode_example
    from distillflow.training.vocabulary import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    question, answer = QA[0]
    run_on = f" {answer}\nUser: {question}\nAssistant: {answer}"
    trimmed = encode_example(tokenizer, question, f" {answer}", max_length=128, chat_template=PLAIN)
    assert encode_example(tokenizer, question, run_on, max_length=128, chat_template=PLAIN) == trimmed
    supervised = [t for t in trimmed["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == f" {answer}{tokenizer.eos_token}"  # the answer, then the eos it learns
    # An instruct model's own template has no turn stops: its responses are tokenised as given.
    tokenizer.chat_template = CHAT_TEMPLATE
    full = encode_example(tokenizer, question, run_on, max_length=256)
    assert "User:" in tokenizer.decode([t for t in full["labels"] if t != IGNORE_INDEX])


def build_config(tmp_path: Path, model: Path, **top_level) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, QUESTIONS)
    config = {
        "name": "base-turns",
        "output_dir": str(tmp_path / "out"),
        "seeds": [{"path": str(seeds)}],
        "prompts": {"num_prompts": 6, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0}},
        "chat_template": "plain",
        "teacher": {"backend": "local", "model": str(model), "api_key_env": None, "device": "cpu",
                    "local_batch_size": 6, "generation": {"temperature": 0.0, "max_tokens": 96}},
        "filters": {"drop_truncated": False, "near_dedup": {"enabled": False}},
        "capture": {"source": "local", "k": 4, "device": "cpu", "max_length": 128},
        **top_level,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_base_teacher_build_keeps_one_turn_per_row_without_asking_again(base_model, tmp_path, prefect_harness):
    """Before: the answers run on and are rejected as repetition. After (the preset's stops),
    a rebuild finds every answer in the ledger, cuts it at its turn end and keeps it; the
    captured top-k rows line up with the tokens training supervises."""
    from distillflow.config import load_config
    from distillflow.flows.build import build_command
    from distillflow.storage.inspect import inspect_dataset
    from distillflow.storage.parquet import read_table
    from distillflow.storage.topk import decode_topk
    from distillflow.tasks.capture.logits import capture_dataset, resolve_capture_settings
    from distillflow.training.data import IGNORE_INDEX, encode_example
    from distillflow.training.vocabulary import load_tokenizer

    before = build_command(build_config(tmp_path, base_model, chat_template_stop=[]))
    assert before["teacher_usage"]["paid_requests"] == 6
    rejects = read_table(tmp_path / "out" / "rejects").to_pylist()
    assert {row["reason"] for row in rejects} >= {"repetition"}

    path = build_config(tmp_path, base_model)
    after = build_command(path)
    assert after["teacher_usage"]["paid_requests"] == 0  # every answer came from the ledger
    assert after["counts"]["accepted"] == 6
    rows = read_table(tmp_path / "out" / "data").to_pylist()
    assert sorted(row["response"] for row in rows) == sorted(" " + answer for _, answer in QA)
    assert {row["finish_reason"] for row in rows} == {"stop"}
    assert "  stop                             6" in inspect_dataset(tmp_path / "out")

    settings = resolve_capture_settings(load_config(path))
    capture_dataset(settings)
    tokenizer = load_tokenizer(base_model)
    for row in read_table(tmp_path / "out" / "data").to_pylist():
        labels = encode_example(tokenizer, row["prompt"], row["response"], max_length=128, chat_template=PLAIN)["labels"]
        ids, _ = decode_topk(row["teacher_topk"])
        assert ids.shape == (sum(1 for label in labels[1:] if label != IGNORE_INDEX), 4)


class StopRecordingServer(FaultyOpenAIServer):
    """The test OpenAI server, recording the `stop` of every chat request. It ignores `stop`,
    as some servers do: the answer comes back whole."""

    def __init__(self) -> None:
        super().__init__(api_key="test-key")
        self.stops_sent: list[list[str] | None] = []

    def _chat_result(self, body, prompt, attempt, in_batch=False):
        self.stops_sent.append(body.get("stop"))
        return super()._chat_result(body, prompt, attempt, in_batch)


@pytest.mark.slow
def test_an_openai_teacher_sends_the_turn_end_as_stop_and_rows_are_cut(tmp_path, port, prefect_harness, monkeypatch):
    from distillflow.flows.build import build_command
    from distillflow.storage.parquet import read_table

    monkeypatch.setenv("DISTILL_TEST_KEY", "test-key")
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, ["[[say:Paris is the capital.\nUser: and Spain?]] capital of France?"])
    server = StopRecordingServer()

    def build(out: str, **teacher) -> list[dict]:
        config = {
            "name": "served-base", "output_dir": str(tmp_path / out), "seeds": [{"path": str(seeds)}],
            "prompts": {"num_prompts": 1, "strategies": {"seed": 1.0, "edge_case": 0.0, "adversarial": 0.0}},
            "teacher": {"base_url": running.base_url, "model": "test-teacher", "api_key_env": "DISTILL_TEST_KEY",
                        "generation": {"temperature": 0.0, "max_tokens": 64}, **teacher},
            "filters": {"near_dedup": {"enabled": False}},
        }
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(config))
        build_command(path)
        return read_table(tmp_path / out / "data").to_pylist()

    with ServerThread(server, port) as running:
        instruct = build("instruct")
        assert server.stops_sent == [None]  # no template stops: the request is as it always was
        base = build("base", chat_template_stop=["\nUser:"])
        assert server.stops_sent[-1] == ["\nUser:"]
    assert instruct[0]["response"] == "Paris is the capital.\nUser: and Spain?"
    assert (base[0]["response"], base[0]["finish_reason"]) == ("Paris is the capital.", "stop")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_answers_stored_whole_are_captured_and_trained_up_to_the_turn_end(base_model, tmp_path, prefect_harness):
    """A dataset built with no stops holds the run-on answers; capture and training both cut
    them at the preset's turn end, so kd_topk reads top-k rows that line up (else it fails)."""
    from distillflow.flows.build import build_command
    from distillflow.flows.capture_logits import capture_logits_command
    from distillflow.flows.train import train_command
    from distillflow.storage.parquet import read_table
    from distillflow.storage.topk import decode_topk
    from distillflow.training.data import IGNORE_INDEX, encode_example
    from distillflow.training.vocabulary import load_tokenizer
    from tests.conftest import free_port

    filters = {"drop_truncated": False, "near_dedup": {"enabled": False},
               "quality": {"repetition": False, "refusal": False, "prompt_echo": False}}
    training = {"dataset_dir": str(tmp_path / "out"), "output_dir": str(tmp_path / "run"), "student": str(base_model),
                "teacher": str(base_model), "objective": "kd_topk", "max_length": 128, "max_steps": 1,
                "micro_batch_size": 2, "master_port": free_port()}
    path = build_config(tmp_path, base_model, chat_template_stop=[], filters=filters, training=training)
    assert build_command(path)["counts"]["accepted"] == 6
    capture_logits_command(path)
    tokenizer = load_tokenizer(base_model)
    for row in read_table(tmp_path / "out" / "data").to_pylist():
        assert "\nUser:" in row["response"] and row["finish_reason"] == "length"
        labels = encode_example(tokenizer, row["prompt"], row["response"], max_length=128, chat_template=PLAIN)["labels"]
        answer = [label for label in labels if label != IGNORE_INDEX]
        assert tokenizer.decode(answer) == cut_at_stop(row["response"], PRESET_STOPS["plain"])[0] + tokenizer.eos_token
        assert decode_topk(row["teacher_topk"])[0].shape == (len(answer), 4)
    assert train_command(path)["steps"] == 1
