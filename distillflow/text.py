"""Text helpers every layer shares: the one normaliser and the one refusal check.

`normalize_text` is the form in which two texts count as the same (exact dedup, prompt
echo, copy checks, answer checks). `is_refusal` matches refusal phrases after Unicode
NFKC and straightened apostrophes; `REFUSAL` is the answer check's pattern set
(anywhere in a short answer), `REFUSAL_OPENING` the stricter one for text that must not
*start* like a refusal (a prompt the teacher was asked to write).
(Near-duplicate shingling folds text its own way, on bytes, for speed: tasks/filters/minhash.py.)
"""

from __future__ import annotations

import re
import unicodedata


def normalize_text(text: str, words_only: bool = False) -> str:
    """Unicode NFKC, case-fold, every run of whitespace → one space, stripped. With
    `words_only`, punctuation and symbols go too: only the words, space-separated."""
    if text.isascii():  # NFKC is the identity on ASCII, and case-folding is lower()
        folded = text.lower()
    else:
        folded = unicodedata.normalize("NFKC", text).casefold()
    if words_only:
        return " ".join(re.findall(r"\w+", folded))
    return " ".join(folded.split())


# Opening phrases of refusals. Matched case-insensitively on short responses only (see
# `QualityConfig.refusal_max_chars`), after curly apostrophes are straightened.
REFUSAL_PATTERNS = [
    r"\bi(?: am|'m) (?:sorry|afraid)\b[^.!?\n]{0,60}\b(?:can ?not|can't|won't|will not|unable|not able)\b",
    r"\b(?:sorry|apologi[sz]e)[,.!]? (?:but )?i (?:can ?not|can't|won't|will not|am unable|'m unable|am not able|'m not able)\b",
    r"^\s*i (?:can ?not|can't|won't|will not|am unable to|'m unable to|am not able to|'m not able to|must decline to|must refuse to) "
    r"(?:help|assist|provide|comply|do that|fulfil|fulfill|answer|create|generate|write|support|engage|share|give|respond|complete)",
    r"\bi (?:can ?not|can't|won't|will not) (?:help|assist) (?:you )?with (?:that|this)\b",
    r"\bas an ai(?: language model| assistant| model)?,? i (?:can ?not|can't|don't|do not|am not|'m not|am unable|must)\b",
    r"\bi must (?:respectfully )?(?:decline|refuse)\b",
    r"\bi(?: am|'m) not (?:able|going|allowed|permitted) to (?:help|assist|provide|comply|do that|answer)\b",
    r"\bthis (?:request|question) (?:goes against|violates)\b",
]


# A text that opens like a refusal ("I'm sorry, ...", "As an AI ...", "I can't help ...").
REFUSAL_OPENING = re.compile(
    r"^\W*(?:(?:i'm|i am) sorry|sorry,? but|as an ai\b|i apologi[sz]e|"
    r"(?:i|i'm|i am) (?:cannot|can't|won't|will not|unable to|not able to) "
    r"(?:help|assist|comply|provide|create|write|do that|fulfil|generate|rewrite))",
    re.IGNORECASE,
)


# Every pattern of REFUSAL_PATTERNS starts at the text's start or at one of these letters
# ("i", "sorry", "apologise", "as an ai", "this"): a cheap look-ahead skips every other
# position before the alternatives are tried there (about 4x faster on answer-length text).
_REFUSAL_STARTS = "(?:(?=[iast])|^)"


def compile_refusal_patterns(extra: list[str] | None = None) -> re.Pattern[str]:
    """REFUSAL_PATTERNS plus `extra` (the config's extra_refusal_patterns), case-insensitive.
    Matches what their plain alternation matches: at each position the built-in patterns
    are tried first (where they can start), then `extra`."""
    built_in = _REFUSAL_STARTS + "(?:" + "|".join(f"(?:{p})" for p in REFUSAL_PATTERNS) + ")"
    return re.compile("|".join([built_in, *(f"(?:{p})" for p in extra or [])]), re.IGNORECASE)


REFUSAL = compile_refusal_patterns()


def _straighten(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")


def is_refusal(text: str, pattern: re.Pattern[str] = REFUSAL) -> str | None:
    """The matched refusal phrase, or None."""
    if not text.isascii():  # NFKC is the identity on ASCII, which has no curly apostrophe
        text = _straighten(unicodedata.normalize("NFKC", text))
    match = pattern.search(text.strip())
    return match.group(0) if match else None
