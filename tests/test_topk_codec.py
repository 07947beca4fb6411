"""The teacher_topk codec: round trip, size budget, error bound, sorting, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from distillflow.storage.topk import (
    HEADER,
    MAX_DELTA_NATS,
    MAX_LOGPROB_ERROR,
    MAX_PROB_ERROR,
    logprob_error_bound,
    bytes_per_position,
    decode_topk,
    encode_topk,
    topk_shape,
)


def random_topk(num_positions: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of random softmax distributions over `vocab`, sorted descending: (T, k) each."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=(num_positions, vocab))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    return ids, np.take_along_axis(logprobs, ids, axis=1)


@pytest.mark.parametrize("vocab,id_width", [(512, 2), (65_536, 2), (152_064, 3), (20_000_000, 4)])
def test_round_trip_is_exact_on_ids_and_top1_and_bounded_elsewhere(vocab, id_width):
    rng = np.random.default_rng(1)
    num_positions, k = 37, 20
    ids = rng.choice(vocab, size=(num_positions, k)) if vocab > 1_000_000 else random_topk(
        num_positions, k, vocab
    )[0]
    ids[0, 0] = vocab - 1  # the largest id sets the id width
    logprobs = np.sort(-rng.exponential(3.0, size=(num_positions, k)), axis=1)[:, ::-1]

    blob = encode_topk(ids, logprobs)
    decoded_ids, decoded_logprobs = decode_topk(blob)

    assert decoded_ids.dtype == np.int64 and decoded_logprobs.dtype == np.float32
    assert len(blob) == HEADER.size + num_positions * bytes_per_position(k, id_width)
    np.testing.assert_array_equal(decoded_ids, ids)
    np.testing.assert_allclose(decoded_logprobs[:, 0], logprobs[:, 0], rtol=1e-7)
    assert np.abs(decoded_logprobs - logprobs).max() <= MAX_LOGPROB_ERROR + 1e-5
    assert topk_shape(blob) == (num_positions, k)


def test_k20_fits_the_120_byte_budget_for_any_vocabulary():
    for vocab in (32_000, 128_256, 262_144):
        ids, logprobs = random_topk(256, 20, 2048, seed=vocab)
        ids = ids * (vocab // 2048)
        blob = encode_topk(ids, logprobs)
        assert len(blob) / 256 <= 120


def test_rows_come_back_sorted_descending_even_when_given_unsorted():
    ids = np.array([[5, 9, 2], [1, 3, 4]])
    logprobs = np.array([[-3.0, -0.5, -1.0], [-0.1, -2.5, -2.4]])
    decoded_ids, decoded_logprobs = decode_topk(encode_topk(ids, logprobs))
    np.testing.assert_array_equal(decoded_ids, [[9, 2, 5], [1, 4, 3]])
    assert (np.diff(decoded_logprobs, axis=1) <= 0).all()


@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])  # flat → very peaked teachers
def test_probability_and_kl_error_stay_below_the_documented_bound(scale):
    rng = np.random.default_rng(3)
    logits = rng.gumbel(size=(400, 4096)) * scale
    full = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-full, axis=1)[:, :20]
    logprobs = np.take_along_axis(full, ids, axis=1)
    _, decoded = decode_topk(encode_topk(ids, logprobs))
    decoded = decoded.astype(np.float64)

    gaps = logprobs[:, :1] - logprobs
    inside = gaps < MAX_DELTA_NATS
    bound = logprob_error_bound(gaps) + 1e-6  # + float32 rounding of the decoded values
    assert (np.abs(decoded - logprobs)[inside] <= bound[inside]).all()
    assert np.abs(decoded - logprobs).max() <= max(MAX_LOGPROB_ERROR + 1e-6, gaps.max() - MAX_DELTA_NATS + 1e-3)
    probs, decoded_probs = np.exp(logprobs), np.exp(decoded)
    assert np.abs(decoded_probs - probs).max() <= MAX_PROB_ERROR + 1e-7
    p = probs / probs.sum(axis=1, keepdims=True)
    q = decoded_probs / decoded_probs.sum(axis=1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1)
    assert kl.max() < 1e-7


def test_error_is_smallest_for_the_most_likely_tokens():
    assert logprob_error_bound(0.01) < 2e-5 < logprob_error_bound(1.0) < 2e-4 < logprob_error_bound(60.0)
    assert MAX_LOGPROB_ERROR < 1e-3 and MAX_PROB_ERROR < 6e-5


def test_very_unlikely_tokens_saturate_and_minus_inf_is_accepted():
    ids = np.array([[1, 2, 3]])
    logprobs = np.array([[-0.01, -100.0, -np.inf]])
    _, decoded = decode_topk(encode_topk(ids, logprobs))
    np.testing.assert_allclose(decoded[0, 1:], -0.01 - MAX_DELTA_NATS, atol=1e-4)


def test_empty_example_round_trips():
    blob = encode_topk(np.zeros((0, 20), dtype=np.int64), np.zeros((0, 20)))
    ids, logprobs = decode_topk(blob)
    assert ids.shape == (0, 20) and logprobs.shape == (0, 20)


@pytest.mark.parametrize(
    "ids,logprobs,message",
    [
        (np.array([[1, 2]]), np.array([[-1.0]]), "same shape"),
        (np.array([[-1, 2]]), np.array([[-1.0, -2.0]]), "≥ 0"),
        (np.array([[1, 2]]), np.array([[np.nan, -2.0]]), "NaN"),
        (np.array([[1.5, 2]]), np.array([[-1.0, -2.0]]), "integers"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(ids, logprobs, message):
    with pytest.raises(ValueError, match=message):
        encode_topk(ids, logprobs)


def test_corrupt_blob_is_rejected():
    blob = encode_topk(np.array([[1, 2]]), np.array([[-0.1, -2.0]]))
    with pytest.raises(ValueError, match="header says"):
        decode_topk(blob[:-1])
    with pytest.raises(ValueError, match="not a teacher_topk blob"):
        decode_topk(b"X" + blob[1:])
