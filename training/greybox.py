"""kd_greybox data: the build's stored API `top_logprobs`, as sparse targets over the student's vocabulary.

`attach_greybox` reads each row's `top_logprobs` (written by `distill build` with
`teacher.generation.top_logprobs: k`), finds the byte span of every supervised student token
in the answer, aligns the two tokenisations (`training.token_align`) and adds to every
example, per supervised token:

- `topk_ids` (S, K) int64 and `topk_logprobs` (S, K) float32: the teacher's distribution
  over student ids (a uld row: the teacher's sorted probabilities, ids unused);
- `topk_valid` (S, K) bool: False on padding slots (a row with fewer than K entries);
- `row_kind` (S,) int8: none, exact, merged or uld (`training.token_align.KINDS`).

K is the most entries any position has (≤ k + 1: the alternatives and the actual token).
The teacher is never run: any student tokenizer works, with no teacher GPU at train time.

A dataset with a `teacher_topk` column (`distill capture-logits` with a local or vLLM
teacher that tokenised the rows itself) is read the same way: `captured_entries` turns each
row's (T, k) teacher ids back into the teacher's token bytes with the tokenizer the shard's
provenance names, and the result goes through the same alignment as the API's logprobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distillflow.training.data import IGNORE_INDEX, encode_example, read_columns, render_example, training_row_mask
from distillflow.training.token_align import (
    BYTE_LEVEL_DECODER,
    Coverage,
    align_answer,
    char_to_byte_spans,
    teacher_tokens_for_answer,
)

LOGPROBS_COLUMN = "top_logprobs"
CAPTURED_COLUMN = "teacher_topk"


class NoTeacherLogprobs(ValueError):
    """The dataset has no API logprobs to distil from."""


def no_logprobs_message(dataset_dir: str | Path, detail: str) -> str:
    return (
        f"training.objective kd_greybox trains from the teacher's top-k logprobs that `distill build` "
        f"stores per answer token (or that `distill capture-logits` stores), but {dataset_dir} {detail}. "
        "Set teacher.generation.top_logprobs (e.g. 20, the most an OpenAI-compatible API returns) in "
        "the build config and run `distill build` again, or run `distill capture-logits` with the "
        "teacher you run yourself (a `capture:` section; any vocabulary), or train with objective: "
        "sft, which needs none"
    )


def check_greybox_dataset(dataset_dir: str | Path) -> None:
    """Raise NoTeacherLogprobs unless some row of the dataset has stored logprobs."""
    import pyarrow.parquet as pq

    from distillflow.training.data import dataset_shards

    rows_with = 0
    for path in dataset_shards(dataset_dir):
        names = pq.read_schema(path).names
        if CAPTURED_COLUMN in names:
            if not (captured_settings(path) or {}).get("tokenizer"):
                raise NoTeacherLogprobs(no_logprobs_message(
                    dataset_dir, f"has a {CAPTURED_COLUMN} column in {path.name} without the capture's "
                    "provenance (which teacher tokenizer made its ids)"))
            refuse_sampled_capture(path, dataset_dir)
            column = pq.read_table(path, columns=[CAPTURED_COLUMN]).column(CAPTURED_COLUMN)
        elif LOGPROBS_COLUMN in names:
            column = pq.read_table(path, columns=[LOGPROBS_COLUMN]).column(LOGPROBS_COLUMN)
        else:
            raise NoTeacherLogprobs(no_logprobs_message(dataset_dir, f"has no {LOGPROBS_COLUMN} column ({path.name})"))
        rows_with += len(column) - column.null_count
    if rows_with == 0:
        raise NoTeacherLogprobs(no_logprobs_message(dataset_dir, f"has an empty {LOGPROBS_COLUMN} column (the provider returned none)"))


def refuse_sampled_capture(path: Path, dataset_dir: str | Path) -> None:
    """kd_greybox aligns the teacher's k most likely tokens (merging a student token's pieces by
    the chain rule); the draws of a sampled capture are not those, and that product of draw
    frequencies is no estimate of the teacher's probability."""
    if (captured_settings(path) or {}).get("method") == "sampled":
        raise NoTeacherLogprobs(
            f"training.objective kd_greybox needs the teacher's top-k per answer token, but "
            f"{dataset_dir} ({path.name}) was captured with capture.method: sampled (tokens drawn "
            "from the teacher, not its most likely ones). Run `distill capture-logits` with "
            "capture.method: topk into another output_dir (capture.output_dir), or store the "
            "build's own top-k with teacher.generation.top_logprobs"
        )


