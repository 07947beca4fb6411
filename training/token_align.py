"""Grey-box targets: a teacher's API top-k logprobs, re-expressed in the student's vocabulary.

An OpenAI-compatible teacher returns, for every token of its answer, the token's text, its
logprob and up to k alternatives (text + logprob). The student tokenises the same answer
text differently. This module aligns the two token sequences on UTF-8 byte spans of the
answer and gives every student answer position the teacher's distribution over the
student's next token, as sparse (student ids, logprobs); whatever cannot be placed is left
to a tail bucket (the kd_topk loss keeps it as one extra class).

For a student token x* covering bytes [s, e) of the answer, take the teacher token j whose
span [u, v) contains s; P = answer[u:s] is the part of token j the student has already
emitted before this position (empty when both start together). Every candidate a of
position j (its alternatives, and the actual token) consistent with P (a starts with P)
contributes its probability p(a):

- the actual teacher token: to x* itself, times the teacher's probabilities of the actual
  tokens after j that x* also covers (chain rule: the probability that the teacher writes
  x*'s bytes next; the rest of p(a) went to continuations nobody reported: tail);
- another alternative: to the student's first piece of its remaining text a[len(P):]
  (the student's tokenisation of that text on its own), or to the tail when nothing remains
  (its continuation is unknown), or, when no student token can name it (bytes that are not
  UTF-8 text and are no single student token), it is dropped into the tail and counted.

With P empty the masses are the teacher's probabilities as reported (their total ≤ 1; the
rest is the tail). With P non-empty they are conditioned on P: divided by the total mass of
the consistent candidates.

Kinds of student positions (the coverage report counts each):

- exact: x* and teacher token j have the same span;
- merged: the spans differ (the student merged teacher tokens, split one, or both);
- uld: the teacher has a distribution there but its outcomes cannot be named in the
  student's vocabulary (token bytes the provider did not report, e.g. U+FFFD for a partial
  character, or every alternative dropped): the loss compares sorted probabilities
  (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030);
- none: no teacher distribution (no logprobs for that token, text after the teacher's
  answer such as the chat template's end-of-turn token, or text the teacher never wrote).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

KINDS = ("none", "exact", "merged", "uld")
NONE, EXACT, MERGED, ULD = range(4)
# OpenAI reports -9999.0 for a chosen token outside the top 20: "unknown", not a probability.
UNKNOWN_LOGPROB = -9999.0
# How far ahead (bytes) a token whose text does not match the answer is searched for.
RESYNC_WINDOW = 32
_ESCAPED_BYTE = re.compile(r"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True)
class TeacherToken:
    """One answer token as the API reported it. text: its bytes (None: unknown, e.g. the
    provider replaced a partial character by U+FFFD); logprob: None when not reported;
    alternatives: (bytes or None, logprob) of the top-k, best first."""

    text: bytes | None
    logprob: float | None
    alternatives: tuple[tuple[bytes | None, float], ...] = ()

    @property
    def has_distribution(self) -> bool:
        return self.logprob is not None or bool(self.alternatives)


@dataclass
class PositionTarget:
    """The teacher's distribution for one student answer position."""

    kind: int  # NONE, EXACT, MERGED or ULD
    ids: list[int] = field(default_factory=list)  # student ids (exact, merged); empty for uld/none
    logprobs: list[float] = field(default_factory=list)  # natural log; uld: the teacher's sorted top-k


