"""Exact and near-duplicate detection: normalisation, MinHash accuracy, LSH banding, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest

from distillflow.tasks.filters.dedup import KEEP, exact_duplicates, first_occurrence, normalize_text, resolve_clusters
from distillflow.tasks.filters.config import FiltersConfig, NearDedupConfig
from distillflow.tasks.filters.minhash import (
    exact_jaccard,
    near_dedup_normalize,
    near_duplicates,
    optimal_bands,
    signatures,
    word_ngram_hashes,
)

WORDS = (
    "river stone garden market winter violin engine planet harbor candle forest mirror pocket "
    "ladder silver thunder orange bridge window puzzle rocket castle meadow lantern coffee "
    "science history kernel vector matrix compiler network theorem proof poem story recipe"
).split()


def random_prompt(rng: random.Random, words: int = 24) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


def test_normalize_text_nfkc_casefold_whitespace():
    assert normalize_text("  Ｈｅｌｌｏ\u00a0\tWORLD\n ") == "hello world"
    assert normalize_text("Straße") == normalize_text("STRASSE")


def test_exact_duplicates_point_at_first_occurrence():
    texts = ["Hello  World", "b", "hello world", "HELLO WORLD ", "c", "b"]
    assert exact_duplicates(texts).tolist() == [KEEP, KEEP, 0, 0, KEEP, 1]


def test_first_occurrence_and_clusters_keep_smallest_index():
    assert first_occurrence(np.array([5, 3, 5, 3, 7], dtype=np.uint64)).tolist() == [-1, -1, 0, 1, -1]
    # chain 4-2, 2-0, and a separate pair 3-1
    duplicate_of = resolve_clusters(5, np.array([4, 2, 3]), np.array([2, 0, 1]))
    assert duplicate_of.tolist() == [-1, -1, 0, 1, 0]


def test_near_dedup_normalisation_strips_punctuation_and_case():
    assert near_dedup_normalize("Hello,   “World”!! it's") == "hello world it s"


def test_minhash_estimates_jaccard_of_word_sets():
    """The fraction of equal signature values estimates the Jaccard similarity of the shingle sets."""
    config = NearDedupConfig(unit="word", ngram=1, num_perm=256)
    rng = random.Random(0)
    errors = []
    for _ in range(20):
        universe = [f"w{rng.randrange(10**9)}" for _ in range(200)]
        a = set(universe[:150])
        b = set(universe[50:200])  # |a ∩ b| = 100, |a ∪ b| = 200 -> J = 0.5
        sig = signatures([" ".join(sorted(a)), " ".join(sorted(b))], config)
        errors.append((sig[0] == sig[1]).mean() - 0.5)
    assert abs(np.mean(errors)) < 0.02  # unbiased
    assert np.std(errors) < 0.06  # ~ sqrt(J(1-J)/K) = 0.031


def test_word_unit_ignores_word_order_for_unigrams():
    config = NearDedupConfig(unit="word", ngram=1)
    sig = signatures(["alpha beta gamma delta", "delta gamma beta alpha"], config)
    assert (sig[0] == sig[1]).all()


def test_short_and_empty_texts_get_one_shingle():
    config = NearDedupConfig(unit="char", ngram=5)
    sig = signatures(["ab", "AB!", "", "  "], config)
    assert (sig[0] == sig[1]).all() and (sig[2] == sig[3]).all()
    hashes, rows = word_ngram_hashes(["one two", "one two three four"], 3)
    assert rows.tolist() == [0, 1, 1]


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold, num_perm in [(0.8, 128), (0.5, 64)]:
        assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def planted_corpus(seed: int = 0):
    """Distinct prompts plus planted edits, reorders and exact copies, with ground truth."""
    rng = random.Random(seed)
    originals = [random_prompt(rng) for _ in range(300)]
    texts, cluster = list(originals), list(range(len(originals)))
    for index in range(0, 300, 3):
        words = originals[index].split()
        edited = list(words)
        edited[rng.randrange(len(edited))] = "changed"  # one-word edit
        swapped = words[12:] + words[:12]  # clause reorder
        for variant in (" ".join(edited), " ".join(swapped), originals[index].upper() + " !"):
            texts.append(variant)
            cluster.append(index)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [cluster[i] for i in order]


def test_planted_near_duplicates_are_found_and_distinct_rows_survive():
    texts, cluster = planted_corpus()
    result = near_duplicates(texts, NearDedupConfig(threshold=0.7))
    kept = result.duplicate_of == KEEP
    # exactly one row per cluster survives, and each drop points inside its own cluster
    assert sorted(cluster[i] for i in np.flatnonzero(kept)) == list(range(300))
    for row in np.flatnonzero(~kept):
        assert cluster[result.duplicate_of[row]] == cluster[row]
        assert result.duplicate_of[row] < row  # the kept row is the first in input order


@pytest.mark.parametrize("batch_size", [1, 7, 64, 100_000])
def test_near_duplicates_identical_across_batch_sizes(batch_size):
    texts, _ = planted_corpus(seed=1)
    config = NearDedupConfig(threshold=0.7)
    reference = near_duplicates(texts, config, batch_size=len(texts))
    result = near_duplicates(texts, config, batch_size=batch_size)
    assert np.array_equal(result.duplicate_of, reference.duplicate_of)


def true_jaccard(a: str, b: str, unit: str, n: int) -> float:
    """The reference: n-grams of the normalised text (UTF-8 bytes, or words) as Python sets."""
    def shingles(text: str) -> set:
        norm = near_dedup_normalize(text)
        units = norm.encode("utf-8") if unit == "char" else norm.split(" ") if norm else []
        return {bytes(units[i : i + n]) if unit == "char" else tuple(units[i : i + n])
                for i in range(max(1, len(units) - n + 1))}
    first, second = shingles(a), shingles(b)
    return len(first & second) / len(first | second)


@pytest.mark.parametrize(("unit", "n"), [("char", 5), ("char", 3), ("word", 2), ("word", 3)])
def test_exact_jaccard_is_the_jaccard_of_the_shingle_sets(unit, n):
    rng = random.Random(n)
    base = [random_prompt(rng, rng.randint(1, 12)) for _ in range(40)]
    texts = base + [text.replace("0", "7", 1).upper() + " extra, words!" for text in base] + ["", "a", "Ünïcödé  text"]
    left = np.array([rng.randrange(len(texts)) for _ in range(400)])
    right = np.array([rng.randrange(len(texts)) for _ in range(400)])
    got = exact_jaccard(texts, left, right, NearDedupConfig(unit=unit, ngram=n))
    expected = [true_jaccard(texts[a], texts[b], unit, n) for a, b in zip(left, right)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_exact_verification_decides_by_the_true_similarity_where_the_estimate_errs():
    """A pair just below the threshold, and a MinHash seed whose estimate puts it above:
    `verify: estimate` drops the second prompt, `verify: exact` (the default) keeps both."""
    rng = random.Random(3)
    first = random_prompt(rng, 30)
    words = first.split()
    for position in range(0, 30, 6):  # a few words changed: true Jaccard a little under 0.8
        words[position] = "changed" + str(position)
    second = " ".join(words)
    similarity = true_jaccard(first, second, "char", 5)
    assert 0.6 < similarity < 0.8
    for seed in range(1, 2000):
        config = NearDedupConfig(threshold=similarity + 0.01, seed=seed, verify="estimate")
        estimated = near_duplicates([first, second], config)
        if estimated.duplicate_of[1] == 0:
            break
    else:
        pytest.fail("no MinHash seed put the pair above the threshold")
    assert estimated.similarity[1] >= config.threshold > similarity
    exact = near_duplicates([first, second], config.model_copy(update={"verify": "exact"}))
    assert exact.duplicate_of.tolist() == [KEEP, KEEP]
    assert NearDedupConfig().verify == "exact"


def test_filters_config_rejects_bad_values():
    with pytest.raises(ValueError):
        FiltersConfig(near_dedup={"threshold": 1.5})
    with pytest.raises(ValueError):
        FiltersConfig(near_dedup={"num_perm": 64, "bands": 65})
    with pytest.raises(ValueError):
        FiltersConfig(unknown_key=True)


# -- small batches: Python and numpy instead of the compiled kernels --------------------------


def _texts_for_equivalence() -> list[str]:
    import random

    rng = random.Random(7)
    words = ["alpha", "Beta", "gamma", "δέλτα", "naïve", "日本語", "x", "emoji🙂", "a-b", "C3PO"]
    texts = ["", "   ", "!!!", "a", "ab", "Hello,   World!!", "  trailing  ", "\tTabs\tand\nlines\n", "ｆｕｌｌｗｉｄｔｈ"]
    for _ in range(60):
        texts.append(rng.choice([" ", ", ", "  ", "... "]).join(rng.choice(words) for _ in range(rng.randint(1, 14))))
    return texts


@pytest.mark.parametrize("unit,ngram", [("char", 5), ("char", 1), ("word", 3), ("word", 1), ("word", 7)])
def test_small_batches_hash_exactly_as_the_compiled_kernels(monkeypatch, unit, ngram):
    """A small batch (a 10-prompt build) is hashed without numba; every value — signatures,
    band keys, exact Jaccard, word n-grams — must equal the kernels', or a resumed or
    re-filtered dataset would decide differently."""
    import numpy as np

    from distillflow.tasks.filters import minhash
    from distillflow.tasks.filters.config import NearDedupConfig

    texts = _texts_for_equivalence()
    config = NearDedupConfig(unit=unit, ngram=ngram, num_perm=64, bands=8)
    left, right = np.triu_indices(len(texts), k=1)

    def everything() -> tuple:
        signature = minhash.signatures(texts, config)
        keys = minhash.band_keys(signature, 8, 8)
        some_keys = minhash.band_keys(signature, 8, 8, index=np.array([3, 0, 11]))
        jaccard = minhash.exact_jaccard(texts, left, right, config)
        hashes, rows = minhash.word_ngram_hashes(texts, ngram)
        return signature, keys, some_keys, jaccard, hashes, rows

    assert len(minhash.pack_texts(texts)[0]) <= minhash.SMALL_INPUT_BYTES
    small = everything()
    monkeypatch.setattr(minhash, "SMALL_INPUT_BYTES", -1)  # every call through the kernels
    compiled = everything()
    for ours, theirs in zip(small, compiled):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    assert (small[3] > 0.5).sum() > 0  # the texts do have near-duplicates to agree on
