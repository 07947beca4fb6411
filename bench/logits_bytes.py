"""Bytes per token and error of the teacher_topk codec, against raw int32 + float32 storage.

    python bench/logits_bytes.py [--positions 20000] [--k 20]

For several vocabulary sizes and distribution shapes (peaked to flat), it encodes the top-k
of synthetic next-token distributions with `storage.topk`, and reports, next to the raw
baseline measured in the same run (int32 ids + float32 logprobs, 8·k bytes per token):

- blob bytes/token and Parquet (zstd) bytes/token of both formats, and their ratio;
- the error the quantisation adds: max / mean |p̂ - p| over the top-k probabilities, max
  |log p̂ - log p| (large only for gaps past the 64-nat saturation), the KL divergence it
  induces between the renormalised top-k distributions and with the tail mass
  (1 - Σ top-k) as one extra bucket — the form the kd_topk loss uses — and the absolute
  error of that tail mass;
- encode and decode speed (positions/s) against the raw baseline's tobytes/frombuffer.

Nothing here is asserted; the test suite checks the documented bound (tests/test_topk_codec.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillflow.storage.topk import MAX_LOGPROB_ERROR, decode_topk, encode_topk  # noqa: E402

VOCABS = (512, 32_000, 128_256, 152_064)
# Scale of Gumbel-distributed logits: large = peaked (confident teacher), small = flat.
SHAPES = {"peaked": 6.0, "typical": 3.0, "flat": 1.0}
ROWS_PER_EXAMPLE = 256  # positions per blob (one blob per dataset row)


def synthetic_topk(positions: int, vocab: int, k: int, scale: float, seed: int):
    """Top-k (ids, logprobs) and the full-vocabulary log-normaliser of random distributions."""
    rng = np.random.default_rng(seed)
    ids = np.empty((positions, k), dtype=np.int64)
    logprobs = np.empty((positions, k), dtype=np.float64)
    chunk = max(1, 2_000_000 // vocab)
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        logits = rng.gumbel(size=(stop - start, vocab)) * scale  # (n, V)
        logits -= np.logaddexp.reduce(logits, axis=1, keepdims=True)
        top = np.argpartition(-logits, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)
        ids[start:stop] = np.take_along_axis(top, order, axis=1)
        logprobs[start:stop] = np.take_along_axis(logits, ids[start:stop], axis=1)
    return ids, logprobs


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in nats; rows are distributions (n, m)."""
    return np.sum(p * (np.log(p) - np.log(q)), axis=1)


def with_tail(probs: np.ndarray) -> np.ndarray:
    tail = np.clip(1.0 - probs.sum(axis=1, keepdims=True), 1e-12, None)
    return np.concatenate([probs, tail], axis=1)


def parquet_bytes(table: pa.Table) -> int:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.tell()