@dataclass
class Coverage:
    """Counts over student answer positions, and where the teacher's reported mass went."""

    positions: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # indexed by kind
    mass_direct: float = 0.0  # alternatives that are one student token (or the actual token)
    mass_first_piece: float = 0.0  # alternatives merged onto the student token of their first piece
    mass_dropped: float = 0.0  # alternatives no student token could name (into the tail)
    rows_without_logprobs: int = 0

    def add(self, other: Coverage) -> None:
        self.positions = [a + b for a, b in zip(self.positions, other.positions)]
        self.mass_direct += other.mass_direct
        self.mass_first_piece += other.mass_first_piece
        self.mass_dropped += other.mass_dropped
        self.rows_without_logprobs += other.rows_without_logprobs

    @property
    def total(self) -> int:
        return sum(self.positions)

    @property
    def covered_share(self) -> float:
        """Share of student answer positions that carried a teacher distribution."""
        return (self.total - self.positions[NONE]) / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, float | int]:
        reported = self.mass_direct + self.mass_first_piece + self.mass_dropped
        return {
            "positions": self.total,
            **{kind: self.positions[index] for index, kind in enumerate(KINDS)},
            "covered_share": round(self.covered_share, 6),
            "mass_direct_share": round(self.mass_direct / reported, 6) if reported else 0.0,
            "mass_first_piece_share": round(self.mass_first_piece / reported, 6) if reported else 0.0,
            "mass_dropped_share": round(self.mass_dropped / reported, 6) if reported else 0.0,
            "rows_without_logprobs": self.rows_without_logprobs,
        }

    def summary(self) -> str:
        data = self.to_dict()
        share = (lambda n: f"{100 * n / self.total:.1f}%") if self.total else (lambda n: "0%")
        return (
            f"{self.total} student answer positions: {share(self.total - self.positions[NONE])} carry a teacher "
            f"distribution (exact {share(self.positions[EXACT])}, merged {share(self.positions[MERGED])}, "
            f"uld {share(self.positions[ULD])}, none {share(self.positions[NONE])}); reported mass: "
            f"{100 * data['mass_direct_share']:.1f}% direct, {100 * data['mass_first_piece_share']:.1f}% on a "
            f"first piece, {100 * data['mass_dropped_share']:.1f}% dropped; "
            f"{self.rows_without_logprobs} rows without logprobs"
        )


# --------------------------------------------------------------------------------------
# Reading the API's token strings
# --------------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


# A byte-level BPE vocabulary entry ("Ġthe") → its bytes (b" the").
BYTE_LEVEL_DECODER = {char: byte for byte, char in _byte_alphabet().items()}


def token_bytes(token: str | None, reported: Sequence[int] | None = None, byte_level: bool = False) -> bytes | None:
    """The bytes of an API token: its `bytes` field when given; else its text as UTF-8.

    Providers write a token that is part of a character as escapes ("\\xe2\\x80", OpenAI,
    DeepSeek) or as U+FFFD (vLLM). Escapes are decoded when the result is not UTF-8 text
    (a real partial character); U+FFFD gives None (the bytes are unknown). `byte_level`:
    the token is a byte-level BPE vocabulary entry ("Ġthe", what an in-process teacher
    stores), decoded through GPT-2's byte alphabet.
    """
    if reported is not None:
        return bytes(reported)
    if token is None:
        return None
    if byte_level and all(char in BYTE_LEVEL_DECODER for char in token):
        return bytes(BYTE_LEVEL_DECODER[char] for char in token)
    if "\\x" in token:
        raw = _ESCAPED_BYTE.sub(lambda m: _escaped(int(m.group(1), 16)), token)
        decoded = raw.encode("utf-8", errors="surrogateescape")
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            return decoded
    if "\ufffd" in token:
        return None
    return token.encode("utf-8")


def _escaped(byte: int) -> str:
    # a lone byte ≥ 0x80 as the surrogate that "surrogateescape" encodes back to it
    return chr(byte) if byte < 0x80 else chr(0xDC00 + byte)


def teacher_tokens_for_answer(entries: Sequence[dict] | None, answer: bytes) -> list[TeacherToken]:
    """`teacher_tokens_from_rows`, reading the token strings as text (an API) or, when that
    does not spell the answer and byte-level vocabulary entries do, as those (a local teacher)."""
    tokens = teacher_tokens_from_rows(entries)
    if tokens and not _spells(tokens, answer):
        pieces = teacher_tokens_from_rows(entries, byte_level=True)
        if _spells(pieces, answer):
            return pieces
    return tokens


def _spells(tokens: Sequence[TeacherToken], answer: bytes) -> bool:
    """The tokens' bytes and the answer agree up to the shorter (an answer cut at a stop string is shorter)."""
    if any(token.text is None for token in tokens):
        return False
    joined = b"".join(token.text for token in tokens)
    return joined.startswith(answer) or answer.startswith(joined)


def teacher_tokens_from_rows(entries: Sequence[dict] | None, byte_level: bool = False) -> list[TeacherToken]:
    """The stored `top_logprobs` of one row (token, logprob, top[token, logprob], optional
    bytes) → TeacherToken list. A missing or -9999 logprob is None (unknown). `byte_level`:
    the strings are byte-level vocabulary entries (`token_bytes`)."""
    tokens = []
    for entry in entries or []:
        logprob = _known(entry.get("logprob"))
        alternatives = []
        for alt in entry.get("top") or entry.get("top_logprobs") or []:
            alt_logprob = _known(alt.get("logprob"))
            if alt_logprob is not None:
                alternatives.append((token_bytes(alt.get("token"), alt.get("bytes"), byte_level), alt_logprob))
        text = token_bytes(entry.get("token"), entry.get("bytes"), byte_level)
        tokens.append(TeacherToken(text, logprob, tuple(alternatives)))
    return tokens


