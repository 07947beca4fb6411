"""Sampled sparse targets (`capture.method: sampled`): unbiased weights, deterministic draws,
top-k's bytes, an empty tail bucket in kd_topk, config and training checks, training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from distillflow.storage.topk import decode_topk, encode_topk
from distillflow.tasks.capture.sampling import draw_uniforms, sample_sparse_targets
from tests.test_capture_logits import ROWS, blobs_of, settings_for, tiny_teacher, write_dataset  # noqa: F401

K = 8


def teacher_logprobs(num_positions: int = 3, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    """(T, V) teacher log-probabilities from peaked to flat."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_positions, vocab, generator=generator, dtype=torch.float64)
    scales = torch.linspace(4.0, 0.5, num_positions, dtype=torch.float64)[:, None]
    return torch.log_softmax(logits * scales, dim=-1)


def dense(ids: np.ndarray, log_weights: np.ndarray, vocab: int) -> np.ndarray:
    """(T, k) ids and log weights → (T, V) weights."""
    weights = np.zeros((ids.shape[0], vocab))
    np.put_along_axis(weights, ids, np.exp(log_weights), axis=1)
    return weights


def decoded_weights(ids: np.ndarray, log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Through the codec, renormalised as `training.data.attach_topk` does for a sampled capture."""
    ids, logprobs = decode_topk(encode_topk(ids, log_weights))
    return ids, logprobs - np.logaddexp.reduce(logprobs.astype(np.float64), axis=-1, keepdims=True)


def test_sampled_weights_average_to_the_teacher_probabilities():
    logprobs = teacher_logprobs()
    probs = logprobs.exp().numpy()  # (T, V)
    rows = 2000  # independent rows: 16,000 draws per position
    total = np.zeros_like(probs)
    for index in range(rows):
        ids, log_weights = decoded_weights(*sample_sparse_targets(logprobs, K, f"row-{index}"))
        total += dense(ids, log_weights, probs.shape[1])
    mean = total / rows
    # Each weight is a mean of K * rows Bernoulli(p) draws: 6 standard errors (fixed seed).
    tolerance = 6 * np.sqrt(probs * (1 - probs) / (K * rows)) + 1e-4
    assert np.all(np.abs(mean - probs) <= tolerance), np.abs(mean - probs).max()

    # Top-k renormalised over the same bytes is biased: most of the flat rows' mass is off.
    values, top_ids = torch.topk(logprobs, K, dim=-1)
    top = dense(top_ids.numpy(), torch.log_softmax(values, dim=-1).numpy(), probs.shape[1])
    assert (np.abs(top - probs) > tolerance)[1:].mean() > 0.5


def test_draws_are_deterministic_per_row_and_position():
    logprobs = teacher_logprobs(num_positions=5)
    ids, log_weights = sample_sparse_targets(logprobs, K, "row-a")
    again_ids, again_weights = sample_sparse_targets(logprobs, K, "row-a")
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(log_weights, again_weights)
    # A truncated answer draws the same tokens at the positions it keeps.
    np.testing.assert_array_equal(sample_sparse_targets(logprobs[:3], K, "row-a")[0], ids[:3])
    assert not np.array_equal(draw_uniforms("row-a", 5, K), draw_uniforms("row-b", 5, K))
    assert not np.array_equal(draw_uniforms("row-a", 5, K, seed=1), draw_uniforms("row-a", 5, K))


def test_weights_sum_to_one_over_distinct_ids_with_weight_zero_fillers():
    logprobs = teacher_logprobs(num_positions=4)
    ids, log_weights = sample_sparse_targets(logprobs, K, "row-0")
    assert ids.shape == log_weights.shape == (4, K)
    assert all(len(set(row)) == K for row in ids.tolist())
    np.testing.assert_allclose(np.exp(log_weights).sum(-1), 1.0, atol=1e-12)
    counts = np.exp(log_weights) * K
    drawn = np.isfinite(log_weights)
    np.testing.assert_allclose(counts[drawn], np.rint(counts[drawn]), atol=1e-9)  # whole draw counts
    assert (~drawn).any()  # the peaked position repeats tokens: spare slots are fillers
    # the fillers are the teacher's most likely undrawn tokens
    for row in range(4):
        undrawn = np.setdiff1d(np.arange(logprobs.shape[1]), ids[row][drawn[row]])
        best = undrawn[np.argsort(-logprobs[row, undrawn].numpy(), kind="stable")][: (~drawn[row]).sum()]
        assert set(ids[row][~drawn[row]]) == set(best)
    with pytest.raises(ValueError, match="capture.k"):
        sample_sparse_targets(logprobs, 41, "row-0")


def test_kd_topk_on_sampled_weights_is_the_full_vocabulary_kl_to_them():
    """No tail bucket: the loss is KL(w || student) over the vocabulary, its gradient softmax(z) - w."""
    from distillflow.training.losses import KDSettings, sparse_chunk_sums_

    vocab = 40
    logprobs = teacher_logprobs(num_positions=6, vocab=vocab)
    ids, log_weights = decoded_weights(*sample_sparse_targets(logprobs, K, "row-0"))
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3))  # (n, V)
    targets = torch.as_tensor(ids[:, 0])
    settings = KDSettings(alpha=1.0, temperature=1.0)
    sums, grad = sparse_chunk_sums_(
        logits.clone(), targets, torch.as_tensor(ids), torch.as_tensor(log_weights, dtype=torch.float32), settings
    )
    weights = torch.as_tensor(dense(ids, log_weights, vocab), dtype=torch.float64)  # (n, V)
    student_log = torch.log_softmax(logits.double(), dim=-1)
    kl = torch.where(weights > 0, weights * (weights.log() - student_log), 0.0).sum()
    assert abs(sums[1].item() - kl.item()) < 1e-4
    torch.testing.assert_close(grad.double(), student_log.exp() - weights, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_capture_stores_sampled_weights_in_top_k_bytes_and_marks_the_method(tiny_teacher, tmp_path):
    from distillflow.storage.manifest import read_manifest
    from distillflow.tasks.capture.logits import capture_dataset
    from distillflow.training.data import capture_method

    source = write_dataset(tmp_path / "in")
    topk = capture_dataset(settings_for(tiny_teacher, source, tmp_path / "topk", k=K))
    settings = settings_for(tiny_teacher, source, tmp_path / "sampled", k=K, method="sampled")
    sampled = capture_dataset(settings)

    assert sampled["blob_bytes_per_token"] == topk["blob_bytes_per_token"]
    assert [len(blob) for blob in blobs_of(tmp_path / "sampled")] == [len(b) for b in blobs_of(tmp_path / "topk")]
    assert read_manifest(tmp_path / "sampled")["capture"]["method"] == "sampled"
    assert topk["method"] == "topk"
    assert capture_method(tmp_path / "sampled") == "sampled" and capture_method(tmp_path / "topk") == "topk"
    for blob in blobs_of(tmp_path / "sampled"):
        ids, logprobs = decode_topk(blob)
        np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=5e-4)
        assert all(len(set(row)) == K for row in ids.tolist())

    again = capture_dataset(settings)  # deterministic draws: nothing to redo
    assert again["shards_skipped"] == 2
    reseeded = capture_dataset(dataclasses.replace(settings, seed=1))  # another seed: new draws
    assert reseeded["shards_captured"] == 2


def write_config(tmp_path, teacher, **sections) -> str:
    data = {
        "name": "tiny",
        "output_dir": str(tmp_path / "ds"),
        "seeds": [{"path": str(tmp_path / "unused.jsonl")}],
        "teacher": {"backend": "local", "model": str(teacher)},
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_config_refuses_sampled_with_vllm_and_tempered_training(tiny_teacher, tmp_path):
    from distillflow.config import ConfigError, load_config

    capture = {"k": K, "method": "sampled"}
    training = {"dataset_dir": str(tmp_path / "ds"), "output_dir": str(tmp_path / "run"), "student": str(tiny_teacher),
                "teacher": str(tiny_teacher), "objective": "kd_topk", "temperature": 2.0}
    with pytest.raises(ConfigError, match="capture.method: sampled.*source: local"):
        load_config(write_config(tmp_path, tiny_teacher, capture={**capture, "source": "vllm", "model": "m",
                                                                  "tokenizer": str(tiny_teacher)}), check_files=False)
    with pytest.raises(ConfigError, match="training.temperature is 2.*temperature: 1.0"):
        load_config(write_config(tmp_path, tiny_teacher, capture=capture, training=training), check_files=False)
    with pytest.raises(ConfigError, match="training.divergence is reverse_kl.*forward_kl"):
        load_config(write_config(tmp_path, tiny_teacher, capture=capture,
                                 training={**training, "temperature": 1.0, "divergence": "reverse_kl"}), check_files=False)
    config = load_config(write_config(tmp_path, tiny_teacher, capture=capture,
                                      training={**training, "temperature": 1.0}), check_files=False)
    assert config.capture.method == "sampled" and config.capture.seed == 0
    assert load_config(write_config(tmp_path, tiny_teacher, capture={"k": K}), check_files=False).capture.method == "topk"


def test_a_sampled_capture_trains_through_kd_topk(tmp_path_factory, tmp_path):
    from distillflow.tasks.capture.logits import capture_dataset
    from distillflow.training.config import TrainingConfig, check_sampled_capture
    from distillflow.training.data import attach_topk, capture_method, collate, tokenize_dataset
    from distillflow.training.model import DistillationModel, load_causal_lm
    from distillflow.training.vocabulary import load_tokenizer
    from tests.fixtures import build_tiny_setup_once

    tiny = build_tiny_setup_once(tmp_path_factory.getbasetemp() / "tiny-distill", num_rows=16)
    source = write_dataset(tmp_path / "in", rows=ROWS + ROWS)
    dataset = tmp_path / "sampled"
    capture_dataset(settings_for(tiny["teacher"], source, dataset, k=K, method="sampled", max_length=128))
    assert capture_method(dataset) == "sampled"
    with pytest.raises(ValueError, match="training.temperature is 2"):
        check_sampled_capture(2.0, "forward_kl")

    tokenizer = load_tokenizer(tiny["teacher"])
    config = TrainingConfig(dataset_dir=dataset, output_dir=tmp_path / "run", student=tiny["student"],
                            teacher=tiny["teacher"], objective="kd_topk", temperature=1.0, alpha=1.0,
                            loss_chunk_tokens=16)
    examples = tokenize_dataset(dataset, tokenizer, None, 128, tmp_path)
    attach_topk(examples, dataset)
    for example in examples:  # renormalised: weights sum to 1, the tail bucket is empty
        np.testing.assert_allclose(np.exp(example["topk_logprobs"].astype(np.float64)).sum(-1), 1.0, atol=1e-6)
    torch.manual_seed(0)
    model = DistillationModel(load_causal_lm(tiny["student"]), config, len(tokenizer), None)
    batch = collate(examples[:6], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        sums = model(batch)  # (4,) sums: total, kd, ce, hidden
        loss = sums[0] / batch.num_supervised
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
