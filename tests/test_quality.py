"""Response-side quality filters: every reason, and good answers kept."""

from __future__ import annotations

import pytest

from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.passes import filter_responses


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


# -- the fast paths agree with plain reference computations ----------------------------------


def test_refusal_lookahead_admits_every_letter_the_patterns_start_with():
    """The look-ahead before the built-in patterns must not skip a position where one of
    them could start, under the same case folding (e.g. 'İ', 'ı', 'ſ' and the Kelvin sign)."""
    import re

    lookahead = re.compile("[iast]", re.IGNORECASE)
    for letter in "iast":
        literal = re.compile(letter, re.IGNORECASE)
        skipped = [hex(code) for code in range(0x110000) if literal.match(chr(code)) and not lookahead.match(chr(code))]
        assert skipped == [], letter


def test_refusal_pattern_matches_what_the_plain_alternation_matches():
    import random
    import re

    from distillflow.text import REFUSAL_PATTERNS, compile_refusal_patterns

    fragments = [
        "I'm sorry", "I am afraid", "i can't", "I cannot help", "won't", "sorry, but i can't", "Apologize.",
        "as an AI language model, I can't", "I must decline", "I'm not able to help", "this request violates",
        "İ", "ı", "ſorry", "\u212a", "  ", "\n", ".", "but", "help", "with that", "assist you with this",
        "I will not", "not going to answer", "This question goes against", "fine", "  i won't do that", "nope",
        "ich kann pas",
    ]
    rng = random.Random(0)
    for extra in (None, [r"\bnope\b", r"(?:ich kann|je ne peux) pas"]):
        fast = compile_refusal_patterns(extra)
        plain = re.compile("|".join(f"(?:{p})" for p in [*REFUSAL_PATTERNS, *(extra or [])]), re.IGNORECASE)
        matched = 0
        for _ in range(20000):
            text = " ".join(rng.choice(fragments) for _ in range(rng.randint(1, 8)))
            if rng.random() < 0.5:
                text = text.strip()
            got, want = fast.search(text), plain.search(text)
            assert (got and (got.span(), got.group(0))) == (want and (want.span(), want.group(0))), text
            matched += want is not None
        assert 5000 < matched < 19000  # both kinds of text were tried


def test_repetition_echo_and_line_checks_agree_with_reference_loops():
    import random
    from collections import Counter

    from distillflow.tasks.filters.quality import echo_fraction, max_line_repeats, repeated_ngram_fraction
    from distillflow.text import normalize_text

    def repeated_reference(tokens, n):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        return 0.0 if len(grams) <= 1 else (len(grams) - len(set(grams))) / len(grams)

    def echo_reference(prompt, response, n=3):
        p, r = normalize_text(prompt).split(), normalize_text(response).split()
        if p == r:
            return 1.0
        if len(r) < n:
            return 0.0
        prompt_grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
        grams = [tuple(r[i : i + n]) for i in range(len(r) - n + 1)]
        return sum(g in prompt_grams for g in grams) / len(grams)

    def lines_reference(text):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return max(Counter(lines).values()) if lines else 0

    words = ["the", "cat", "sat", "on", "mat", "Mat", "\n", "\r\n", "\x1c", " ", "ok", "İ", "日本", "same line\n"]
    rng = random.Random(3)
    for _ in range(5000):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        response = prompt if rng.random() < 0.2 else " ".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
        tokens = response.split()
        for n in (1, 2, 3, 4):
            assert repeated_ngram_fraction(tokens, n) == repeated_reference(tokens, n)
        assert echo_fraction(prompt, response) == echo_reference(prompt, response)
        assert max_line_repeats(response) == lines_reference(response)
