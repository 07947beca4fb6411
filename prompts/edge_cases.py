"""Rule-based edge cases: each function turns any seed prompt into a harder input.

Every generator has the signature `(text, rng, config) -> str | None` and uses only
`rng` for randomness, so a row depends on nothing but its seed text and its own
`random.Random`. `None` means "not applicable to this seed" (the caller tries another).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from distillflow.prompts.config import EdgeCaseConfig

EdgeCaseFn = Callable[[str, random.Random, EdgeCaseConfig], "str | None"]

# ── empty ────────────────────────────────────────────────────────────────────────────

# str.isspace() is True for each of these.
WHITESPACE = (" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u2028", "\v", "\f")


def empty_input(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The empty string or a whitespace-only prompt (spaces, tabs, newlines, NBSP, ...)."""
    length = rng.randint(0, 6)
    return "".join(rng.choice(WHITESPACE) for _ in range(length))


# ── long ─────────────────────────────────────────────────────────────────────────────

_FILLER_WORDS = (  # noqa: SIM905 - a sentence reads better than a 60-item list
    "the report notes that each team reviewed its quarterly plan and agreed on a few "
    "changes to the schedule while the budget stayed within the limits set last year "
    "several members asked for more detail about the risks and the timeline so the "
    "committee added an appendix with tables figures and a short summary of open items"
).split()


def _filler_sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(_FILLER_WORDS, k=rng.randint(8, 18))).capitalize() + "."


def long_input(text: str, rng: random.Random, config: EdgeCaseConfig) -> str | None:
    """The seed wrapped in background text until it is 90-100% of `long_input_tokens`.

    Token counts are estimated as characters / `chars_per_token`; a seed that alone is
    already too long for the budget gets None.
    """
    budget_chars = int(config.long_input_tokens * config.chars_per_token)
    # Filler words are at most 13 characters with their space, so aiming 16 above 90% and
    # stopping before the target keeps the result inside the 90-100% window.
    target = rng.randint(min(budget_chars, int(budget_chars * 0.9) + 16), budget_chars)
    question_first = rng.random() < 0.5
    head = (
        f"{text}\n\nBackground material follows.\n\n"
        if question_first
        else "Background material:\n\n"
    )
    tail = "" if question_first else f"\n\nWith that background in mind: {text}"
    room = target - len(head) - len(tail)
    if room < 0:  # the seed alone already fills the budget
        return None
    paragraphs: list[str] = []
    used = 0
    while True:
        paragraph = " ".join(_filler_sentence(rng) for _ in range(rng.randint(3, 6)))
        cost = len(paragraph) + 2
        if used + cost > room:
            break
        paragraphs.append(paragraph)
        used += cost
    body = "\n\n".join(paragraphs)
    # Top up with single words while the next one still fits under the target.
    while True:
        word = (" " if body else "") + rng.choice(_FILLER_WORDS)
        if len(head) + len(body) + len(word) + len(tail) > target:
            break
        body += word
    return head + body + tail


# ── numbers ──────────────────────────────────────────────────────────────────────────

BOUNDARY_NUMBERS = (
    "0",
    "-0",
    "-1",
    "-273.15",
    "1e308",
    "-1e-308",
    "2147483647",
    "2147483648",
    "9223372036854775807",
    "18446744073709551616",
    "0.1",
    "0.30000000000000004",
    "3.141592653589793238462643383279",
    "1/3",
    "1,000,000.5",
    "NaN",
    "-infinity",
    "10^100",
)

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*(?![\w])")


