"""Prompt-set diversity: distinct-n over word n-grams and length distributions."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, pairwise
from typing import Any

import numpy as np

from distillflow.records import PromptRecord

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

# Upper edges of the character-length histogram bins (the last bin is open-ended).
LENGTH_BIN_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (a tokenizer-free approximation)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whole set (Li et al., 2016); 0.0 when none."""
    return distinct_orders([words(text) for text in texts], (n,))[n]


def distinct_orders(token_lists: Sequence[list[str]], orders: Sequence[int]) -> dict[int, float]:
    """distinct-n for each n in `orders`, over already tokenized texts.

    Tokens become integer ids and each n-gram one int64 code (id_1 * V^(n-1) + ... + id_n),
    so millions of n-grams are counted with `np.unique` instead of a set of tuples.
    """
    flat = list(chain.from_iterable(token_lists))
    vocab = {token: index for index, token in enumerate(dict.fromkeys(flat))}
    token_ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))  # (N,)
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))  # (T,)
    ends = np.cumsum(lengths)  # (T,) index one past each text's last token
    end_of_text = np.repeat(ends, lengths)  # (N,)
    base = max(len(vocab), 1)
    out = {}
    for n in orders:
        if base**n >= 2**63:  # codes would overflow int64: count tuples instead
            out[n] = _distinct_with_tuples(token_lists, n)
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


def _distinct_with_tuples(token_lists: Sequence[list[str]], n: int) -> float:
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = list(zip(*(tokens[i:] for i in range(n))))
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


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


def prompt_diversity_summary(
    records: Sequence[PromptRecord] | Sequence[str],
    token_lists: Sequence[list[str]] | None = None,
) -> dict[str, Any]:
    """Distinct-1/2/3, character and word length percentiles, and a length histogram.

    `token_lists`: `words()` of each prompt, when the caller already has them.
    """
    texts = [record if isinstance(record, str) else record.prompt for record in records]
    if token_lists is None:
        token_lists = [words(text) for text in texts]
    char_lengths = [len(text) for text in texts]
    word_lengths = [len(tokens) for tokens in token_lists]
    distinct = distinct_orders(token_lists, (1, 2, 3))
    return {
        "count": len(texts),
        "unique_prompts": len(set(texts)),
        "distinct_1": round(distinct[1], 6),
        "distinct_2": round(distinct[2], 6),
        "distinct_3": round(distinct[3], 6),
        "chars": {
            "mean": round(sum(char_lengths) / len(texts), 3) if texts else 0.0,
            **percentiles(char_lengths),
        },
        "words": {
            "mean": round(sum(word_lengths) / len(texts), 3) if texts else 0.0,
            **percentiles(word_lengths),
        },
        "char_length_histogram": length_histogram(char_lengths),
        "non_ascii_share": round(sum(not t.isascii() for t in texts) / len(texts), 6)
        if texts
        else 0.0,
    }


def per_strategy_counts(records: Iterable[PromptRecord]) -> dict[str, int]:
    """Rows per strategy, sorted by strategy name."""
    return dict(sorted(Counter(record.strategy for record in records).items()))
