"""Arithmetic edge cases: carries, overflow, off-by-one, zero, precision, empty lists.

Each generator rewrites the numbers of a seed that has some; a seed without a number is
not an arithmetic task, so the generators return None for it.
"""

from __future__ import annotations

import random
import re

from distillflow.prompts.config import EdgeCaseConfig

# Integers and decimals that are not part of a word (so "GPT4" or "v2" stay untouched).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
# Two or more numbers separated by commas / "and": a collection of values.
NUMBER_LIST = re.compile(
    r"-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+(?:,?\s*(?:and|or)\s*-?\d+(?:\.\d+)?)?"
)


def _replace_numbers(text: str, values: list[str]) -> str | None:
    """Replace the seed's numbers, in order, with `values` (cycled); None without numbers."""
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    out, last = [], 0
    for index, match in enumerate(matches):
        out.append(text[last : match.start()])
        out.append(values[index % len(values)])
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def carries(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """Numbers whose sum, difference or product carries through every digit (9999 + 1)."""
    digits = rng.randint(3, 12)
    nines = "9" * digits
    return _replace_numbers(
        text, rng.choice(([nines, "1"], ["1" + "0" * digits, "1"], [nines, nines]))
    )


def overflow(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """Values at and just past fixed-width integer limits (2**31 - 1, 2**63, 2**64)."""
    limits = [
        str(2**31 - 1),
        str(2**31),
        str(2**32),
        str(2**63 - 1),
        str(2**63),
        str(2**64),
        str(-(2**63)),
    ]
    first = rng.choice(limits)
    return _replace_numbers(text, [first, rng.choice(("1", "2", first))])


def off_by_one(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """The seed's numbers as range endpoints, asking for an inclusive count (fencepost)."""
    numbers = [match.group() for match in NUMBER.finditer(text)]
    if not numbers:
        return None
    low = rng.randint(0, 20)
    high = low + rng.randint(0, 3) if rng.random() < 0.5 else low + 10 ** rng.randint(1, 3)
    rewritten = _replace_numbers(text, [str(low), str(high)])
    question = rng.choice(
        (
            f"Also: how many integers are there from {low} to {high}, counting both ends?",
            f"Also: a fence {high - low} metres long has a post every metre, including both ends. How many posts?",
            f"Also: how many numbers are in range({low}, {high}) in Python?",
        )
    )
    return f"{rewritten} {question}"


def zero_and_negative(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """Zero (including as a divisor) and negative values in place of the seed's numbers."""
    return _replace_numbers(
        text, rng.choice((["0"], ["-7", "0"], ["0", "-0"], ["-1", "-1"], ["12", "0"]))
    )


def precision(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """Decimals that are inexact in binary floating point, and very small or large magnitudes."""
    return _replace_numbers(
        text,
        rng.choice(
            (["0.1", "0.2"], ["1e-16", "1"], ["0.3", "0.1"], ["1.005", "100"], ["1e16", "1"])
        ),
    )


def empty_collection(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """A list of numbers in the seed replaced by an empty list (sum, mean, max of nothing)."""
    match = NUMBER_LIST.search(text)
    if not match:
        return None
    empty = rng.choice(("an empty list of numbers", "[]", "no numbers at all", "(an empty set)"))
    return text[: match.start()] + empty + text[match.end() :]


EDGE_CASES = {
    "carry": carries,
    "overflow": overflow,
    "off_by_one": off_by_one,
    "zero_negative": zero_and_negative,
    "precision": precision,
    "empty_collection": empty_collection,
}
