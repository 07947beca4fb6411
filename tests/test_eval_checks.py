"""The answer checkers and agreement metrics of `distill eval`, on constructed cases."""

from __future__ import annotations

import math

import pytest

from distillflow.tasks.evaluation.checks import (
    check_choice,
    check_contains,
    check_exact,
    check_json,
    check_numeric,
    check_regex,
    is_correct,
    last_number,
    lcs_length,
    rouge_l,
    token_f1,
)


@pytest.mark.parametrize(
    ("check", "answer", "reference", "expected"),
    [
        (check_exact, "  Paris\n", "Paris", True),
        (check_exact, "paris", "Paris", False),
        (check_exact, "Paris.", "Paris", False),
        (check_contains, "The capital is Paris.", "Paris", True),
        (check_contains, "The capital is Lyon.", "Paris", False),
        (check_numeric, "17 + 25 = 42", "42", True),
        (check_numeric, "The answer is 1,000,000.", "1000000", True),
        (check_numeric, "about 3.14159", "3.14159", True),
        (check_numeric, "42 or maybe 43", "42", False),
        (check_numeric, "no idea", "42", False),
        (check_numeric, "-7", "-7.0", True),
        (check_regex, "order #12345 shipped", r"#\d{5}\b", True),
        (check_regex, "order #1234 shipped", r"#\d{5}\b", False),
        (check_choice, "B", "B", True),
        (check_choice, "(B)", "B", True),
        (check_choice, "The answer is B.", "B", True),
        (check_choice, "B) Paris", "B", True),
        (check_choice, "C", "B", False),
        (check_choice, "paris", "B) Paris", True),
        (check_choice, "B", "B) Paris", True),
        (check_choice, "Lyon", "B) Paris", False),
        (check_json, '{"a": 1, "b": [1, 2]}', '{"b": [1, 2], "a": 1}', True),
        (check_json, '```json\n{"a": 1}\n```', '{"a": 1}', True),
        (check_json, 'Here you go: {"a": 1}', '{"a": 1}', True),
        (check_json, '{"a": 2}', '{"a": 1}', False),
        (check_json, "not json", '{"a": 1}', False),
    ],
)
def test_checker(check, answer, reference, expected):
    assert check(answer, reference) is expected


def test_numbers_in_lists_are_separate():
    assert last_number("3, 8, 5") == 5.0
    assert last_number("1,234") == 1234.0
    assert last_number("nothing") is None


def test_missing_answer_is_wrong_and_bad_references_are_errors():
    assert is_correct("exact", None, "x") is False
    with pytest.raises(ValueError, match="reference"):
        check_numeric("42", "forty-two")
    with pytest.raises(ValueError, match="reference"):
        check_json("{}", "{not json")


def test_token_f1_analytic():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("dog", "the cat sat") == 0.0
    # 2 of 3 predicted tokens match, 2 of 4 reference tokens: P=2/3, R=1/2 → F1 = 4/7.
    assert math.isclose(token_f1("the cat ran", "the cat sat down"), 4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_rouge_l_is_lcs_f1():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge_l("a b c d", "a b c d") == 1.0
    # LCS("a x b y", "a b z") = "a b": P = 2/4, R = 2/3 → F1 = 4/7.
    assert math.isclose(rouge_l("a x b y", "a b z"), 4 / 7)
    assert rouge_l("b a", "a b") == 0.5  # order matters, unlike token F1
    assert token_f1("b a", "a b") == 1.0


def test_one_of_accepts_any_listed_answer_and_nothing_else():
    from distillflow.tasks.evaluation.checks import is_correct

    assert is_correct("one_of", " l\n", "a|l|m") and is_correct("one_of", "a", "a|l|m")
    assert not is_correct("one_of", "x", "a|l|m") and not is_correct("one_of", "al", "a|l|m")
    assert not is_correct("one_of", None, "a|l|m")


def test_spread_tells_a_model_that_covers_the_answers_from_one_that_repeats_one():
    from distillflow.tasks.evaluation.evaluate import spread_of

    valid = [("a", "b", "c", "d"), ("x", "y")]
    covering = spread_of([["a", "b", "c", "d"], ["x", "y", "x", "y"]], valid)
    repeating = spread_of([["a", "a", "a", "a"], ["x", "x", "x", "x"]], valid)
    wrong = spread_of([["a", "q", None, "q"], ["z", "z", "z", "z"]], valid)
    assert covering == {"prompts": 2, "samples_per_prompt": 4, "validity": 1.0, "spread": 1.0}
    assert repeating["validity"] == 1.0 and repeating["spread"] == (1 / 4 + 1 / 2) / 2
    assert wrong["validity"] == 1 / 8 and wrong["spread"] == (1 / 4 + 0) / 2
