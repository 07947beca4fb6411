"""Programming edge cases: empty collections, single elements, off-by-one, overflow, Unicode.

Each generator adds an edge-case requirement to a seed that asks for code; other seeds
are not programming tasks, so the generators return None for them.
"""

from __future__ import annotations

import random
import re

from distillflow.prompts.config import EdgeCaseConfig

CODE_WORDS = re.compile(
    r"\b(code|function|program|script|python|javascript|java|rust|sql|regex|algorithm|"
    r"implement|array|list|string|class|method|sort|parse|loop|recursion|api)\b",
    re.IGNORECASE,
)


def is_code_task(text: str) -> bool:
    return CODE_WORDS.search(text) is not None


def _with_requirement(text: str, rng: random.Random, requirements: tuple[str, ...]) -> str | None:
    if not is_code_task(text):
        return None
    return f"{text.rstrip()}\n\n{rng.choice(requirements)}"


def empty_collections(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    return _with_requirement(
        text,
        rng,
        (
            'It must work when the input is empty ([], "" or {}).',
            "What should happen when the input list is empty? Handle that case explicitly.",
            "Include a test where the input collection has no elements.",
        ),
    )


def single_element(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    return _with_requirement(
        text,
        rng,
        (
            "Make sure it is correct for an input with exactly one element.",
            "Handle inputs where every element is the same value.",
        ),
    )


def off_by_one(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    n = rng.randint(1, 10)
    return _with_requirement(
        text,
        rng,
        (
            f"Indices are 1-based and the range 1..{n} includes both ends.",
            "Check the loop bounds: the last element must be processed exactly once.",
            f"The window size may equal the input length ({n}) or exceed it by one.",
        ),
    )


def overflow(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    return _with_requirement(
        text,
        rng,
        (
            "Values may be as large as 2**63 - 1; intermediate sums must not overflow a 64-bit integer.",
            "Inputs can contain -2147483648; negating it overflows a 32-bit int. Handle it.",
            "The input may have 10**7 elements; keep memory use linear.",
        ),
    )


def unicode_strings(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    return _with_requirement(
        text,
        rng,
        (
            "Strings may contain emoji and combining marks (e.g. 'e\u0301' and '👩‍💻'); count user-visible characters.",
            "Inputs may be right-to-left text or contain zero-width spaces.",
        ),
    )


EDGE_CASES = {
    "empty_collection": empty_collections,
    "single_element": single_element,
    "off_by_one": off_by_one,
    "overflow": overflow,
    "unicode_strings": unicode_strings,
}
