"""Exact deduplication: 64-bit hashes of `distillflow.text.normalize_text`, first occurrence kept.

Every dedup stage answers the same question for each row: "which earlier row is this a
duplicate of?" as an int64 array `duplicate_of` (-1 = keep). The kept row of a cluster is
always the one that comes first in input order, so the answer depends only on the rows and
their order, never on how they were batched or how many workers computed the keys.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

from distillflow.text import normalize_text

KEEP = -1  # `duplicate_of` value of a row that is kept


def exact_keys(texts: Iterable[str]) -> np.ndarray:
    """64-bit xxh3 hash of each normalised text, shape (N,) uint64.

    Two rows are exact duplicates when their keys are equal (a collision among 10^6 rows
    has probability ~3e-8).
    """
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(normalize_text(text).encode("utf-8", "surrogatepass")) for text in texts),
        dtype=np.uint64,
    )


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """`duplicate_of` for equal keys: index of the first row with the same key, -1 for that row.

    keys: (N,) any sortable dtype. Returns (N,) int64.
    """
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.empty(0, dtype=np.int64)
    _, first_index, inverse = np.unique(keys, return_index=True, return_inverse=True)
    duplicate_of = first_index[inverse.reshape(-1)].astype(np.int64)
    duplicate_of[duplicate_of == np.arange(keys.size)] = KEEP
    return duplicate_of


def exact_duplicates(texts: Iterable[str]) -> np.ndarray:
    """`duplicate_of` (N,) int64 for rows whose normalised text equals an earlier row's."""
    return first_occurrence(exact_keys(texts))


def resolve_clusters(num_rows: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (left[i], right[i]) over `num_rows` nodes.

    Returns `duplicate_of` (N,) int64: every row of a component with two or more rows points
    at the component's smallest index (the first in input order); that row and singletons
    get -1. Vectorised (scipy's sparse connected components), so ~10^7 edges take seconds.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    duplicate_of = np.full(num_rows, KEEP, dtype=np.int64)
    if num_rows == 0 or len(left) == 0:
        return duplicate_of
    graph = coo_matrix(
        (np.ones(len(left), dtype=np.int8), (np.asarray(left), np.asarray(right))), shape=(num_rows, num_rows)
    ).tocsr()
    _, labels = connected_components(graph, directed=False)
    # smallest row index of each component
    first = np.full(labels.max() + 1, num_rows, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(num_rows))
    duplicate_of = first[labels]
    duplicate_of[duplicate_of == np.arange(num_rows)] = KEEP
    return duplicate_of


def duplicate_details(
    duplicate_of: np.ndarray, similarity: np.ndarray, threshold: float, measure: str, digits: int, linked_through: str
) -> dict[int, str]:
    """`detail` of each dropped row: its similarity to the kept row, and a note when it is
    below the threshold (the row joined the cluster through other members)."""
    details = {}
    for row in np.flatnonzero(duplicate_of != KEEP):
        value = float(similarity[row])
        note = "" if value >= threshold else f" (linked through other {linked_through})"
        details[int(row)] = f"{measure}~{value:.{digits}f} with kept row{note}"
    return details
