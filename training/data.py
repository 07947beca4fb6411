"""From dataset rows to training batches: chat template, response-only labels, packing, cache.

Conventions used everywhere in `training/`:

- `labels` is aligned with `input_ids` (HF style): labels[t] = input_ids[t] on response tokens,
  -100 elsewhere. The model's output at t-1 predicts labels[t]; the shift happens in the loss.
- The j-th teacher top-k row of an example (`teacher_topk` column) is the teacher
  distribution for the j-th supervised token (j-th position with labels != -100), in order.
- A batch carries `position_ids` that restart at 0 for every example (and for the padding at
  the end of a row), and no attention mask: transformers then keeps attention inside each
  example, so packed rows and padded rows need no special path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillflow.training.chat_template import cut_at_stop, template_stops

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------
# One example
# --------------------------------------------------------------------------------------


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _template_ids(tokenizer, text: str) -> list[int]:
    # The chat template already wrote every special token (bos included) into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_example(
    tokenizer, prompt: str, response: str, system_prompt: str | None = None, chat_template: str | None = None
) -> tuple[str, str, str]:
    """(prompt text, answer text, response as trained) of one pair under the chat template.

    The prompt text ends with the generation prompt; the answer text is everything the template
    writes after it (the response and its end-of-turn token). A preset template's turn end
    cuts the response first (the returned response is the cut one).
    """
    template = chat_template or tokenizer.chat_template
    if template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template (a base "
            "model?); set `chat_template: plain` (or a Jinja string or file) in the config"
        )
    response, _ = cut_at_stop(response, template_stops(template))
    messages = _messages(prompt, system_prompt)
    prompt_text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], chat_template=template, tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render the conversation as <generation prompt> + "
            "<answer>, so the answer's tokens cannot be located; use a template whose "
            "add_generation_prompt output is a prefix of the full conversation"
        )
    return prompt_text, full_text[len(prompt_text) :], response


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    system_prompt: str | None = None,
    max_length: int = 2048,
    chat_template: str | None = None,
) -> dict[str, list[int]]:
    """Tokenise one (prompt, response) pair with `chat_template` (Jinja text), else the
    tokenizer's own chat template.

    Returns {"input_ids": [...], "labels": [...]} of equal length ≤ max_length, where labels
    is -100 on every token that is not part of the assistant's answer. The answer's tokens are
    everything the template writes after the generation prompt, so the end-of-turn / eos
    token(s) that follow the assistant content are supervised too.

    Truncation: the prompt keeps at least min(its length, max_length // 2) tokens (cut from
    the left, keeping the generation prompt); the response is cut from the right.

    A preset template's turn end (training.chat_template.PRESET_STOPS) cuts the response
    first, as the teacher's generation does: an answer that runs on into the next "User:"
    turn is trained (and captured) up to there only.
    """
    prompt_text, answer_text, _ = render_example(tokenizer, prompt, response, system_prompt, chat_template)
    prompt_ids = _template_ids(tokenizer, prompt_text)
    response_ids = _template_ids(tokenizer, answer_text)

    if len(prompt_ids) + len(response_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        response_ids = response_ids[: max_length - keep_prompt]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


# --------------------------------------------------------------------------------------
# Whole dataset, cached
# --------------------------------------------------------------------------------------


def dataset_shards(dataset_dir: str | Path) -> list[Path]:
    from distillflow.storage.parquet import list_shards

    shards = list_shards(Path(dataset_dir) / "data")
    if not shards:
        raise FileNotFoundError(
            f"{dataset_dir}/data has no .parquet shards: point training.dataset_dir at a "
            "dataset written by `distill build` (it holds data/part-*.parquet)"
        )
    return shards


def data_fingerprint(dataset_dir: str | Path) -> str:
    """sha256 over the shard names and contents (the manifest's digests when it has them)."""
    digest = hashlib.sha256()
    from distillflow.storage.manifest import MANIFEST_NAME, load_manifest
    from distillflow.storage.parquet import file_sha256

    known = load_manifest(dataset_dir).shard_digests("data") if (Path(dataset_dir) / MANIFEST_NAME).is_file() else {}

    for path in dataset_shards(dataset_dir):
        relative = f"data/{path.name}"
        stat = path.stat()
        shard_digest = known.get(relative) or file_sha256(path)
        digest.update(f"{relative}:{stat.st_size}:{shard_digest}\n".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that changes token ids: vocabulary/merges, template, specials."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(str(tokenizer.chat_template).encode())
    if template_stops(tokenizer.chat_template):  # a preset's turn end cuts responses (encode_example)
        digest.update(repr(template_stops(tokenizer.chat_template)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def read_columns(dataset_dir: str | Path, columns: list[str]):
    """The given columns of every accepted row, in shard order (a pyarrow Table)."""
    from distillflow.storage.parquet import read_table

    dataset_shards(dataset_dir)  # clear error when there is no shard
    table = read_table(Path(dataset_dir) / "data")
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        hint = (
            " (run `distill capture-logits CONFIG` to add teacher top-k logprobs)"
            if any("topk" in name for name in missing)
            else ""
        )
        raise ValueError(f"{dataset_dir}: dataset has no column(s) {missing}{hint}")
    return table.select(columns)


def training_row_mask(dataset_dir: str | Path, holdout_fraction: float) -> list[bool] | None:
    """Which rows training may use: all (None) or those outside the held-out split by `id`."""
    if not holdout_fraction:
        return None
    from distillflow.storage.dataset import is_heldout

    ids = read_columns(dataset_dir, ["id"]).column("id").to_pylist()
    return [not is_heldout(str(row_id), holdout_fraction) for row_id in ids]


def tokenize_dataset(
    dataset_dir: str | Path,
    tokenizer,
    system_prompt: str | None,
    max_length: int,
    cache_dir: str | Path,
    holdout_fraction: float = 0.0,
) -> list[dict[str, np.ndarray]]:
    """Encode every row with `encode_example`; cached as Parquet under `cache_dir`.

    The cache key covers the tokenizer, the data (shard digests), max_length, the system
    prompt and the held-out share, so a change to any of them re-tokenises instead of reusing
    stale ids. Rows of the held-out split (`holdout_fraction` > 0) are left out.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillflow.storage.parquet import write_table_atomic

    key = hashlib.sha256(
        json.dumps(
            [tokenizer_fingerprint(tokenizer), data_fingerprint(dataset_dir), max_length, system_prompt, 1]
            + ([holdout_fraction] if holdout_fraction else [])
        ).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"tokenized-{key}.parquet"
    if path.is_file():
        table = pq.read_table(path)
    else:
        rows = read_columns(dataset_dir, ["prompt", "response"]).to_pylist()
        keep = training_row_mask(dataset_dir, holdout_fraction)
        if keep is not None:
            rows = [row for row, kept in zip(rows, keep) if kept]
        encoded = [
            encode_example(tokenizer, row["prompt"], row["response"], system_prompt, max_length)
            for row in rows
        ]
        schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
        table = pa.Table.from_pylist(encoded, schema=schema)
        write_table_atomic(table, path)  # temp name + rename: concurrent ranks are safe
    return [
        {"input_ids": np.asarray(ids, dtype=np.int64), "labels": np.asarray(labels, dtype=np.int64)}
        for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())
    ]


def capture_method(dataset_dir: str | Path) -> str:
    """How the dataset's `teacher_topk` was captured: "topk" or "sampled" (`capture.method`).

    Read from every shard's provenance (`distill capture-logits` records it there; top-k
    captures, and shards without provenance, are "topk"). Shards that disagree are an error.
    """
    from distillflow.storage.add_columns import read_provenance

    methods = {
        ((read_provenance(path) or {}).get("capture") or {}).get("method", "topk")
        for path in dataset_shards(dataset_dir)
    }
    if len(methods) > 1:
        raise ValueError(
            f"{dataset_dir}: shards were captured with different capture.method values "
            f"({sorted(methods)}); run `distill capture-logits` again with one method"
        )
    return methods.pop()


def attach_topk(
    examples: list[dict[str, np.ndarray]],
    dataset_dir: str | Path,
    column: str = "teacher_topk",
    holdout_fraction: float = 0.0,
) -> None:
    """Add `topk_ids` (S, k) int64 and `topk_logprobs` (S, k) float32 to every example, in place.

    `holdout_fraction` must be the one `tokenize_dataset` used (the same rows are skipped).

    S is the example's number of supervised tokens; a teacher blob longer than S (the response
    was truncated) is cut to the first S rows, a shorter one is an error.

    A sampled capture (`capture_method`) holds weights that sum to 1; each row is renormalised
    after decoding, so the codec's rounding (≤ 5.3e-5 per value) leaves no tail mass and the
    kd_topk loss sees an empty tail bucket.
    """
    from distillflow.storage.topk import decode_topk

    sampled = capture_method(dataset_dir) == "sampled"

    blobs = read_columns(dataset_dir, [column]).column(column).to_pylist()
    keep = training_row_mask(dataset_dir, holdout_fraction)
    if keep is not None:
        blobs = [blob for blob, kept in zip(blobs, keep) if kept]
    if len(blobs) != len(examples):
        raise ValueError(f"{column}: {len(blobs)} rows but {len(examples)} examples")
    for index, (example, blob) in enumerate(zip(examples, blobs)):
        supervised = int((example["labels"] != IGNORE_INDEX).sum())
        if blob is None:
            raise ValueError(
                f"row {index} has no {column}; re-run `distill capture-logits` on the dataset"
            )
        ids, logprobs = decode_topk(blob)
        if ids.shape[0] < supervised:
            raise ValueError(
                f"row {index}: {column} has {ids.shape[0]} positions but the student's "
                f"tokenisation supervises {supervised} tokens; the top-k logprobs were captured "
                "with another tokenizer or template — capture them again with this one"
            )
        if sampled:  # (T, k) log weights, summing to 1 up to the codec's rounding: exactly 1
            logprobs = logprobs - np.logaddexp.reduce(logprobs.astype(np.float64), axis=-1, keepdims=True)
        example["topk_ids"] = np.asarray(ids[:supervised], dtype=np.int64)
        example["topk_logprobs"] = np.asarray(logprobs[:supervised], dtype=np.float32)


# --------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------


def pack_examples(examples: list[dict[str, np.ndarray]], max_length: int) -> list[dict[str, Any]]:
    """Greedy packing in order: concatenate examples into rows of at most max_length tokens.

    A packed row keeps `segments` (lengths of its examples) so that position ids restart
    per example; top-k rows are concatenated in the same order as the supervised tokens.
    """
    rows: list[dict[str, Any]] = []
    current: list[dict[str, np.ndarray]] = []
    length = 0
    for example in examples:
        size = len(example["input_ids"])
        if current and length + size > max_length:
            rows.append(_concat(current))
            current, length = [], 0
        current.append(example)
        length += size
    if current:
        rows.append(_concat(current))
    return rows


def _concat(examples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        key: np.concatenate([example[key] for example in examples]) for key in examples[0]
    }
    row["segments"] = [len(example["input_ids"]) for example in examples]
    return row


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64, -100 = not supervised
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 per example / padding
    topk_ids: torch.Tensor | None = None  # (N, k) int64, N = supervised tokens of the batch
    topk_logprobs: torch.Tensor | None = None  # (N, k) float32
    topk_valid: torch.Tensor | None = None  # (N, k) bool, kd_greybox: False on padding slots
    row_kind: torch.Tensor | None = None  # (N,) int8, kd_greybox: training.token_align's kind per row
    student_generated: bool = False  # on_policy: answers sampled by the student (loss: divergence only)

    @property
    def num_supervised(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def supervised_count(example: dict[str, Any]) -> int:
    """Supervised tokens the loss sees (a label at position 0 has no prediction)."""
    return int((example["labels"][1:] != IGNORE_INDEX).sum())


def right_padded(encoded: list[dict[str, Any]], pad_token_id: int):
    """(input_ids, labels, attention_mask), each (B, L): `encode_example` outputs right-padded
    to the longest, padding masked out and its labels IGNORE_INDEX (for plain forward passes)."""
    width = max(len(item["input_ids"]) for item in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        size = len(item["input_ids"])
        input_ids[row, :size] = torch.tensor(item["input_ids"])
        labels[row, :size] = torch.tensor(item["labels"])
        mask[row, :size] = 1
    return input_ids, labels, mask


def collate(rows: list[dict[str, Any]], pad_token_id: int) -> Batch:
    """Right-pad rows to the longest one; padding is its own position-id segment."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        size = len(row["input_ids"])
        input_ids[index, :size] = torch.from_numpy(row["input_ids"])
        labels[index, :size] = torch.from_numpy(row["labels"])
        segments = list(row.get("segments", [size])) + ([width - size] if width > size else [])
        position_ids[index] = torch.cat([torch.arange(n) for n in segments])
    batch = Batch(input_ids, labels, position_ids)
    if "topk_ids" in rows[0]:
        # Drop the rows of a supervised token at position 0 (nothing predicts it).
        skips = [1 if row["labels"][0] != IGNORE_INDEX else 0 for row in rows]
        batch.topk_ids, batch.topk_logprobs, batch.topk_valid, batch.row_kind = (
            torch.from_numpy(np.concatenate([row[key][skip:] for row, skip in zip(rows, skips)]))
            if key in rows[0] else None
            for key in ("topk_ids", "topk_logprobs", "topk_valid", "row_kind")
        )
    return batch
