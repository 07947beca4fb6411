"""Diversity selection: keep k of N prompts that cover the embedding space.

`k_center_greedy` picks, one at a time, the row farthest (cosine distance) from everything
picked so far, which minimises the largest distance from any row to its nearest kept row
(a 2-approximation of the k-center optimum). `facility_location` greedily maximises
Σ_i max_{j∈S} sim(i, j), which favours dense regions as well as coverage.

Quotas (`diversity.quotas: {edge_case: 50}`) are filled first, each within its own
strategy group, so rare strategies are not crowded out; the remaining slots are then filled
from all rows. Ties break towards the earlier row and the first centre is the first row in
input order (or a row drawn with `seed`), so the choice never depends on batching.
Cost: O(k·N·D) for k-center (one matrix-vector product per pick); facility location keeps
an N×N similarity matrix and is limited to `FACILITY_LOCATION_MAX_ROWS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distillflow.tasks.filters.config import DiversityConfig

FACILITY_LOCATION_MAX_ROWS = 20_000


def strategy_matches(strategy: str, key: str) -> bool:
    """A quota key names a family (`edge_case` matches `edge_case:unicode`) or one strategy."""
    return strategy == key or strategy.startswith(key + ":")


def hashed_embeddings(texts: Sequence[str], dim: int = 512) -> np.ndarray:
    """A model-free embedding: signed feature hashing of word 1- and 2-grams, L2-normalised, (N, dim)."""
    from distillflow.tasks.filters.minhash import word_ngram_hashes

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for n in (1, 2):
        hashes, row = word_ngram_hashes(texts, n)
        column = (hashes % np.uint64(dim)).astype(np.int64)
        sign = np.where((hashes >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
        np.add.at(out, (row, column), sign)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def _first_centre(candidates: np.ndarray, seed: int) -> int:
    if seed == 0:
        return int(candidates[0])
    return int(np.random.default_rng(seed).choice(candidates))


def _greedy_select(
    num_rows: int,
    keep: int,
    groups: list[tuple[np.ndarray, int]] | None,
    choose: Callable[[np.ndarray, np.ndarray], int],
) -> np.ndarray:
    """Sorted indices of `keep` rows picked one at a time by `choose(candidates, selected)`
    (which also updates the caller's state): each group's quota first, picks restricted to
    its mask, then the rest from every row."""
    keep = min(keep, num_rows)
    selected = np.zeros(num_rows, dtype=bool)

    def fill(mask: np.ndarray, count: int) -> None:
        for _ in range(count):
            if selected.sum() >= keep:
                return
            candidates = np.flatnonzero(mask & ~selected)
            if candidates.size == 0:
                return
            selected[choose(candidates, selected)] = True

    for mask, quota in groups or []:
        fill(mask, min(quota, int(mask.sum())))
    fill(np.ones(num_rows, dtype=bool), keep - int(selected.sum()))
    return np.flatnonzero(selected)


def k_center_greedy(
    embeddings: np.ndarray, keep: int, groups: list[tuple[np.ndarray, int]] | None = None, seed: int = 0
) -> np.ndarray:
    """Indices (sorted) of `keep` rows chosen by farthest-point greedy.

    embeddings: (N, D) float32, L2-normalised. groups: (mask (N,) bool, quota) pairs filled
    first, each by picks restricted to its mask.
    """
    num_rows = embeddings.shape[0]
    distance = np.full(num_rows, np.inf, dtype=np.float32)  # to the nearest selected row

    def choose(candidates: np.ndarray, selected: np.ndarray) -> int:
        if not selected.any():
            row = _first_centre(candidates, seed)
        else:
            row = int(candidates[np.argmax(distance[candidates])])
        np.minimum(distance, 1.0 - embeddings @ embeddings[row], out=distance)
        distance[row] = -1.0
        return row

    return _greedy_select(num_rows, keep, groups, choose)


def facility_location_greedy(
    embeddings: np.ndarray, keep: int, groups: list[tuple[np.ndarray, int]] | None = None
) -> np.ndarray:
    """Indices (sorted) of `keep` rows greedily maximising Σ_i max_{j∈S} max(sim(i, j), 0)."""
    num_rows = embeddings.shape[0]
    if num_rows > FACILITY_LOCATION_MAX_ROWS:
        raise ValueError(
            f"diversity.method facility_location keeps an N×N matrix and handles at most "
            f"{FACILITY_LOCATION_MAX_ROWS} rows (got {num_rows}); use method: k_center"
        )
    similarity = np.maximum(embeddings @ embeddings.T, 0.0)  # (N, N)
    coverage = np.zeros(num_rows, dtype=np.float32)  # max similarity to the selected set

    def choose(candidates: np.ndarray, selected: np.ndarray) -> int:
        gains = np.maximum(similarity[:, candidates] - coverage[:, None], 0.0).sum(axis=0)
        row = int(candidates[np.argmax(gains)])
        np.maximum(coverage, similarity[:, row], out=coverage)
        return row

    return _greedy_select(num_rows, keep, groups, choose)


def select_diverse(embeddings: np.ndarray, strategies: Sequence[str], config: DiversityConfig) -> np.ndarray:
    """Sorted indices of the rows kept by diversity selection."""
    assert config.keep is not None
    strategy_array = np.asarray(strategies, dtype=object)
    groups = [
        (np.fromiter((strategy_matches(s, key) for s in strategy_array), dtype=bool, count=len(strategy_array)), quota)
        for key, quota in sorted(config.quotas.items())
    ]
    if config.method == "facility_location":
        return facility_location_greedy(embeddings, config.keep, groups)
    return k_center_greedy(embeddings, config.keep, groups, seed=config.seed)


def nearest_kept_distance(embeddings: np.ndarray, kept: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine distance of each of `rows` to its nearest kept row, (len(rows),) float32."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), 4096):
        block = embeddings[rows[start : start + 4096]] @ embeddings[kept].T
        out[start : start + 4096] = 1.0 - block.max(axis=1)
    return out
