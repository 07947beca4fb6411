"""Answer checkers and agreement metrics of `distill eval`: small pure functions.

A checker takes `(answer, reference)` and says whether the answer is right. The reference's
meaning depends on the check:

    exact     the answer, whitespace-stripped, equals the reference (stripped)
    contains  the reference occurs in the answer (case-sensitive)
    numeric   the last number in the answer equals the reference's number (rel. 1e-6, abs. 1e-9)
    regex     the reference is a pattern; `re.search` finds it in the answer
    choice    the reference is an option letter ("B") or an option text ("Paris") or both
              ("B) Paris"); the answer picks an option by its letter or by its text
    json      answer and reference parse to equal JSON values (code fences around the
              answer and text around one JSON object/array are tolerated)
    one_of    the reference lists every right answer, separated by "|" ("a|l|m"); the answer,
              whitespace-stripped, is one of them (questions with several right answers)

Metrics compare an answer with a reference text (the teacher's answer on held-out rows):
`exact_match`, `token_f1` (SQuAD-style bag of tokens) and `rouge_l` (F1 of the longest
common token subsequence). Tokens are lower-cased words and single punctuation marks.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from distillflow.text import normalize_text

NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-9

# Thousands separators are allowed only in groups of three ("1,000,000"), so "3, 8, 5" is three numbers.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def check_exact(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def check_contains(answer: str, reference: str) -> bool:
    return reference.strip() in answer


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def check_numeric(answer: str, reference: str) -> bool:
    expected, got = last_number(reference), last_number(answer)
    if expected is None:
        raise ValueError(f"numeric check: the reference {reference!r} holds no number; fix the eval set")
    if got is None:
        return False
    return math.isclose(got, expected, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)


ONE_OF_SEPARATOR = "|"


def check_one_of(answer: str, reference: str) -> bool:
    return answer.strip() in {option.strip() for option in reference.split(ONE_OF_SEPARATOR)}


def check_regex(answer: str, reference: str) -> bool:
    return re.search(reference, answer) is not None


_OPTION_LABEL = re.compile(r"^\s*\(?([A-Za-z])\s*[\).:]\s*(.*)$", re.S)  # "B) Paris", "(b). x", "C: y"
_LONE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*[.!]?\s*$")
_ANSWER_IS = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-Z])\b\)?", re.I)
_CAPITAL_WORD = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _normalise(text: str) -> str:
    return normalize_text(text).strip(".!").strip()


def chosen_letter(answer: str) -> str | None:
    """The option letter an answer picks: "B", "(B)", "B) Paris", "The answer is B", ..."""
    for pattern in (_LONE_LETTER, _OPTION_LABEL, _ANSWER_IS):
        match = pattern.match(answer) if pattern is not _ANSWER_IS else pattern.search(answer)
        if match and (pattern is not _OPTION_LABEL or match.group(1).isupper()):
            return match.group(1).upper()
    match = _CAPITAL_WORD.search(answer)
    return match.group(1) if match and match.group(1) != "I" else None


def check_choice(answer: str, reference: str) -> bool:
    reference = reference.strip()
    letter, text = None, reference
    labelled = _OPTION_LABEL.match(reference)
    if len(reference) == 1 and reference.isalpha():
        letter, text = reference.upper(), ""
    elif labelled and labelled.group(1).isupper():
        letter, text = labelled.group(1), labelled.group(2)
    if text:
        label = _OPTION_LABEL.match(answer)
        answer_text = label.group(2) if label and label.group(1).isupper() else answer
        if _normalise(answer_text) == _normalise(text):
            return True
    return letter is not None and chosen_letter(answer) == letter


_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```\s*$", re.S)


def parse_json_lenient(text: str) -> Any:
    """JSON from a model answer: as is, inside a code fence, or the outermost {...} / [...]."""
    fenced = _FENCE.match(text)
    candidates = [text, fenced.group(1)] if fenced else [text]
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise ValueError("no JSON value found")


def check_json(answer: str, reference: str) -> bool:
    try:
        expected = json.loads(reference)
    except ValueError as error:
        raise ValueError(f"json check: the reference {reference!r} is not valid JSON ({error}); fix the eval set") from None
    try:
        return parse_json_lenient(answer) == expected
    except ValueError:
        return False


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "exact": check_exact,
    "contains": check_contains,
    "numeric": check_numeric,
    "regex": check_regex,
    "choice": check_choice,
    "json": check_json,
    "one_of": check_one_of,
}


def is_correct(check: str, answer: str | None, reference: str) -> bool:
    """Run the named check; a missing answer (the model failed to answer) is wrong."""
    if answer is None:
        return False
    return CHECKS[check](answer, reference)


# -- agreement metrics ------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def metric_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def exact_match(answer: str, reference: str) -> float:
    return 1.0 if answer.strip() == reference.strip() else 0.0


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bags of tokens); 1.0 when both are empty."""
    predicted, expected = metric_tokens(answer), metric_tokens(reference)
    if not predicted or not expected:
        return 1.0 if predicted == expected else 0.0
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence (O(len(first) * len(second)) time, O(len(second)) memory)."""
    if not first or not second:
        return 0
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for index, other in enumerate(second):
            current.append(previous[index] + 1 if item == other else max(previous[index + 1], current[index]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: LCS of the token sequences over their lengths; 1.0 when both are empty."""
    predicted, expected = metric_tokens(answer), metric_tokens(reference)
    if not predicted or not expected:
        return 1.0 if predicted == expected else 0.0
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