def boundary_numbers(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """Replace one number in the seed with a boundary value, or add one if there is none."""
    value = rng.choice(BOUNDARY_NUMBERS)
    matches = list(_NUMBER.finditer(text))
    matches = [match for match in matches if match.group() != value]
    if matches:
        match = rng.choice(matches)
        return text[: match.start()] + value + text[match.end() :]
    clause = rng.choice(
        (
            "Assume every quantity involved is {v}.",
            "Use {v} wherever a number is needed.",
            "(Edge case: the count is {v}.)",
            "Treat the relevant amount as {v} and explain what changes.",
        )
    )
    return f"{text.rstrip()} {clause.format(v=value)}"


# ── unicode ──────────────────────────────────────────────────────────────────────────

EMOJI = ("😀", "🚀", "👍🏽", "👩‍💻", "🇯🇵", "❤️", "🤔", "🔥", "🧪", "🏳️‍🌈")
RTL_PHRASES = (
    "مرحبا بالعالم",
    "שלום עולם",
    "\u202eesrever\u202c",
    "سؤال: ما هو؟",
    "\u200fשאלה\u200f",
)
COMBINING = ("\u0301", "\u0300", "\u0308", "\u0327", "\u0303", "\u036f", "\u0489")
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\ufeff", "\u2060")
HOMOGLYPHS = {
    "a": "а", "c": "с", "e": "е", "o": "о", "p": "р", "x": "х", "y": "у", "i": "і",
    "A": "Α", "B": "Β", "E": "Ε", "H": "Η", "K": "Κ", "M": "Μ", "O": "Ο", "T": "Τ",
}  # fmt: skip
CJK_PHRASES = ("你好，世界", "これはテストです", "안녕하세요", "問題：答えは何ですか", "汉字と한글")


def _sprinkle(text: str, rng: random.Random, pieces: tuple[str, ...], count: int) -> str:
    """Insert `count` random pieces at random word boundaries."""
    words = text.split(" ")
    for _ in range(count):
        position = rng.randint(0, len(words))
        words.insert(position, rng.choice(pieces))
    return " ".join(words)


def _inside_words(text: str, rng: random.Random, pieces: tuple[str, ...], rate: float) -> str:
    """Put a piece after some letters (combining marks, zero-width characters)."""
    out = []
    for char in text:
        out.append(char)
        if char.isalpha() and rng.random() < rate:
            out.append(rng.choice(pieces))
    return "".join(out)


def unicode_stress(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """Emoji, RTL text, combining marks, zero-width characters, homoglyphs or CJK."""
    kind = rng.choice(("emoji", "rtl", "combining", "zero_width", "homoglyph", "cjk"))
    if kind == "emoji":
        result = _sprinkle(text, rng, EMOJI, rng.randint(1, 4))
    elif kind == "rtl":
        result = _sprinkle(text, rng, RTL_PHRASES, rng.randint(1, 2))
    elif kind == "combining":
        result = _inside_words(text, rng, COMBINING, 0.3)
    elif kind == "zero_width":
        result = _inside_words(text, rng, ZERO_WIDTH, 0.25)
    elif kind == "homoglyph":
        result = "".join(
            HOMOGLYPHS[c] if c in HOMOGLYPHS and rng.random() < 0.5 else c for c in text
        )
    else:
        result = _sprinkle(text, rng, CJK_PHRASES, rng.randint(1, 2))
    if result.isascii():  # no letter to decorate (e.g. digits only): fall back to emoji
        result = f"{text} {rng.choice(EMOJI)}"
    return result


# ── mixed languages ──────────────────────────────────────────────────────────────────

MIXED_LANGUAGE_PHRASES = (
    ("Por favor, responde brevemente.", "es"),
    ("Réponds en français, s'il te plaît.", "fr"),
    ("Bitte antworte auf Deutsch.", "de"),
    ("请用中文回答。", "zh"),
    ("日本語で答えてください。", "ja"),
    ("Пожалуйста, ответь по-русски.", "ru"),
    ("من فضلك أجب باختصار.", "ar"),
    ("Per favore, spiega passo dopo passo.", "it"),
    ("Responda em português, por favor.", "pt"),
    ("कृपया सरल शब्दों में उत्तर दें।", "hi"),
)


def mixed_language(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The seed with one or two sentences in other languages before or after it."""
    phrases = [phrase for phrase, _ in rng.sample(MIXED_LANGUAGE_PHRASES, rng.randint(1, 2))]
    if rng.random() < 0.5:
        return " ".join([*phrases, text])
    return " ".join([text, *phrases])


# ── malformed structured input ───────────────────────────────────────────────────────


def malformed_structure(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The seed inside broken JSON, an unclosed code block, broken Markdown or HTML."""
    kind = rng.choice(
        ("json_unclosed", "json_trailing_comma", "json_quotes", "code", "markdown", "html")
    )
    if kind == "json_unclosed":
        return '{"task": "answer", "input": "' + text.replace('"', '\\"') + '", "options": [1, 2,'
    if kind == "json_trailing_comma":
        return '{"input": "' + text.replace('"', '\\"') + '", "format": "text",}'
    if kind == "json_quotes":
        return "{'input': '" + text + "', priority: high, }"
    if kind == "code":
        return f'```python\ndef question():\n    return """{text}\n    # unterminated'
    if kind == "markdown":
        return f"| field | value |\n|---|\n| question | {text}\n| note | **bold without end\n\n- item\n  - "
    return f"<div><p>{text}<b>important</p></div"


# ── contradictory / ambiguous instructions ───────────────────────────────────────────

CONTRADICTIONS = (
    "Answer in one word. Explain your reasoning in detail.",
    "Be as brief as possible, but cover every aspect thoroughly.",
    "Reply only in JSON. Do not use any braces.",
    "Use bullet points. Do not use lists of any kind.",
    "Answer yes. Actually, answer no.",
    "Write at least 300 words and at most 50 words.",
    "Do it the usual way.",
    "Use the second one, not the other one.",
    "Answer it like last time.",
    "Make it shorter but also longer.",
)


def contradictory_instructions(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The seed plus an instruction that contradicts itself or is ambiguous."""
    instruction = rng.choice(CONTRADICTIONS)
    return f"{text.rstrip()} {instruction}" if rng.random() < 0.7 else f"{instruction} {text}"


# ── several questions in one ─────────────────────────────────────────────────────────

SIDE_QUESTIONS = (
    "What is the capital of Australia?",
    "How many days are in a leap year?",
    "Who wrote 'Pride and Prejudice'?",
    "What is 17 times 23?",
    "Which planet is closest to the sun?",
    "What does HTTP stand for?",
    "How do you say 'thank you' in Japanese?",
    "Is a tomato a fruit or a vegetable?",
    "What is the boiling point of water in Fahrenheit?",
    "Name three prime numbers greater than 50.",
    "What year did the first moon landing happen?",
    "What is the plural of 'cactus'?",
)


def multi_question(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The seed together with one to three unrelated questions in a single message."""
    extra = rng.sample(SIDE_QUESTIONS, rng.randint(1, 3))
    questions = [text.strip(), *extra]
    rng.shuffle(questions)
    if rng.random() < 0.5:
        return " Also: ".join(questions)
    return "\n".join(f"{index}. {question}" for index, question in enumerate(questions, 1))


# ── strict format constraints ────────────────────────────────────────────────────────


def format_constraint(text: str, rng: random.Random, config: EdgeCaseConfig) -> str:
    """The seed plus a strict output-format constraint."""
    n = rng.randint(3, 12)
    constraint = rng.choice(
        (
            f"Answer in exactly {n} words.",
            'Respond with JSON only, of the form {"answer": "..."}; no other text.',
            f"Use no more than {n * 10} characters.",
            "Answer entirely in lowercase letters.",
            "Do not use the letter 'e' anywhere in your answer.",
            f"Reply with a numbered list of exactly {min(n, 7)} items.",
            "Answer with a single word: yes or no.",
            "Return a Markdown table with exactly two columns and nothing else.",
            f"Your answer must be exactly {min(n, 5)} sentences long.",
            "Answer in valid YAML with the keys `answer` and `confidence` only.",
        )
    )
    return f"{text.rstrip()}\n\n{constraint}"


EDGE_CASES: dict[str, EdgeCaseFn] = {
    "empty": empty_input,
    "long": long_input,
    "numbers": boundary_numbers,
    "unicode": unicode_stress,
    "mixed_language": mixed_language,
    "malformed": malformed_structure,
    "contradictory": contradictory_instructions,
    "multi_question": multi_question,
    "format_constraint": format_constraint,
}