def _known(logprob) -> float | None:
    if logprob is None:
        return None
    value = float(logprob)
    return None if math.isnan(value) or value <= UNKNOWN_LOGPROB or value > 0.0 + 1e-6 else min(value, 0.0)


# --------------------------------------------------------------------------------------
# Spans
# --------------------------------------------------------------------------------------


def teacher_spans(tokens: Sequence[TeacherToken], answer: bytes) -> list[tuple[int, int, bool] | None]:
    """(start, end, opaque) byte span of each teacher token in `answer`, or None.

    Tokens are laid end to end from byte 0. A token whose bytes are unknown (opaque) takes
    the bytes up to where the next known token is found (a run of them shares that gap: the
    first takes it all, the others get None). A token whose text does not match is searched
    for up to RESYNC_WINDOW bytes ahead; the skipped bytes have no teacher token. Tokens past
    the end of the answer (it was cut at a stop string or truncated) get None.
    """
    spans: list[tuple[int, int, bool] | None] = [None] * len(tokens)
    cursor = 0
    pending: list[int] = []  # opaque tokens waiting for the next known one
    for index, token in enumerate(tokens):
        if cursor >= len(answer):
            break
        if token.text is None:
            pending.append(index)
            continue
        if not token.text:
            continue
        window = cursor + RESYNC_WINDOW + len(token.text)
        if not pending and answer.startswith(token.text, cursor):
            found = cursor
        else:
            found = answer.find(token.text, cursor, window)
            if found < 0:
                continue  # not here (or the opaque run is longer than the window): no span
        if pending:
            if found > cursor:
                spans[pending[0]] = (cursor, found, True)
            pending = []
        spans[index] = (found, found + len(token.text), False)
        cursor = found + len(token.text)
    if pending and cursor < len(answer):
        spans[pending[0]] = (cursor, len(answer), True)
    return spans


def char_to_byte_spans(text: str, offsets: Sequence[tuple[int, int]], piece_lengths: Sequence[int | None]) -> list[tuple[int, int]]:
    """Character offsets of the student's tokens → UTF-8 byte spans.

    A gap of whitespace before a token (offsets trimmed by the tokenizer) is given to it.
    Byte-fallback tokens (several tokens for one character, e.g. <0xE2><0x80><0x94>) share one
    character span; they get consecutive byte ranges when their own byte lengths
    (`piece_lengths`) add up to the character's, else the last takes the span and the
    others are empty (they then carry no teacher distribution).
    """
    byte_at = [0]
    for char in text:
        byte_at.append(byte_at[-1] + len(char.encode("utf-8")))
    # Tokens tile the text: a tokenizer that trims whitespace from its offsets (a ByteLevel
    # post-processor with trim_offsets) has the token start where the previous one ended.
    tiled, previous_end = [], 0
    for a, b in offsets:
        if a > previous_end and text[previous_end:a].isspace():
            a = previous_end
        tiled.append((a, b))
        previous_end = max(previous_end, b)
    spans = [(byte_at[min(a, len(text))], byte_at[min(b, len(text))]) for a, b in tiled]
    index = 0
    while index < len(spans):
        end = index
        while end + 1 < len(spans) and spans[end + 1] == spans[index] and spans[index][1] > spans[index][0]:
            end += 1
        if end > index:
            start, stop = spans[index]
            lengths = piece_lengths[index : end + 1]
            if all(n is not None for n in lengths) and sum(lengths) == stop - start:
                for offset, position in enumerate(range(index, end + 1)):
                    first = start + sum(lengths[:offset])
                    spans[position] = (first, first + lengths[offset])
            else:
                for position in range(index, end):
                    spans[position] = (start, start)
        index = end + 1
    return spans


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


FirstPiece = Callable[[bytes], tuple[int, bool] | None]  # text → (first student id, single piece?) or None


