"""The compiled (numba) kernels of tasks/filters/minhash.py, imported on the first batch large
enough to need them: numba's import and the load of the cached kernels take 0.5-0.8 s,
which a batch of a few thousand bytes does not repay (tasks/filters/minhash.py answers those in
Python and numpy, with the same results)."""

from __future__ import annotations

import numba
import numpy as np

from distillflow.tasks.filters.minhash_constants import (
    _FNV_OFFSET,
    _FNV_PRIME,
    _M1,
    _M2,
    _MAX32,
    _S27,
    _S30,
    _S31,
    _S32,
    _WORD_COMBINE,
)


@numba.njit(cache=True, inline="always")
def _mix64(z):  # splitmix64 finaliser: a bijection on uint64 with full avalanche
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(cache=True, inline="always")
def _window_hash(window, first, last, n):
    """One hash of words first..last-1, kept in the ring buffer `window` of n word hashes."""
    shingle = np.uint64(0)
    for t in range(first, last):
        shingle = (shingle ^ window[t % n]) * _WORD_COMBINE
    return shingle


@numba.njit(cache=True, inline="always")
def _update(signature, shingle, a, b):
    x = np.uint32(_mix64(shingle) >> _S32)
    for k in range(a.shape[0]):  # vectorised by LLVM: 8 uint32 lanes per instruction
        signature[k] = min(signature[k], np.uint32(a[k] * x + b[k]))


@numba.njit(cache=True, nogil=True)
def _row_shingles(data, start, end, byte_class, word_unit, n, clean, window, out):
    """The 64-bit hash of every shingle of the row data[start:end] into out[:count];
    returns count. `clean` (≥ end - start bytes) and `window` (n) are scratch buffers;
    `out` needs room for end - start + 1 hashes.

    The row is normalised first: separators → one space, runs collapsed, both ends stripped.
    Shingles are character (UTF-8 byte) n-grams, or word n-grams; a row shorter than n is
    one shingle."""
    length = 0
    for j in range(start, end):
        c = byte_class[data[j]]
        if c != 0:
            clean[length] = c
            length += 1
        elif length > 0 and clean[length - 1] != 32:
            clean[length] = 32
            length += 1
    if length > 0 and clean[length - 1] == 32:
        length -= 1
    count = 0
    if not word_unit:
        for i in range(max(1, length - n + 1)):
            h = _FNV_OFFSET
            for j in range(i, min(i + n, length)):
                h = (h ^ np.uint64(clean[j])) * _FNV_PRIME
            out[count] = h
            count += 1
        return count
    words = 0
    h = _FNV_OFFSET
    for j in range(length + 1):
        if j == length or clean[j] == 32:
            if j > 0:
                window[words % n] = _mix64(h)
                words += 1
                if words >= n:
                    out[count] = _window_hash(window, words - n, words, n)
                    count += 1
            h = _FNV_OFFSET
        else:
            h = (h ^ np.uint64(clean[j])) * _FNV_PRIME
    if words < n:
        out[count] = _window_hash(window, 0, words, n)
        count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _signatures_kernel(data, offsets, byte_class, word_unit, n, a, b, out):
    """out[row] = MinHash of row `row`'s shingles.

    data (L,) uint8 case-folded UTF-8, offsets (N+1,) int64, byte_class (256,) uint8,
    a, b (K,) uint32, out (N, K) uint32.
    """
    window = np.zeros(n, dtype=np.uint64)  # ring buffer of the last n word hashes
    clean = np.empty(0, dtype=np.uint8)
    shingles = np.empty(1, dtype=np.uint64)
    for row in range(offsets.shape[0] - 1):
        start, end = offsets[row], offsets[row + 1]
        if clean.shape[0] < end - start:
            clean = np.empty(2 * (end - start), dtype=np.uint8)
        if shingles.shape[0] < end - start + 1:
            shingles = np.empty(2 * (end - start) + 1, dtype=np.uint64)
        count = _row_shingles(data, start, end, byte_class, word_unit, n, clean, window, shingles)
        signature = out[row]
        signature[:] = _MAX32
        for i in range(count):
            _update(signature, shingles[i], a, b)


@numba.njit(cache=True, nogil=True)
def _shingle_sets_kernel(data, offsets, byte_class, word_unit, n):
    """Each row's sorted, distinct shingle hashes: (flat, first), row r's set being
    flat[first[r]:first[r + 1]]."""
    rows = offsets.shape[0] - 1
    total = 0
    for row in range(rows):
        total += offsets[row + 1] - offsets[row] + 1
    flat = np.empty(total, dtype=np.uint64)
    first = np.zeros(rows + 1, dtype=np.int64)
    window = np.zeros(n, dtype=np.uint64)
    clean = np.empty(0, dtype=np.uint8)
    position = 0
    for row in range(rows):
        start, end = offsets[row], offsets[row + 1]
        if clean.shape[0] < end - start:
            clean = np.empty(2 * (end - start), dtype=np.uint8)
        count = _row_shingles(data, start, end, byte_class, word_unit, n, clean, window, flat[position:])
        ordered = np.sort(flat[position : position + count])
        distinct = 0
        for i in range(count):
            if i == 0 or ordered[i] != ordered[i - 1]:
                flat[position + distinct] = ordered[i]
                distinct += 1
        first[row] = position
        position += distinct
        first[row + 1] = position
    return flat[:position], first


@numba.njit(cache=True, nogil=True)
def _pair_jaccard_kernel(flat, first, left, right, out):
    """out[p] = |A ∩ B| / |A ∪ B| of the sets of rows left[p] and right[p] (a merge of two
    sorted runs)."""
    for p in range(left.shape[0]):
        i, i_end = first[left[p]], first[left[p] + 1]
        j, j_end = first[right[p]], first[right[p] + 1]
        size = (i_end - i) + (j_end - j)
        shared = 0
        while i < i_end and j < j_end:
            if flat[i] == flat[j]:
                shared += 1
                i += 1
                j += 1
            elif flat[i] < flat[j]:
                i += 1
            else:
                j += 1
        out[p] = shared / (size - shared) if size > shared else 1.0


@numba.njit(cache=True, nogil=True)
def _word_ngram_kernel(data, offsets, byte_class, n, hashes, row_of):
    """Hash of every word n-gram of every row (rows with fewer than n words: one hash of all
    their words): `_row_shingles`' word shingles, mixed as `_update` mixes them before the
    permutations. Returns how many were written."""
    window = np.zeros(n, dtype=np.uint64)
    clean = np.empty(0, dtype=np.uint8)
    count = 0
    for row in range(offsets.shape[0] - 1):
        start, end = offsets[row], offsets[row + 1]
        if clean.shape[0] < end - start:
            clean = np.empty(2 * (end - start), dtype=np.uint8)
        written = _row_shingles(data, start, end, byte_class, True, n, clean, window, hashes[count:])
        for i in range(count, count + written):
            hashes[i] = _mix64(hashes[i])
            row_of[i] = row
        count += written
    return count


@numba.njit(cache=True, nogil=True)
def _band_keys_kernel(signature, index, bands, rows, out):
    for i in range(index.shape[0]):
        row = index[i]
        for band in range(bands):
            key = _FNV_OFFSET ^ np.uint64(band)
            for column in range(band * rows, (band + 1) * rows):
                key = (key ^ np.uint64(signature[row, column])) * _FNV_PRIME
            out[band, i] = _mix64(key)