def measure(vocab: int, shape: str, positions: int, k: int) -> dict[str, float]:
    ids, logprobs = synthetic_topk(positions, vocab, k, SHAPES[shape], seed=vocab)
    examples = [slice(s, min(s + ROWS_PER_EXAMPLE, positions)) for s in range(0, positions, ROWS_PER_EXAMPLE)]

    start = time.perf_counter()
    blobs = [encode_topk(ids[rows], logprobs[rows]) for rows in examples]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = [decode_topk(blob) for blob in blobs]
    decode_s = time.perf_counter() - start
    decoded_ids = np.concatenate([d[0] for d in decoded])
    decoded_logprobs = np.concatenate([d[1] for d in decoded]).astype(np.float64)
    assert (decoded_ids == ids).all()

    # Baseline: raw int32 ids + float32 logprobs per example.
    start = time.perf_counter()
    raw = [ids[rows].astype(np.int32).tobytes() + logprobs[rows].astype(np.float32).tobytes() for rows in examples]
    raw_encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for blob, rows in zip(raw, examples):
        n = rows.stop - rows.start
        np.frombuffer(blob, np.int32, n * k), np.frombuffer(blob, np.float32, n * k, offset=4 * n * k)
    raw_decode_s = time.perf_counter() - start

    probs, decoded_probs = np.exp(logprobs), np.exp(decoded_logprobs)
    renorm = lambda p: p / p.sum(axis=1, keepdims=True)  # noqa: E731
    kl_topk = kl(renorm(probs), renorm(decoded_probs))
    kl_tail = kl(with_tail(probs), with_tail(decoded_probs))
    codec_blob = sum(map(len, blobs)) / positions
    raw_blob = sum(map(len, raw)) / positions
    codec_stored = parquet_bytes(pa.table({"teacher_topk": pa.array(blobs, pa.binary())})) / positions
    raw_stored = parquet_bytes(pa.table({"raw": pa.array(raw, pa.binary())})) / positions
    return {
        "vocab": vocab,
        "shape": shape,
        "top1_p": float(np.exp(logprobs[:, 0]).mean()),
        "topk_mass": float(probs.sum(axis=1).mean()),
        "codec_B/tok": codec_blob,
        "codec_parquet_B/tok": codec_stored,
        "raw_B/tok": raw_blob,
        "raw_parquet_B/tok": raw_stored,
        "size_ratio": codec_stored / raw_stored,
        "max_abs_dp": float(np.abs(decoded_probs - probs).max()),
        "mean_abs_dp": float(np.abs(decoded_probs - probs).mean()),
        "max_abs_dlogp": float(np.abs(decoded_logprobs - logprobs).max()),
        "max_kl_topk": float(kl_topk.max()),
        "mean_kl_topk": float(kl_topk.mean()),
        "max_kl_tail": float(kl_tail.max()),
        "max_abs_dtail": float(np.abs(decoded_probs.sum(axis=1) - probs.sum(axis=1)).max()),
        "encode_pos/s": positions / encode_s,
        "decode_pos/s": positions / decode_s,
        "encode_vs_raw": raw_encode_s / encode_s,
        "decode_vs_raw": raw_decode_s / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=5_000, help="token positions per case")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    from provenance import provenance  # bench/provenance.py, beside this script
    print(provenance(), flush=True)

    print(f"k = {args.k}, {args.positions} positions per case, {ROWS_PER_EXAMPLE} positions per blob; "
          f"documented bound |Δ log p| ≤ {MAX_LOGPROB_ERROR:.3e}")
    header = (f"{'vocab':>7} {'shape':>8} {'p(top1)':>7} {'mass':>5} | {'B/tok':>6} {'pq B/tok':>8} "
              f"{'raw pq':>7} {'ratio':>5} | {'max|dp|':>8} {'mean|dp|':>8} {'max|dlogp|':>10} "
              f"{'maxKL':>8} {'meanKL':>8} {'maxKL+tail':>10} {'max|dtail|':>10} | {'enc/s':>8} {'dec/s':>8} {'enc×raw':>7} {'dec×raw':>7}")
    print(header)
    print("-" * len(header))
    for vocab in VOCABS:
        for shape in SHAPES:
            r = measure(vocab, shape, args.positions, args.k)
            print(f"{r['vocab']:>7} {r['shape']:>8} {r['top1_p']:>7.3f} {r['topk_mass']:>5.2f} | "
                  f"{r['codec_B/tok']:>6.1f} {r['codec_parquet_B/tok']:>8.1f} {r['raw_parquet_B/tok']:>7.1f} "
                  f"{r['size_ratio']:>5.2f} | {r['max_abs_dp']:>8.1e} {r['mean_abs_dp']:>8.1e} "
                  f"{r['max_abs_dlogp']:>10.2e} {r['max_kl_topk']:>8.1e} {r['mean_kl_topk']:>8.1e} "
                  f"{r['max_kl_tail']:>10.1e} {r['max_abs_dtail']:>10.1e} | {r['encode_pos/s']:>8.0f} {r['decode_pos/s']:>8.0f} "
                  f"{r['encode_vs_raw']:>7.2f} {r['decode_vs_raw']:>7.2f}")


if __name__ == "__main__":
    main()
