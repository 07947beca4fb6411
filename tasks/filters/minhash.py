"""Near-duplicate detection: MinHash signatures + LSH banding + verified, deterministic clusters.

Pipeline for N rows with K permutations (`num_perm`) split into B bands of R rows:

1. `pack_texts`: normalise (NFKC, case-fold, punctuation → space, whitespace collapse) and
   pack a batch into one UTF-8 byte buffer + offsets.
2. `signatures`: a compiled kernel (numba, tasks/filters/minhash_kernels.py; Python and numpy for
   a batch of at most `SMALL_INPUT_BYTES`) walks each row's shingles (character n-grams
   over UTF-8 bytes, or word n-grams), hashes each shingle once to 64 bits, and keeps for
   each of the K hash functions h_k(x) = (a_k·x + b_k) >> 32 (multiply-shift, a_k odd)
   the minimum → (N, K) uint32. One call per batch, no Python per shingle.
3. `band_keys`: each band's R values are hashed to one uint64 → (B, N).
4. `candidate_pairs`: per band, rows with equal keys are candidates (found by sorting, not
   by Python dicts); each bucket links every member to its first member and to its
   predecessor. The banding favours recall (see `banding`), since step 5 restores precision.
5. Verification: a candidate pair is kept when its Jaccard similarity is ≥ the threshold,
   which removes LSH false positives. `verify: exact` (the default, when the texts are at
   hand) computes the true Jaccard of the two rows' shingle sets, for candidate rows only;
   `verify: estimate` uses the fraction of equal signature values (±0.035 at J = 0.8 with
   128 permutations, so pairs near the threshold fall on either side by chance).
6. `resolve_clusters`: connected components of the verified pairs; every row of a
   component is a duplicate of the component's first row in input order.

Signatures depend only on a row's text, and steps 3-6 run once over all signatures, so
the result is the same for every batch size and worker count. Memory: 4·K bytes per row
(512 MB for 10^6 rows at K=128), plus 8·B bytes per row for band keys (128 MB at B=16).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from distillflow.tasks.filters.dedup import KEEP, duplicate_details, resolve_clusters
from distillflow.tasks.filters.config import NearDedupConfig
from distillflow.tasks.filters.minhash_constants import (
    _FNV_OFFSET,
    _FNV_PRIME,
    _M1,
    _M2,
    _S27,
    _S30,
    _S31,
    _S32,
    _WORD_COMBINE,
)

_UNICODE_PUNCTUATION_TO_SPACE = str.maketrans({ch: " " for ch in "¡¿«»‹›“”„‘’‚…–—―·•、。，．：；！？「」『』（）【】"})


def fold_case(text: str) -> str:
    """NFKC (skipped for ASCII, where it is the identity), case-fold, and common non-ASCII
    punctuation (curly quotes, dashes, CJK punctuation) → space."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).casefold().translate(_UNICODE_PUNCTUATION_TO_SPACE)


def near_dedup_normalize(text: str) -> str:
    """The text the shingles are taken from: NFKC, case-fold, every run of ASCII
    punctuation/whitespace/control characters → one space, stripped (the kernel does the
    last step on bytes; this is the same rule in Python, for tests and debugging)."""
    folded = fold_case(text)
    return " ".join("".join(ch if not ch.isascii() or ch.isalnum() else " " for ch in folded).split())