def captured_settings(path: Path) -> dict[str, Any] | None:
    """The capture fingerprint a shard was written with (`tasks.capture.logits`), or None."""
    from distillflow.storage.add_columns import read_provenance

    return (read_provenance(path) or {}).get("capture")


def captured_entries(path: Path) -> list[list[dict] | None]:
    """The `teacher_topk` of one captured shard as `top_logprobs`-shaped entries per row
    (token bytes, logprob, top: the k alternatives), in the teacher's own tokenisation.

    The capture's tokenizer, template, system prompt and max_length (the shard's provenance)
    tokenise each row again: blob row t predicts the t-th supervised teacher token, whose
    logprob is known when it is among the top-k. Trailing special tokens (the template's end
    of turn, no bytes) are left out: they are not answer text.
    """
    import pyarrow.parquet as pq

    from distillflow.storage.topk import decode_topk
    from distillflow.training.vocabulary import load_tokenizer

    refuse_sampled_capture(path, path.parent.parent)
    settings = captured_settings(path) or {}
    tokenizer = load_tokenizer(settings["tokenizer"])
    vocabulary = student_token_bytes(tokenizer)  # any tokenizer: the bytes of each id
    table = pq.read_table(path, columns=["prompt", "response", CAPTURED_COLUMN])
    out: list[list[dict] | None] = []
    for prompt, response, blob in zip(*(table.column(name).to_pylist() for name in table.column_names)):
        if blob is None:
            out.append(None)
            continue
        example = encode_example(
            tokenizer, prompt, response, system_prompt=settings.get("system_prompt"),
            max_length=settings.get("max_length", 2048), chat_template=settings.get("chat_template"),
        )
        labels, input_ids = example["labels"], example["input_ids"]
        actual = [int(input_ids[i]) for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX]
        ids, logprobs = decode_topk(blob)  # (T, k) each, rows sorted descending
        entries = []
        for token_id, row_ids, row_logprobs in zip(actual, ids.tolist(), logprobs.tolist()):
            found = [lp for i, lp in zip(row_ids, row_logprobs) if i == token_id]
            entries.append({
                **_token(vocabulary, token_id), "logprob": found[0] if found else None,
                "top": [{**_token(vocabulary, i), "logprob": lp} for i, lp in zip(row_ids, row_logprobs)],
            })
        while entries and entries[-1]["bytes"] is None:
            entries.pop()
        out.append(entries)
    return out


def _token(vocabulary: list[bytes | None], token_id: int) -> dict[str, Any]:
    """A teacher id as a stored entry's token: its bytes (None for a special token: unknown text)."""
    raw = vocabulary[token_id] if token_id < len(vocabulary) else None
    return {"token": None if raw is None else raw.decode("utf-8", errors="replace"),
            "bytes": None if raw is None else list(raw)}


def teacher_entries(dataset_dir: str | Path) -> list[list[dict] | None]:
    """Each row's teacher tokens in shard order: captured top-k where a shard has it (a teacher
    run with `distill capture-logits`), else the build's stored API logprobs."""
    import pyarrow.parquet as pq

    from distillflow.training.data import dataset_shards

    out: list[list[dict] | None] = []
    for path in dataset_shards(dataset_dir):
        if CAPTURED_COLUMN in pq.read_schema(path).names:
            out.extend(captured_entries(path))
        else:
            out.extend(pq.read_table(path, columns=[LOGPROBS_COLUMN]).column(LOGPROBS_COLUMN).to_pylist())
    return out


