"""Sampled sparse teacher targets (`capture.method: sampled`): pure functions, no I/O.

Top-k caching keeps the teacher's k most likely tokens and drops the rest, a biased picture
of the teacher: the student never sees the tail, and the kept mass is over-weighted once the
k values are renormalised (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", ACL 2025). Random-sampling KD stores instead k tokens DRAWN from the
teacher's distribution p at each position (proposal q = p), with importance weights p/q
normalised over the draws, which for q = p are the empirical frequencies:

    w(v) = count of v among the k draws / k,      sum_v w(v) = 1,      E[w(v)] = p(v).

So the expected target is the teacher's distribution, and the forward-KL gradient of the
student's logits z, softmax(z) - w, equals softmax(z) - p in expectation: unbiased, at
T = 1 only (tempering w is not tempering p).

Storage: the distinct drawn ids with log w in the top-k codec's (T, k) layout, so a sampled
capture takes exactly the bytes of a top-k capture at the same k. When fewer than k tokens
are distinct, the spare slots hold the teacher's most likely undrawn tokens at weight 0
(log w = -inf, which the codec stores 64 nats below the top weight: e^-64 ≈ 1.6e-28).

Draws are deterministic: position t of the row with id r uses a generator seeded from
(seed, sha256(r), t), so a rerun, a resumed capture or a truncated answer draws the same
tokens at the same positions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def row_seed_words(row_id: str) -> list[int]:
    """Four 32-bit words of sha256(row_id): the row's part of every position's seed."""
    digest = hashlib.sha256(str(row_id).encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def draw_uniforms(row_id: str, num_positions: int, k: int, seed: int = 0) -> np.ndarray:
    """(T, k) float64 uniforms in [0, 1): row t from a generator seeded by (seed, row_id, t)."""
    words = row_seed_words(row_id)
    uniforms = np.empty((num_positions, k), dtype=np.float64)
    for position in range(num_positions):
        generator = np.random.default_rng(np.random.SeedSequence([seed, *words, position]))
        uniforms[position] = generator.random(k)
    return uniforms


def draw_tokens(logprobs: torch.Tensor, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: logprobs (T, V) of the teacher, uniforms (T, k) → ids (T, k) int64.

    Token v is drawn when cdf(v - 1) <= u < cdf(v), so a token of probability 0 never is.
    """
    cdf = torch.cumsum(logprobs.double().exp(), dim=-1)  # (T, V)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, whatever the rounding of the sum
    u = torch.as_tensor(uniforms, dtype=torch.float64, device=logprobs.device)  # (T, k)
    ids = torch.searchsorted(cdf, u, right=True).clamp_max(logprobs.shape[-1] - 1)  # (T, k)
    return ids.cpu().numpy().astype(np.int64)


def frequencies(drawn: np.ndarray, fillers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids and their log draw frequencies, padded to k with weight-0 fillers.

    drawn: (T, k) drawn ids; fillers: (T, m) candidate ids in the teacher's order of
    likelihood, m ≥ k (the most likely undrawn ones fill the spare slots). Returns ids (T, k)
    int64 (distinct in each row) and log_weights (T, k) float64: log(count / k) for drawn
    ids, -inf for fillers; exp(log_weights) sums to 1 in every row.
    """
    num_positions, k = drawn.shape
    ids = np.empty((num_positions, k), dtype=np.int64)
    log_weights = np.full((num_positions, k), -np.inf, dtype=np.float64)
    for position in range(num_positions):
        distinct, counts = np.unique(drawn[position], return_counts=True)  # (d,), (d,)
        spare = fillers[position][~np.isin(fillers[position], distinct)][: k - len(distinct)]
        if len(distinct) + len(spare) < k:
            raise ValueError(f"position {position}: too few filler candidates for k = {k}")
        ids[position] = np.concatenate([distinct, spare])
        log_weights[position, : len(distinct)] = np.log(counts / k)
    return ids, log_weights


def sample_sparse_targets(
    logprobs: torch.Tensor, k: int, row_id: str, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The sampled capture of one row: logprobs (T, V) of the teacher at its supervised
    positions (T = 1) → ids (T, k) int64 and log weights (T, k) float64 (see `frequencies`)."""
    num_positions, vocab = logprobs.shape
    if k > vocab:
        raise ValueError(f"capture.k = {k} exceeds the teacher's vocabulary of {vocab}")
    drawn = draw_tokens(logprobs, draw_uniforms(row_id, num_positions, k, seed))  # (T, k)
    fillers = torch.topk(logprobs, min(2 * k, vocab), dim=-1).indices.cpu().numpy()  # (T, ≤ 2k)
    return frequencies(drawn, fillers)