def pack_texts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Case-folded texts packed into (data (L,) uint8, offsets (N+1,) int64) of UTF-8 bytes."""
    # Plain bytes rather than `pa.array`: pyarrow imports pandas (~0.6 s) on first use.
    encoded = [fold_case(text).encode("utf-8", "surrogatepass") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, offsets


# byte → itself, or 0 for a separator (ASCII punctuation, whitespace, control); bytes ≥ 128
# (parts of non-ASCII characters) are kept
_BYTE_CLASS = np.array(
    [b if (b >= 128 or chr(b).isalnum()) else 0 for b in range(256)], dtype=np.uint8
)


_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers a (odd) and offsets b of the K hash functions h_k(x) = a_k·x + b_k mod 2^32,
    each (K,) uint32 (a bijection on 32-bit values, as datasketch's `affine32` scheme)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


# Inputs up to this many UTF-8 bytes are hashed in Python and numpy; larger ones by the
# compiled kernels (tasks/filters/minhash_kernels.py), whose first use costs 0.5-0.8 s (numba's
# import and the load of the cached machine code). Both give the same values.
SMALL_INPUT_BYTES = 32_768


def _kernels() -> Any:
    from distillflow.tasks.filters import minhash_kernels

    return minhash_kernels


def _small(data: np.ndarray) -> bool:
    return len(data) <= SMALL_INPUT_BYTES


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """The kernels' splitmix64 finaliser over a uint64 array (numpy wraps as they do)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _py_row_shingles(row: np.ndarray, word_unit: bool, n: int) -> list[int]:
    """`minhash_kernels._row_shingles` in Python: the 64-bit hash of every shingle of one row
    (bytes of `pack_texts`), the word hashes already mixed as the kernel mixes them."""
    clean: list[int] = []
    for c in _BYTE_CLASS[row].tolist():
        if c != 0:
            clean.append(c)
        elif clean and clean[-1] != 32:
            clean.append(32)
    if clean and clean[-1] == 32:
        clean.pop()
    offset, prime = int(_FNV_OFFSET), int(_FNV_PRIME)
    if not word_unit:
        hashes = []
        for i in range(max(1, len(clean) - n + 1)):
            h = offset
            for c in clean[i : i + n]:
                h = ((h ^ c) * prime) & _MASK64
            hashes.append(h)
        return hashes
    words: list[int] = []
    h = offset
    for j in range(len(clean) + 1):
        if j == len(clean) or clean[j] == 32:
            if j > 0:
                words.append(h)
            h = offset
        else:
            h = ((h ^ clean[j]) * prime) & _MASK64
    mixed = _mix64_array(np.array(words, dtype=np.uint64)).tolist() if words else []
    combine = int(_WORD_COMBINE)

    def window(first: int, last: int) -> int:
        shingle = 0
        for word in mixed[first:last]:
            shingle = ((shingle ^ word) * combine) & _MASK64
        return shingle

    if len(mixed) < n:
        return [window(0, len(mixed))]
    return [window(end - n, end) for end in range(n, len(mixed) + 1)]


def _py_shingles(data: np.ndarray, offsets: np.ndarray, word_unit: bool, n: int) -> list[list[int]]:
    return [_py_row_shingles(data[offsets[r] : offsets[r + 1]], word_unit, n) for r in range(len(offsets) - 1)]


