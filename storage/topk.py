"""Compact binary codec for teacher top-k logprobs (the `teacher_topk` column).

One blob holds the top-k distribution of every supervised position of one example:
`ids` (T, k) token ids and `logprobs` (T, k) natural-log probabilities, each row sorted by
logprob, descending. Position t predicts the t-th supervised token of
`training.data.encode_example` (see `tasks/capture/logits.py`).

Layout (little-endian)::

    header   8 bytes   magic b"K" | version u8 | id_width u8 | reserved u8 | k u16 | T u32
    top1     T × f32   logprob of the most likely token, exact
    ids      T × k × id_width bytes   unsigned ids, id_width = 2 (vocab ≤ 65,536),
                                      3 (≤ 16.7 M) or 4, chosen from the largest id
    gaps     T × (k-1) × u16          round(sqrt(top1 - logprob_j) · GAP_SCALE), j = 2..k,
                                      saturated at 65,535 (= 64 nats below the top-1)

Size per position: 4 + k·id_width + 2·(k-1) bytes, plus 8 bytes per blob. At k = 20 that is
82 bytes for a vocabulary ≤ 65,536 and 102 bytes for a larger one (Llama-3, Qwen, Gemma).

Error: the top-1 logprob and every id are exact. A gap g = top1 - logprob is stored on a
square-root scale, so the error is smallest where probabilities are largest:
|Δ log p| ≤ sqrt(g) / GAP_SCALE (+ 4e-9), i.e. ≤ 1.2e-4 nats at g = 1 and ≤ 9.8e-4 nats
(MAX_LOGPROB_ERROR) at the 64-nat end; the absolute error of a probability is at most
p_top1 · max_g e^-g·sqrt(g) / GAP_SCALE ≈ 5.3e-5 (MAX_PROB_ERROR). Gaps over 64 nats
(probability ratio < 1.6e-28) and -inf decode as exactly 64 nats below the top-1. Rounding
is monotone, so decoded rows stay sorted. `bench/logits_bytes.py` measures the error on
probabilities and the KL it induces.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"K"
VERSION = 1
HEADER = struct.Struct("<cBBBHI")  # magic, version, id_width, reserved, k, T

GAP_SCALE = 8192.0  # code = round(sqrt(gap in nats) * GAP_SCALE)
MAX_GAP_CODE = np.iinfo(np.uint16).max
MAX_DELTA_NATS = (MAX_GAP_CODE / GAP_SCALE) ** 2  # ≈ 64 nats: larger gaps saturate here
# Bounds on |decoded - true| for gaps below MAX_DELTA_NATS (see the module docstring).
MAX_LOGPROB_ERROR = float(np.sqrt(MAX_DELTA_NATS) / GAP_SCALE + 0.25 / GAP_SCALE**2)
MAX_PROB_ERROR = float(np.exp(-0.5) * np.sqrt(0.5) / GAP_SCALE * 1.001)


def logprob_error_bound(gap: np.ndarray | float) -> np.ndarray | float:
    """Bound on |decoded - true| logprob of a token `gap` nats below the top-1."""
    return np.sqrt(np.minimum(gap, MAX_DELTA_NATS)) / GAP_SCALE + 0.25 / GAP_SCALE**2


def id_width_for(max_id: int) -> int:
    """Bytes per token id: 2, 3 or 4, the fewest that hold `max_id`."""
    if max_id < 0:
        raise ValueError(f"token ids must be ≥ 0, got {max_id}")
    for width in (2, 3, 4):
        if max_id < 1 << (8 * width):
            return width
    raise ValueError(f"token id {max_id} does not fit in 32 bits")


def bytes_per_position(k: int, id_width: int) -> int:
    """Encoded size of one position (without the 8-byte blob header)."""
    return 4 + k * id_width + 2 * max(k - 1, 0)


def sort_topk(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by logprob, descending (stable, so ties keep their order)."""
    order = np.argsort(-logprobs, axis=1, kind="stable")  # (T, k)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray) -> bytes:
    """Encode (T, k) token ids and logprobs into one blob; rows need not be pre-sorted."""
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != logprobs.shape:
        raise ValueError(
            f"ids and logprobs must both be (T, k) arrays of the same shape, got {ids.shape} "
            f"and {logprobs.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    num_positions, k = ids.shape
    if k == 0 and num_positions > 0:
        raise ValueError("k must be ≥ 1")
    if k > 0xFFFF:
        raise ValueError(f"k = {k} exceeds the format limit of 65,535")
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
        raise ValueError("logprobs contain NaN or +inf; pass natural-log probabilities (≤ 0)")

    if ids.size and int(ids.min()) < 0:
        raise ValueError(f"token ids must be ≥ 0, got {int(ids.min())}")
    id_width = id_width_for(int(ids.max()) if ids.size else 0)
    ids, logprobs = sort_topk(ids.astype(np.int64), logprobs)

    top1 = logprobs[:, 0] if k else np.zeros(num_positions)  # (T,)
    if np.isneginf(top1).any():
        raise ValueError("the top-1 logprob of a position is -inf; the teacher output is broken")
    gaps = top1[:, None] - logprobs[:, 1:]  # (T, k-1), ≥ 0 (inf where logprob is -inf)
    codes = np.minimum(np.rint(np.sqrt(gaps) * GAP_SCALE), MAX_GAP_CODE).astype("<u2")

    id_bytes = ids.astype("<u4").view(np.uint8).reshape(num_positions, k, 4)[:, :, :id_width]
    header = HEADER.pack(MAGIC, VERSION, id_width, 0, k, num_positions)
    return b"".join(
        [header, top1.astype("<f4").tobytes(), np.ascontiguousarray(id_bytes).tobytes(), codes.tobytes()]
    )


def decode_topk(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode a blob into (ids int64 (T, k), logprobs float32 (T, k)), rows sorted descending."""
    if len(blob) < HEADER.size:
        raise ValueError(f"teacher_topk blob is {len(blob)} bytes, shorter than its header")
    magic, version, id_width, _, k, num_positions = HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise ValueError(
            f"not a teacher_topk blob of version {VERSION} (magic {magic!r}, version {version}); "
            "recapture the logits with this version of distillflow"
        )
    expected = HEADER.size + num_positions * bytes_per_position(k, id_width)
    if len(blob) != expected:
        raise ValueError(f"teacher_topk blob is {len(blob)} bytes, its header says {expected}")

    offset = HEADER.size
    top1 = np.frombuffer(blob, dtype="<f4", count=num_positions, offset=offset)
    offset += 4 * num_positions
    raw = np.frombuffer(blob, dtype=np.uint8, count=num_positions * k * id_width, offset=offset)
    offset += num_positions * k * id_width
    codes = np.frombuffer(blob, dtype="<u2", count=num_positions * max(k - 1, 0), offset=offset)

    padded = np.zeros((num_positions, k, 4), dtype=np.uint8)
    padded[:, :, :id_width] = raw.reshape(num_positions, k, id_width)
    ids = padded.view("<u4").reshape(num_positions, k).astype(np.int64)

    logprobs = np.empty((num_positions, k), dtype=np.float32)
    if k:
        logprobs[:, 0] = top1
        gaps = (codes.reshape(num_positions, k - 1).astype(np.float64) / GAP_SCALE) ** 2
        logprobs[:, 1:] = (top1.astype(np.float64)[:, None] - gaps).astype(np.float32)
    return ids, logprobs


def topk_shape(blob: bytes) -> tuple[int, int]:
    """(T, k) of a blob, from its header alone."""
    _, _, _, _, k, num_positions = HEADER.unpack_from(blob)
    return num_positions, k
