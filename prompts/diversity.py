"""Prompt-set diversity: distinct-n over word n-grams and length distributions."""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from distillflow.records import PromptRecord

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

# Upper edges of the character-length histogram bins (the last bin is open-ended).
LENGTH_BIN_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# distinct-n is counted over at most this many prompts (a fixed-seed sample beyond it).
DIVERSITY_SAMPLE = 20_000


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (a tokenizer-free approximation)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whole set (Li et al., 2016); 0.0 when none."""
    return distinct_orders([words(text) for text in texts], (n,))[n]


class TokenIds:
    """Texts (or token lists) as one flat array of integer token ids plus one length per
    text: about 8 bytes a token, where lists of word strings take about 70."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.ids = array("q")
        self.lengths = array("q")

    def add_tokens(self, tokens: Sequence[str]) -> None:
        vocab = self.vocab
        self.ids.extend(vocab.setdefault(token, len(vocab)) for token in tokens)
        self.lengths.append(len(tokens))

    def add(self, text: str) -> None:
        self.add_tokens(words(text))

    def distinct(self, orders: Sequence[int]) -> dict[int, float]:
        """distinct-n for each n in `orders`.

        Each n-gram becomes one int64 code (id_1 * V^(n-1) + ... + id_n), so millions of
        n-grams are counted with `np.unique` instead of a set of tuples.
        """
        token_ids = np.frombuffer(self.ids, dtype=np.int64) if self.ids else np.zeros(0, dtype=np.int64)  # (N,)
        lengths = np.frombuffer(self.lengths, dtype=np.int64) if self.lengths else np.zeros(0, dtype=np.int64)
        end_of_text = np.repeat(np.cumsum(lengths), lengths)  # (N,) index one past each token's text
        base = max(len(self.vocab), 1)
        out = {}
        for n in orders:
            if base**n >= 2**63:  # codes would overflow int64: count tuples instead
                out[n] = self._distinct_with_tuples(token_ids, lengths, n)
                continue
            valid = np.arange(len(token_ids)) + n <= end_of_text  # n-gram fits inside its text
            codes = np.zeros(len(token_ids), dtype=np.int64)
            for offset in range(n):
                shifted = np.zeros(len(token_ids), dtype=np.int64)
                shifted[: len(token_ids) - offset] = token_ids[offset:]
                codes = codes * base + shifted
            total = int(valid.sum())
            out[n] = np.unique(codes[valid]).size / total if total else 0.0
        return out

    @staticmethod
    def _distinct_with_tuples(token_ids: np.ndarray, lengths: np.ndarray, n: int) -> float:
        seen: set[tuple[int, ...]] = set()
        total = 0
        start = 0
        for length in lengths.tolist():
            tokens = token_ids[start : start + length].tolist()
            start += length
            grams = list(zip(*(tokens[i:] for i in range(n))))
            total += len(grams)
            seen.update(grams)
        return len(seen) / total if total else 0.0


def distinct_orders(token_lists: Iterable[Sequence[str]], orders: Sequence[int]) -> dict[int, float]:
    """distinct-n for each n in `orders`, over already tokenized texts."""
    encoded = TokenIds()
    for tokens in token_lists:
        encoded.add_tokens(tokens)
    return encoded.distinct(orders)


def percentiles(
    values: Sequence[float], points: Sequence[int] = (0, 10, 25, 50, 75, 90, 99, 100)
) -> dict[str, float]:
    """Nearest-rank percentiles (`p0` = min, `p100` = max); empty dict for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for point in points:
        rank = max(1, math.ceil(point / 100 * len(ordered)))
        out[f"p{point}"] = ordered[rank - 1]
    return out


def length_histogram(lengths: Iterable[int]) -> dict[str, int]:
    """Counts per bin of character length: `0`, `1-16`, `17-32`, ..., `16385+`."""
    labels = ["0"] + [f"{low + 1}-{high}" for low, high in pairwise(LENGTH_BIN_EDGES)]
    labels.append(f"{LENGTH_BIN_EDGES[-1] + 1}+")
    counts = dict.fromkeys(labels, 0)
    for length in lengths:
        if length == 0:
            counts["0"] += 1
            continue
        for low, high in pairwise(LENGTH_BIN_EDGES):
            if low < length <= high:
                counts[f"{low + 1}-{high}"] += 1
                break
        else:
            counts[labels[-1]] += 1
    return counts


def sample_rows(count: int, limit: int = DIVERSITY_SAMPLE) -> Sequence[int]:
    """Every row index when there are at most `limit`; else `limit` of them, drawn with a
    fixed seed (the same rows every run), in order."""
    if count <= limit:
        return range(count)
    return np.sort(np.random.default_rng(0).choice(count, size=limit, replace=False)).tolist()


def word_counts(texts: Iterable[str]) -> np.ndarray:
    """`len(words(text))` of each text, as one int64 array."""
    counts = array("q", (len(words(text)) for text in texts))
    return np.frombuffer(counts, dtype=np.int64) if counts else np.zeros(0, dtype=np.int64)


def distinct_of(texts: Sequence[str], orders: Sequence[int], limit: int = DIVERSITY_SAMPLE) -> dict[int, float]:
    """distinct-n over `sample_rows` of `texts` (all of them up to `limit`)."""
    encoded = TokenIds()
    for index in sample_rows(len(texts), limit):
        encoded.add(texts[index])
    return encoded.distinct(orders)


def prompt_diversity_summary(
    records: Sequence[PromptRecord] | Sequence[str],
    word_lengths: np.ndarray | None = None,
    limit: int = DIVERSITY_SAMPLE,
) -> dict[str, Any]:
    """Distinct-1/2/3, character and word length percentiles, and a length histogram.

    Lengths, uniqueness and the histogram cover every prompt; distinct-n covers up to
    `limit` of them (`sample_rows`), so memory and time stay flat however large the set
    is, and the figure compares across set sizes (distinct-n falls as a set grows).
    `word_lengths`: `word_counts()` of the prompts, when the caller already has them.
    """
    texts = [record if isinstance(record, str) else record.prompt for record in records]
    if word_lengths is None:
        word_lengths = word_counts(texts)
    char_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    distinct = distinct_of(texts, (1, 2, 3), limit)
    return {
        "count": len(texts),
        "unique_prompts": len(set(texts)),
        "distinct_sample": min(len(texts), limit),
        "distinct_1": round(distinct[1], 6),
        "distinct_2": round(distinct[2], 6),
        "distinct_3": round(distinct[3], 6),
        "chars": {
            "mean": round(float(char_lengths.mean()), 3) if texts else 0.0,
            **percentiles(char_lengths.tolist()),
        },
        "words": {
            "mean": round(float(word_lengths.mean()), 3) if texts else 0.0,
            **percentiles(word_lengths.tolist()),
        },
        "char_length_histogram": length_histogram(char_lengths.tolist()),
        "non_ascii_share": round(sum(not t.isascii() for t in texts) / len(texts), 6)
        if texts
        else 0.0,
    }


def per_strategy_counts(records: Iterable[PromptRecord]) -> dict[str, int]:
    """Rows per strategy, sorted by strategy name."""
    return dict(sorted(Counter(record.strategy for record in records).items()))
