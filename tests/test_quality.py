"""Response-side quality filters: every reason, and good answers kept."""

from __future__ import annotations

import pytest

from distillflow.tasks.filter_config import FiltersConfig
from distillflow.tasks.filters import filter_responses


def row(response, prompt="Explain how photosynthesis works.", finish_reason="stop", id="r1"):  # noqa: A002
    return {
        "id": id,
        "prompt": prompt,
        "response": response,
        "strategy": "seed",
        "parent_id": None,
        "finish_reason": finish_reason,
        "teacher_model": "teacher",
        "prompt_tokens": 5,
        "completion_tokens": 20,
    }


GOOD = (
    "Plants capture light with chlorophyll and use its energy to turn carbon dioxide and water "
    "into glucose, releasing oxygen as a by-product."
)


@pytest.mark.parametrize(
    ("response", "finish_reason", "reason"),
    [
        (None, "stop", "empty"),
        ("   \n\t", "stop", "empty"),
        (GOOD, "length", "truncated"),
        ("I'm sorry, but I can't help with that request.", "stop", "refusal"),
        ("I cannot assist with creating that content.", "stop", "refusal"),
        ("As an AI language model, I cannot browse the internet.", "stop", "refusal"),
        ("Sorry, I can’t do that.", "stop", "refusal"),
        ("the cat sat on the mat " * 30, "stop", "repetition"),
        ("a" * 400, "stop", "repetition"),
        ("Explain how photosynthesis works.", "stop", "prompt_echo"),
    ],
)
def test_bad_responses_are_dropped_with_their_reason(response, finish_reason, reason):
    kept, rejects = filter_responses([row(response, finish_reason=finish_reason)], FiltersConfig())
    assert kept == []
    assert [r.reason for r in rejects] == [reason]
    assert rejects[0].detail
    assert rejects[0].response == response  # the paid-for answer is kept in the reject


def test_good_responses_survive_in_order():
    rows = [row(GOOD, id="a"), row("4", prompt="What is 2 + 2?", id="b"), row("Yes.", id="c")]
    kept, rejects = filter_responses(rows, FiltersConfig())
    assert [r["id"] for r in kept] == ["a", "b", "c"] and rejects == []


def test_length_bounds_and_truncation_switch():
    config = FiltersConfig(min_response_chars=10, quality={"max_response_chars": 50})
    _, rejects = filter_responses([row("short"), row(GOOD)], config)
    assert [r.reason for r in rejects] == ["too_short", "too_long"]
    kept, _ = filter_responses([row(GOOD, finish_reason="length")], FiltersConfig(drop_truncated=False))
    assert len(kept) == 1


def test_long_helpful_answer_mentioning_a_limit_is_not_a_refusal():
    text = GOOD + " I can't help with the lab part, but " + " ".join(
        f"step {i}: the Calvin cycle fixes carbon molecule number {i * 7} into sugar." for i in range(12)
    )
    kept, _ = filter_responses([row(text)], FiltersConfig())
    assert len(kept) == 1


def test_language_check_and_switching_filters_off():
    russian = "Растения поглощают свет и превращают углекислый газ и воду в глюкозу."
    _, rejects = filter_responses([row(russian)], FiltersConfig(quality={"language": "latin"}))
    assert [r.reason for r in rejects] == ["language"]
    kept, _ = filter_responses([row(russian)], FiltersConfig(quality={"language": "cyrillic"}))
    assert len(kept) == 1
    off = FiltersConfig(quality={"refusal": False, "repetition": False, "prompt_echo": False})
    kept, _ = filter_responses(
        [row("I can't help with that."), row("na " * 100), row("Explain how photosynthesis works.")], off
    )
    assert len(kept) == 3


def test_extra_refusal_pattern_and_unknown_language():
    config = FiltersConfig(quality={"extra_refusal_patterns": [r"^no comment"]})
    _, rejects = filter_responses([row("No comment on that.")], config)
    assert [r.reason for r in rejects] == ["refusal"]

def test_bad_language_and_bad_pattern_fail_when_the_config_loads(tmp_path):
    """Both are refused by the config itself, before any teacher call is paid."""
    from distillflow.config import ConfigError, parse_config

    base = {
        "name": "q",
        "output_dir": str(tmp_path / "out"),
        "seeds": [{"path": str(tmp_path / "seeds.jsonl")}],
        "teacher": {"model": "m"},
    }
    with pytest.raises(ConfigError, match=r"filters\.quality\.language.*'latin'"):
        parse_config({**base, "filters": {"quality": {"language": "klingon"}}})
    with pytest.raises(ConfigError, match=r"extra_refusal_patterns\[0\] '\(unclosed' is not a regular expression"):
        parse_config({**base, "filters": {"quality": {"extra_refusal_patterns": ["(unclosed"]}}})


def test_a_missing_decontamination_file_fails_when_the_config_loads(tmp_path):
    """Checked with the seed files, before prompt generation can pay the teacher."""
    from distillflow.config import ConfigError, load_config

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: q\noutput_dir: {tmp_path / 'out'}\nseeds: [{{path: {seeds}}}]\nteacher: {{model: m}}\n"
        f"filters: {{decontamination: {{eval_files: [{tmp_path / 'missing.jsonl'}]}}}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"filters\.decontamination\.eval_files\.0: .*missing\.jsonl does not exist"):
        load_config(config)