def align_answer(
    tokens: Sequence[TeacherToken],
    answer: bytes,
    student_ids: Sequence[int],
    student_spans: Sequence[tuple[int, int]],
    first_piece: FirstPiece,
) -> tuple[list[PositionTarget], Coverage]:
    """The teacher's distribution at each student answer position.

    tokens: the teacher's answer tokens; answer: the answer's UTF-8 bytes as stored;
    student_ids / student_spans: the student's answer tokens and their byte spans in
    `answer` (tokens past the answer, e.g. an end-of-turn token, have spans outside it or
    empty); first_piece: the student's first token of a text (bytes) and whether that text is
    one student token, None when no student token can name it.

    The student's tokens after the answer (its end-of-turn token) get no distribution, even
    where the teacher reported a token after its answer (an in-process teacher's eos): on the
    demo task, teaching the stop from it cost 13 points of accuracy (docs/training.md).
    """
    spans = teacher_spans(tokens, answer)
    located = [(span[0], index) for index, span in enumerate(spans) if span is not None]
    starts = [start for start, _ in located]
    coverage = Coverage()
    targets = []
    for student_id, (start, end) in zip(student_ids, student_spans):
        target = _position_target(tokens, spans, located, starts, answer, student_id, start, end, first_piece, coverage)
        coverage.positions[target.kind] += 1
        targets.append(target)
    return targets, coverage


def _position_target(tokens, spans, located, starts, answer, student_id, start, end, first_piece, coverage) -> PositionTarget:
    if start < 0 or end <= start or end > len(answer):
        return PositionTarget(NONE)
    at = bisect.bisect_right(starts, start) - 1
    if at < 0:
        return PositionTarget(NONE)
    j = located[at][1]
    u, v, opaque = spans[j]
    if not u <= start < v:
        return PositionTarget(NONE)
    token = tokens[j]
    if not token.has_distribution:
        return PositionTarget(NONE)
    if opaque:
        return _uld_target(token)
    prefix = answer[u:start]
    masses, consistent = _candidate_masses(token, prefix, student_id, _chain(tokens, spans, j, end), first_piece, coverage)
    if not masses or sum(masses.values()) <= 0.0:
        return _uld_target(token)
    # Conditioned on the prefix; else as reported (a provider's rounding may sum past 1: renormalised).
    norm = consistent if prefix else max(1.0, sum(masses.values()))
    return _sparse_target(masses, norm, EXACT if start == u and end == v else MERGED)


def _candidate_masses(token: TeacherToken, prefix: bytes, student_id: int, chain: float, first_piece, coverage):
    """Student id → probability mass from the candidates of one teacher position that start
    with `prefix`, and the total mass of those candidates (see the module docstring)."""
    candidates = list(token.alternatives)
    if token.logprob is not None and not any(text == token.text for text, _ in candidates):
        candidates.append((token.text, token.logprob))
    masses: dict[int, float] = {}
    consistent = direct = first = dropped = 0.0
    for text, logprob in candidates:
        p = math.exp(logprob)
        if text is None:
            dropped += p
            continue
        if not text.startswith(prefix):
            continue  # the student has already emitted text this candidate does not start with
        consistent += p
        if text == token.text:  # the actual token: x* with the chain of the tokens x* also covers
            masses[student_id] = masses.get(student_id, 0.0) + p * chain
            direct += p
            continue
        rest = text[len(prefix):]
        if not rest:
            continue  # ends where this position starts: its continuation is unknown (tail)
        piece = first_piece(rest)
        if piece is None:
            dropped += p
            continue
        piece_id, single = piece
        masses[piece_id] = masses.get(piece_id, 0.0) + p
        if single:
            direct += p
        else:
            first += p
    coverage.mass_direct += direct
    coverage.mass_first_piece += first
    coverage.mass_dropped += dropped
    return masses, consistent


def _sparse_target(masses: dict[int, float], norm: float, kind: int) -> PositionTarget:
    ids = sorted(masses, key=lambda i: -masses[i])
    logprobs = [math.log(min(1.0, masses[i] / norm)) if masses[i] > 0 else -math.inf for i in ids]
    return PositionTarget(kind, ids, logprobs)


def _chain(tokens, spans, j: int, end: int) -> float:
    """Product of the actual tokens' probabilities after j that start before `end` (unknown ones count as 1)."""
    product = 1.0
    for index in range(j + 1, len(tokens)):
        span = spans[index]
        if span is None:
            continue
        if span[0] >= end:
            break
        if tokens[index].logprob is not None:
            product *= math.exp(tokens[index].logprob)
    return product


def _uld_target(token: TeacherToken) -> PositionTarget:
    """The teacher's probabilities without their outcomes, best first (ULD compares them sorted)."""
    logprobs = sorted((logprob for _, logprob in token.alternatives), reverse=True)
    if not logprobs and token.logprob is not None:
        logprobs = [token.logprob]
    return PositionTarget(ULD, [], logprobs) if logprobs else PositionTarget(NONE)
