"""Response-side quality checks: each returns a reason code and a detail, or None to keep.

Checks run in a fixed order (`check_response`) and the first that fails names the
reason, so every dropped answer has exactly one reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from distillflow.tasks.filters.config import FiltersConfig
from distillflow.text import compile_refusal_patterns, is_refusal, normalize_text

# Letter ranges per script, for the optional language check (a cheap script test: it tells
# Latin from Cyrillic or CJK, not English from French).
SCRIPT_RANGES: dict[str, list[tuple[int, int]]] = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)],
    "greek": [(0x370, 0x3FF), (0x1F00, 0x1FFF)],
    "cyrillic": [(0x400, 0x52F)],
    "hebrew": [(0x590, 0x5FF)],
    "arabic": [(0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF)],
    "devanagari": [(0x900, 0x97F)],
    "thai": [(0xE00, 0xE7F)],
    "hangul": [(0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)],
    "cjk": [(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)],
}


@dataclass(frozen=True, slots=True)
class QualityVerdict:
    reason: str
    detail: str


def repeated_ngram_fraction(tokens: list[str], n: int) -> float:
    """Fraction of the n-grams of `tokens` that repeat an earlier n-gram (0 = none, →1 = loop)."""
    count = len(tokens) - n + 1
    if count <= 1:
        return 0.0
    distinct = len(set(_ngrams(tokens, n)))
    return (count - distinct) / count


def _ngrams(tokens: list[str], n: int) -> zip:
    """The n-grams of `tokens` as tuples, in order (zip of shifted slices: no Python loop)."""
    return zip(*[tokens[i:] for i in range(n)])


def max_line_repeats(text: str) -> int:
    lines = text.splitlines()
    if len(lines) <= 1:  # most answers are one paragraph
        return 1 if text.strip() else 0
    stripped = [line.strip() for line in lines]
    counts = Counter(line for line in stripped if line)
    return max(counts.values()) if counts else 0


def echo_fraction(prompt: str, response: str, n: int = 3, response_words: list[str] | None = None) -> float:
    """Fraction of the response's word n-grams that also occur in the prompt (1.0 if equal).
    `response_words`: `normalize_text(response).split()`, when the caller has it already."""
    prompt_words = normalize_text(prompt).split()
    if response_words is None:
        response_words = normalize_text(response).split()
    if response_words == prompt_words:
        return 1.0
    if len(response_words) < n:
        return 0.0
    prompt_grams = set(_ngrams(prompt_words, n))
    if not prompt_grams:
        return 0.0
    copied = sum(map(prompt_grams.__contains__, _ngrams(response_words, n)))
    return copied / (len(response_words) - n + 1)


def script_fraction(text: str, script: str) -> float:
    """Fraction of the letters of `text` that belong to `script` (1.0 when there is no letter)."""
    ranges = SCRIPT_RANGES[script]
    letters = [ord(ch) for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    inside = sum(any(lo <= code <= hi for lo, hi in ranges) for code in letters)
    return inside / len(letters)


class ResponseChecker:
    """Applies the configured response checks; build once per config, call per row."""

    def __init__(self, config: FiltersConfig) -> None:
        self.config = config
        self.quality = config.quality
        self.refusal_pattern = compile_refusal_patterns(self.quality.extra_refusal_patterns)
        self.keep_refusals = frozenset(self.quality.keep_refusals_for)

    def refusal_expected(self, strategy: str) -> bool:
        """Whether `strategy`'s prompts ought to be refused (`quality.keep_refusals_for`)."""
        return strategy in self.keep_refusals or strategy.split(":", 1)[0] in self.keep_refusals

    def __call__(
        self, prompt: str, response: str | None, finish_reason: str | None, strategy: str = ""
    ) -> QualityVerdict | None:
        config, quality = self.config, self.quality
        text = (response or "").strip()
        if not text:
            return QualityVerdict("empty", "no content" if response is None else "whitespace only")
        if config.drop_truncated and finish_reason == "length":
            return QualityVerdict("truncated", "finish_reason=length (max_tokens reached)")
        if len(text) < config.min_response_chars:
            return QualityVerdict("too_short", f"{len(text)} chars < min_response_chars={config.min_response_chars}")
        if quality.max_response_chars is not None and len(text) > quality.max_response_chars:
            return QualityVerdict("too_long", f"{len(text)} chars > max_response_chars={quality.max_response_chars}")
        if quality.refusal and len(text) <= quality.refusal_max_chars and not self.refusal_expected(strategy):
            phrase = is_refusal(text, self.refusal_pattern)
            if phrase is not None:
                return QualityVerdict("refusal", f"matched {phrase.strip()[:80]!r}")
        words = normalize_text(text).split() if quality.repetition or quality.prompt_echo else None
        if quality.repetition:
            verdict = self._repetition(text, words)
            if verdict is not None:
                return verdict
        if quality.prompt_echo:
            fraction = echo_fraction(prompt, text, response_words=words)
            if fraction >= quality.echo_threshold:
                return QualityVerdict("prompt_echo", f"{fraction:.2f} of response 3-grams copied from the prompt")
        if quality.language is not None:
            fraction = script_fraction(text, quality.language)
            if fraction < quality.min_language_fraction:
                return QualityVerdict(
                    "language", f"{fraction:.2f} of letters in script {quality.language!r} < {quality.min_language_fraction}"
                )
        return None

    def _repetition(self, text: str, words: list[str]) -> QualityVerdict | None:
        """`words`: `normalize_text(text).split()`."""
        quality = self.quality
        if len(words) >= quality.repetition_min_words:
            fraction = repeated_ngram_fraction(words, quality.repetition_ngram)
            if fraction > quality.max_repeated_ngram_fraction:
                return QualityVerdict(
                    "repetition", f"{fraction:.2f} of word {quality.repetition_ngram}-grams are repeats"
                )
        elif len(text) >= 200:
            # few words but long (a character loop, or a script without spaces): 10-char grams
            # (a stricter bar than for words: natural text repeats short character runs)
            fraction = repeated_ngram_fraction(list(text), 10)
            if fraction > max(quality.max_repeated_ngram_fraction, 0.8):
                return QualityVerdict("repetition", f"{fraction:.2f} of 10-character grams are repeats")
        repeats = max_line_repeats(text)
        if repeats > quality.max_line_repeats:
            return QualityVerdict("repetition", f"one line occurs {repeats} times")
        return None