class StudentPieces:
    """The student's first token of a text, cached: what an alternative's mass lands on."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[bytes, tuple[int, bool] | None] = {}
        self.single_tokens: dict[bytes, int] = {}
        for token_id, raw in enumerate(student_token_bytes(tokenizer)):
            if raw:
                self.single_tokens.setdefault(raw, token_id)

    def __call__(self, text: bytes) -> tuple[int, bool] | None:
        if text not in self.cache:
            self.cache[text] = self._first_piece(text)
        return self.cache[text]

    def _first_piece(self, text: bytes) -> tuple[int, bool] | None:
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: only a token of exactly these bytes names it
            token_id = self.single_tokens.get(text)
            return None if token_id is None else (token_id, True)
        ids = self.tokenizer(decoded, add_special_tokens=False)["input_ids"]
        return (int(ids[0]), len(ids) == 1) if ids else None


def student_token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each student id stands for (None for special tokens): byte-level BPE
    (GPT-2's byte alphabet), SentencePiece-style ("▁" for a space, <0xNN> byte fallback) or plain."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
    alphabet = BYTE_LEVEL_DECODER
    special = set(getattr(tokenizer, "all_special_tokens", []))
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id >= len(out) or token in special:
            continue
        if byte_level and all(char in alphabet for char in token):
            out[token_id] = bytes(alphabet[char] for char in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[token_id] = bytes([int(token[3:5], 16)])
        else:
            out[token_id] = token.replace("\u2581", " ").encode("utf-8")
    return out


def example_targets(
    tokenizer, pieces: StudentPieces, token_lengths: list[bytes | None], example: dict[str, np.ndarray],
    prompt: str, response: str, entries: list[dict] | None, system_prompt: str | None, chat_template: str | None,
):
    """Targets of one example's supervised tokens (in order) and their coverage."""
    _, answer_text, response = render_example(tokenizer, prompt, response, system_prompt, chat_template)
    supervised = [int(t) for t in example["labels"] if t != IGNORE_INDEX]
    encoded = tokenizer(answer_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if ids[: len(supervised)] != supervised:
        raise ValueError(
            "the student's tokenisation of an answer differs from the cached training tokens; "
            "delete training.tokenized_cache_dir (default <output_dir>/tokenized) and train again"
        )
    ids = ids[: len(supervised)]
    lengths = [None if token_lengths[i] is None else len(token_lengths[i]) for i in ids]
    spans = char_to_byte_spans(answer_text, encoded["offset_mapping"][: len(ids)], lengths)
    shift = len(answer_text[: max(0, answer_text.find(response))].encode("utf-8"))
    spans = [(start - shift, end - shift) for start, end in spans]
    answer = response.encode("utf-8")
    return align_answer(teacher_tokens_for_answer(entries, answer), answer, ids, spans, pieces)


def attach_greybox(
    examples: list[dict[str, np.ndarray]],
    dataset_dir: str | Path,
    tokenizer,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    holdout_fraction: float = 0.0,
) -> Coverage:
    """Add topk_ids, topk_logprobs, topk_valid and row_kind to every example, in place
    (see the module docstring); returns the coverage over all supervised positions.

    `examples` must come from `tokenize_dataset` with the same tokenizer, system prompt and
    held-out share. A tokenizer without offsets (not a "fast" one) is an error.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"kd_greybox aligns tokens on character offsets, which tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} (not a fast tokenizer) cannot give; "
            "save the student with a tokenizer.json (transformers' fast tokenizer)"
        )
    check_greybox_dataset(dataset_dir)
    rows = read_columns(dataset_dir, ["prompt", "response"]).to_pylist()
    for row, entries in zip(rows, teacher_entries(dataset_dir)):
        row[LOGPROBS_COLUMN] = entries
    keep = training_row_mask(dataset_dir, holdout_fraction)
    if keep is not None:
        rows = [row for row, kept in zip(rows, keep) if kept]
    if len(rows) != len(examples):
        raise ValueError(f"{LOGPROBS_COLUMN}: {len(rows)} rows but {len(examples)} examples")
    pieces = StudentPieces(tokenizer)
    token_lengths = student_token_bytes(tokenizer)
    coverage = Coverage()
    per_example: list[Any] = []
    for example, row in zip(examples, rows):
        targets, counted = example_targets(
            tokenizer, pieces, token_lengths, example, row["prompt"], row["response"],
            row[LOGPROBS_COLUMN], system_prompt, chat_template,
        )
        counted.rows_without_logprobs = int(not row[LOGPROBS_COLUMN])
        coverage.add(counted)
        per_example.append(targets)
    width = max([1] + [max(len(t.ids), len(t.logprobs)) for targets in per_example for t in targets])
    for example, targets in zip(examples, per_example):
        count = len(targets)
        ids = np.zeros((count, width), dtype=np.int64)
        logprobs = np.zeros((count, width), dtype=np.float32)
        valid = np.zeros((count, width), dtype=bool)
        kinds = np.zeros(count, dtype=np.int8)
        for position, target in enumerate(targets):
            size = len(target.logprobs)
            ids[position, : len(target.ids)] = target.ids
            logprobs[position, :size] = target.logprobs
            valid[position, :size] = True
            kinds[position] = target.kind
        example["topk_ids"], example["topk_logprobs"] = ids, logprobs
        example["topk_valid"], example["row_kind"] = valid, kinds
    return coverage
