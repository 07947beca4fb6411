"""Decontamination: drop prompts that overlap an evaluation set, so a student never trains on its test.

The eval texts are turned into a sorted array of hashed word n-grams (n = `ngram`, plus
every shorter k-gram for k ≥ 3 so that short prompts can match too). A prompt is
contaminated when at least `min_overlap` of its word n-grams (or, for a prompt shorter than
n words, its whole word sequence) occur in that array. Lookups are one `np.searchsorted`
per batch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from distillflow.tasks.filters.config import DecontaminationConfig
from distillflow.tasks.filters.minhash import word_ngram_hashes

TEXT_COLUMNS = ("prompt", "question", "text", "input", "instruction", "problem")


def _pick_column(columns: Sequence[str], wanted: str | None, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{path}: column {wanted!r} not found (columns: {list(columns)}); fix decontamination.text_column")
        return wanted
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{path}: no text column among {list(columns)}; name one with decontamination.text_column "
        f"(looked for {', '.join(TEXT_COLUMNS)})"
    )


def read_eval_texts(path: Path, text_column: str | None = None) -> list[str]:
    """Texts of one eval file: .jsonl/.json/.parquet/.csv (a text column) or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decontamination.eval_files: {path} does not exist; fix the path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".parquet":
        table = pq.read_table(path)
        return [str(v) for v in table.column(_pick_column(table.column_names, text_column, path)).to_pylist() if v]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        column = _pick_column(list(rows[0]) if rows else [], text_column, path)
        return [row[column] for row in rows if row.get(column)]
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            records = json.loads(text)
            records = records if isinstance(records, list) else [records]
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if records and isinstance(records[0], str):
            return [r for r in records if r]
        column = _pick_column(list(records[0]) if records else [], text_column, path)
        return [str(r[column]) for r in records if r.get(column)]
    raise ValueError(f"{path}: unsupported eval file type {suffix!r}; use .jsonl, .json, .parquet, .csv or .txt")


def eval_ngram_index(texts: Sequence[str], ngram: int) -> np.ndarray:
    """Sorted unique hashes of every word k-gram of the eval texts, 3 ≤ k ≤ ngram, (M,) uint64."""
    parts = [word_ngram_hashes(texts, k)[0] for k in range(min(3, ngram), ngram + 1)]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


@lru_cache(maxsize=4)
def _load_index(files: tuple[str, ...], ngram: int, text_column: str | None) -> np.ndarray:
    texts = [text for path in files for text in read_eval_texts(Path(path), text_column)]
    return eval_ngram_index(texts, ngram)


def load_eval_index(config: DecontaminationConfig) -> np.ndarray:
    return _load_index(tuple(str(p) for p in config.eval_files), config.ngram, config.text_column)


def overlap_fractions(texts: Sequence[str], index: np.ndarray, ngram: int) -> np.ndarray:
    """Fraction of each text's word n-grams found in `index`, (N,) float32."""
    hashes, row = word_ngram_hashes(texts, ngram)
    if index.size == 0 or hashes.size == 0:
        return np.zeros(len(texts), dtype=np.float32)
    position = np.minimum(np.searchsorted(index, hashes), index.size - 1)
    found = index[position] == hashes
    hits = np.bincount(row, weights=found, minlength=len(texts))
    total = np.bincount(row, minlength=len(texts))
    return (hits / np.maximum(total, 1)).astype(np.float32)


def contaminated(texts: Sequence[str], config: DecontaminationConfig) -> tuple[np.ndarray, np.ndarray]:
    """(contaminated (N,) bool, overlap fraction (N,) float32)."""
    fractions = overlap_fractions(texts, load_eval_index(config), config.ngram)
    return fractions >= config.min_overlap, fractions