class ShingleSets:
    """The shingle sets (the shingles the signatures hash) of a list of texts, for exact
    Jaccard similarities between them."""

    def __init__(self, texts: Sequence[str], config: NearDedupConfig) -> None:
        data, offsets = pack_texts(texts)
        self.sets: list[set[int]] | None = None
        if _small(data):
            self.sets = [set(row) for row in _py_shingles(data, offsets, config.unit == "word", config.ngram)]
        else:
            self.flat, self.first = _kernels()._shingle_sets_kernel(
                data, offsets, _BYTE_CLASS, config.unit == "word", config.ngram
            )

    def jaccard(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The true Jaccard similarity of rows left[p] and right[p], (E,) float32."""
        out = np.empty(len(left), dtype=np.float32)
        if self.sets is not None:
            for p, (i, j) in enumerate(zip(np.asarray(left).tolist(), np.asarray(right).tolist())):
                a, b = self.sets[i], self.sets[j]
                shared = len(a & b)
                size = len(a) + len(b)
                out[p] = shared / (size - shared) if size > shared else 1.0
            return out
        _kernels()._pair_jaccard_kernel(
            self.flat, self.first, np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64), out
        )
        return out


def exact_jaccard(
    texts: Sequence[str], left: np.ndarray, right: np.ndarray, config: NearDedupConfig
) -> np.ndarray:
    """The true Jaccard similarity of the shingle sets of texts[left[p]] and
    texts[right[p]], (E,) float32."""
    if not len(left):
        return np.empty(0, dtype=np.float32)
    return ShingleSets(texts, config).jaccard(left, right)


def signatures(texts: Sequence[str], config: NearDedupConfig) -> np.ndarray:
    """MinHash signatures of a batch of texts, (N, num_perm) uint32."""
    data, offsets = pack_texts(texts)
    a, b = permutations(config.num_perm, config.seed)
    out = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    if not _small(data):
        _kernels()._signatures_kernel(data, offsets, _BYTE_CLASS, config.unit == "word", config.ngram, a, b, out)
        return out
    for row, shingles in enumerate(_py_shingles(data, offsets, config.unit == "word", config.ngram)):
        x = (_mix64_array(np.array(shingles, dtype=np.uint64)) >> _S32).astype(np.uint32)
        out[row] = (a[None, :] * x[:, None] + b[None, :]).min(axis=0)  # uint32 arithmetic wraps as the kernel's
    return out


def word_ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes (M,) uint64, row (M,) int64) of the word n-grams of each text, normalised as for
    MinHash; a text with fewer than n words gives one hash of its whole word sequence."""
    data, offsets = pack_texts(texts)
    if _small(data):
        rows = _py_shingles(data, offsets, True, n)
        flat = np.array([h for row in rows for h in row], dtype=np.uint64)
        return _mix64_array(flat), np.repeat(np.arange(len(rows), dtype=np.int64), [len(row) for row in rows])
    capacity = len(data) + len(texts)
    hashes = np.empty(capacity, dtype=np.uint64)
    row_of = np.empty(capacity, dtype=np.int64)
    count = _kernels()._word_ngram_kernel(data, offsets, _BYTE_CLASS, n, hashes, row_of)
    return hashes[:count].copy(), row_of[:count].copy()


# ---------------------------------------------------------------------------- LSH banding


def _collision_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """P(two rows with Jaccard s share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands·rows ≤ num_perm minimising the weighted false-positive mass
    ∫₀ᵗ P(s) ds plus false-negative mass ∫ₜ¹ (1 - P(s)) ds (the rule datasketch uses)."""
    grid = np.linspace(0.0, 1.0, 2001)
    best, best_error = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            probability = _collision_probability(grid, bands, rows)
            below = grid <= threshold
            false_positive = np.trapezoid(probability[below], grid[below])
            false_negative = np.trapezoid(1.0 - probability[~below], grid[~below])
            error = fp_weight * false_positive + fn_weight * false_negative
            if error < best_error - 1e-12:
                best, best_error = (bands, rows), error
    return best


# Every candidate pair is verified against the threshold, so a false positive of the
# banding costs one comparison while a false negative is a missed duplicate: the banding
# is chosen with the false-negative mass weighted 0.95 (datasketch weighs both 0.5). At
# threshold 0.8 and 128 permutations this gives 16 bands of 8 rows: pairs at Jaccard 0.8
# become candidates with probability 0.95 (0.40 with 9 bands of 13).
FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT = 0.05, 0.95


def banding(config: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows per band) for a config: its `bands` if set, else the recall-weighted optimum."""
    if config.bands is not None:
        return config.bands, config.num_perm // config.bands
    return _cached_optimal_bands(config.threshold, config.num_perm)


@lru_cache(maxsize=64)
def _cached_optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    return optimal_bands(threshold, num_perm, FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT)


def band_keys(signature: np.ndarray, bands: int, rows: int, index: np.ndarray | None = None) -> np.ndarray:
    """One uint64 key per (band, row): (N, K) uint32 → (bands, N) uint64, or (bands, len(index))
    for the rows `index` only (no copy of the signatures)."""
    index = np.arange(signature.shape[0], dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if len(index) * signature.shape[1] * 4 > SMALL_INPUT_BYTES:
        out = np.empty((bands, len(index)), dtype=np.uint64)
        _kernels()._band_keys_kernel(np.ascontiguousarray(signature), index, bands, rows, out)
        return out
    out = np.empty((bands, len(index)), dtype=np.uint64)
    chosen = signature[index].astype(np.uint64)
    for band in range(bands):
        key = np.full(len(index), _FNV_OFFSET ^ np.uint64(band), dtype=np.uint64)
        for column in range(band * rows, (band + 1) * rows):
            key = (key ^ chosen[:, column]) * _FNV_PRIME
        out[band] = _mix64_array(key)
    return out


SMALL_BUCKET = 8
EXACT_PAIRS_PER_CHUNK = 4096  # candidate pairs verified exactly at a time (bounds their texts in memory)


def candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (left < right) from equal band keys, (E,) int64 each, without repeats.

    keys: (bands, N) uint64. Within each bucket (rows sharing a key in one band), ordered
    by row, every member of a bucket of up to `SMALL_BUCKET` rows is paired with every
    earlier member (as a query against an LSH index would be); in a larger bucket, with
    the bucket's first row and its predecessor only (2 pairs per member instead of all
    pairs, enough to connect the bucket). Only rows in buckets of two or more are
    re-sorted by (key, row), so the cost is one unstable sort of N keys per band.
    """
    num_rows = keys.shape[1]
    lefts, rights = [], []
    for band in range(keys.shape[0]):
        band_key = keys[band]
        order = np.argsort(band_key)
        sorted_keys = band_key[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        in_bucket = np.zeros(num_rows, dtype=bool)
        in_bucket[1:] |= same
        in_bucket[:-1] |= same
        members = order[in_bucket]
        member_keys = band_key[members]
        resorted = np.lexsort((members, member_keys))  # by key, then by row
        members, member_keys = members[resorted], member_keys[resorted]
        same_as_previous = np.zeros(len(members), dtype=bool)
        same_as_previous[1:] = member_keys[1:] == member_keys[:-1]
        positions = np.flatnonzero(same_as_previous)
        member_index = np.arange(len(members))
        bucket_start = np.where(same_as_previous, 0, member_index)
        np.maximum.accumulate(bucket_start, out=bucket_start)
        sizes = np.diff(np.append(np.flatnonzero(~same_as_previous), len(members)))
        small = np.repeat(sizes, sizes) <= SMALL_BUCKET
        for back in range(1, SMALL_BUCKET):  # small buckets: every earlier member
            later = np.flatnonzero(small & (member_index - back >= bucket_start))
            lefts.append(members[later - back])
            rights.append(members[later])
        large = positions[~small[positions]]  # large buckets: the first and the predecessor
        lefts += [members[bucket_start[large]], members[large - 1]]
        rights += [members[large], members[large]]
    if not lefts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    left, right = np.concatenate(lefts).astype(np.int64), np.concatenate(rights).astype(np.int64)
    pair = np.sort(np.minimum(left, right) * num_rows + np.maximum(left, right))
    pair = pair[np.concatenate(([True], pair[1:] != pair[:-1]))]  # sorted unique
    return pair // num_rows, pair % num_rows


def estimated_jaccard(signature: np.ndarray, left: np.ndarray, right: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Fraction of equal MinHash values per pair, (E,) float32."""
    out = np.empty(len(left), dtype=np.float32)
    for start in range(0, len(left), chunk):
        stop = start + chunk
        out[start:stop] = (signature[left[start:stop]] == signature[right[start:stop]]).mean(axis=1)
    return out


@dataclass(slots=True)
class NearDuplicates:
    """duplicate_of: (N,) int64, index of the kept row (-1 = keep); similarity: (N,) float32,
    Jaccard similarity (exact or estimated, per `verify`) of each dropped row with its kept row
    (NaN for kept rows)."""

    duplicate_of: np.ndarray
    similarity: np.ndarray
    candidate_pairs: int
    verified_pairs: int


def near_duplicates_from_signatures(
    signature: np.ndarray,
    config: NearDedupConfig,
    index: np.ndarray | None = None,
    keys: np.ndarray | None = None,
    texts_of: Callable[[np.ndarray], list[str]] | None = None,
) -> NearDuplicates:
    """Steps 3-6 above over the signatures (N, K) uint32 of a dataset, in input order.

    index: optional increasing row indices to dedup among (e.g. the rows earlier stages
    kept), read in place; the result is then indexed like `index`. keys: the band keys
    (bands, len(index)) of those rows when already computed (`band_keys`); then only the
    candidate pairs' rows of `signature` are read, so it may be a `np.memmap` on disk.
    texts_of: row indices (of `signature`) → their texts; with it and `verify: exact`,
    candidates are verified by their true Jaccard similarity (only candidate rows are read).
    """
    index = np.arange(signature.shape[0], dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    bands, rows = banding(config)
    left, right = candidate_pairs(band_keys(signature, bands, rows, index) if keys is None else keys)
    if texts_of is not None and config.verify == "exact":

        def similarity_of(first: np.ndarray, second: np.ndarray) -> np.ndarray:
            """True Jaccard of positions first[p], second[p] in `index`, a few thousand pairs
            at a time (ordered by the first row), so only their rows' texts and shingle sets
            are in memory at once."""
            out = np.empty(len(first), dtype=np.float32)
            order = np.argsort(first, kind="stable")
            for start in range(0, len(order), EXACT_PAIRS_PER_CHUNK):
                part = order[start : start + EXACT_PAIRS_PER_CHUNK]
                a, b = first[part], second[part]
                involved = np.unique(np.concatenate([a, b]))
                sets = ShingleSets(texts_of(index[involved]), config)
                out[part] = sets.jaccard(np.searchsorted(involved, a), np.searchsorted(involved, b))
            return out
    else:

        def similarity_of(first: np.ndarray, second: np.ndarray) -> np.ndarray:
            return estimated_jaccard(signature, index[first], index[second])

    similarity = similarity_of(left, right)
    verified = similarity >= config.threshold
    duplicate_of = resolve_clusters(len(index), left[verified], right[verified])
    dropped = np.flatnonzero(duplicate_of != KEEP)
    to_kept = np.full(len(index), np.nan, dtype=np.float32)
    to_kept[dropped] = similarity_of(dropped, duplicate_of[dropped])
    return NearDuplicates(duplicate_of, to_kept, int(len(left)), int(verified.sum()))


def near_duplicates(texts: Sequence[str], config: NearDedupConfig, batch_size: int = 65_536) -> NearDuplicates:
    """Near-duplicates among `texts` (signatures computed batch by batch)."""
    if len(texts) == 0:
        return NearDuplicates(np.empty(0, np.int64), np.empty(0, np.float32), 0, 0)
    signature = np.concatenate(
        [signatures(texts[start : start + batch_size], config) for start in range(0, len(texts), batch_size)]
    )
    return near_duplicates_from_signatures(signature, config, texts_of=lambda rows: [texts[i] for i in rows.tolist()])


def near_duplicate_details(result: NearDuplicates, threshold: float) -> dict[int, str]:
    return duplicate_details(result.duplicate_of, result.similarity, threshold, "jaccard", 2, "near-duplicates")
