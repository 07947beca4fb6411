"""Teacher logit capture: add the teacher's top-k logprobs of every supervised token to a dataset.

For each row, `training.data.encode_example` gives `input_ids` and `labels` (-100 except on
supervised response tokens) exactly as training will see them. The teacher scores
`input_ids` in one forward pass; for each supervised index i (labels[i] != -100, i ≥ 1),
position t of the stored blob is the teacher's top-k of the distribution that predicts
token i, i.e. the logits at index i-1. So blob row t lines up with the t-th supervised
token of the example, which is what the kd_topk objective reads.

Two scorers produce the same (T, k) arrays:
- `LocalScorer`: a Hugging Face model directory, batched float32 forward passes (CPU/GPU).
- `VllmScorer`: an OpenAI-compatible vLLM server; the completions endpoint scores a list
  of token ids with `prompt_logprobs = k` (entry i of `prompt_logprobs` is the distribution
  that predicts token i, the same convention as above, shifted by one).

With `capture.method: sampled` (local only) each position holds instead the distinct ids of
k tokens drawn from the teacher's distribution, with log(draw count / k) as logprobs, in the
same columns and codec (`tasks.capture.sampling`); the shards' provenance and the manifest's
`capture.method` say which, and training reads it from there.

New columns: `teacher_topk` (binary, `storage.topk` codec), `teacher_topk_k` (int16),
`teacher_topk_model` (string). Each shard is rewritten atomically and records what it was
captured with, so a rerun skips the shards already done; the manifest is written last.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillflow.config import ConfigError, DistillConfig, stage_dirs
from distillflow.progress import artifact_key_for, progress
from distillflow.runs import get_run_logger
from distillflow.storage.add_columns import (
    add_columns_atomic,
    column_compressed_bytes,
    read_provenance,
)
from distillflow.storage.atomic import write_json_atomic
from distillflow.storage.card import refresh_card
from distillflow.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    captured_manifest,
    read_manifest,
    remove_manifest,
    write_manifest,
)
from distillflow.storage.parquet import ShardInfo, file_sha256, list_shards
from distillflow.storage.topk import (
    GAP_SCALE,
    MAX_DELTA_NATS,
    MAX_LOGPROB_ERROR,
    MAX_PROB_ERROR,
    VERSION,
    encode_topk,
    topk_shape,
)
from distillflow.training.chat_template import chat_template_text, template_stops
from distillflow.training.prompt_logprobs import (
    TopK,
    prompt_logprobs_to_topk,
    request_prompt_logprobs,
)
from distillflow.training.vocabulary import load_tokenizer

IGNORE_INDEX = -100
TOPK_FIELDS = [
    pa.field("teacher_topk", pa.binary()),
    pa.field("teacher_topk_k", pa.int16()),
    pa.field("teacher_topk_model", pa.string()),
]
# Kept next to the manifest while an in-place capture runs: the manifest of the dataset
# before capture, so that a crashed run can be resumed.
PRE_CAPTURE_MANIFEST = ".manifest.pre-capture.json"


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureSettings:
    """Everything a capture needs, resolved from the config (defaults filled in)."""

    source: str  # "local" | "vllm"
    model: str
    tokenizer: str
    k: int
    input_dir: str
    output_dir: str
    system_prompt: str | None
    max_length: int
    batch_size: int
    rows_per_read: int
    device: str
    base_url: str | None
    api_key_env: str | None
    max_concurrency: int
    timeout_s: float
    max_retries: int
    chat_template: str | None = None  # the setting (preset, Jinja or file); None: the tokenizer's own
    method: str = "topk"  # "topk" | "sampled" (tasks.capture.sampling)
    seed: int = 0  # sampled: seed of the draws, with each row's id and position

    @property
    def in_place(self) -> bool:
        return Path(self.input_dir).resolve() == Path(self.output_dir).resolve()

    def fingerprint(self) -> dict[str, Any]:
        """What makes a captured shard stale when it changes."""
        fingerprint = {
            "codec_version": VERSION,
            "source": self.source,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "k": self.k,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
        }
        if self.method != "topk":  # (absent for top-k, so earlier top-k captures stay current)
            fingerprint["method"] = self.method
            fingerprint["seed"] = self.seed
        if self.chat_template is not None:  # the text, not the setting: an edited file makes shards stale
            fingerprint["chat_template"] = chat_template_text(self.chat_template)
            if template_stops(self.chat_template):  # responses are cut at its turn end (encode_example)
                fingerprint["turn_stops"] = list(template_stops(self.chat_template))
        return fingerprint


def resolve_capture_settings(config: DistillConfig) -> CaptureSettings:
    """Fill the `capture:` section's defaults from `teacher:` and `training:`."""
    capture = config.capture
    if capture is None:
        raise ConfigError(
            "the config has no `capture:` section; add one, e.g.\n"
            "capture:\n  source: local\n  model: path/to/teacher\n  k: 20"
        )
    training = config.training
    model = capture.model or config.teacher.model
    # Positions follow the student's tokenisation: the student's tokenizer when known. kd_greybox
    # aligns tokenisations at train time (training.greybox), so there the teacher tokenises itself.
    greybox = training is not None and training.objective == "kd_greybox"
    tokenizer = capture.tokenizer or (training.student if training is not None and not greybox else None)
    if tokenizer is None and capture.source == "local":
        tokenizer = Path(model)
    elif tokenizer is None:  # vllm: the teacher's (a config with neither is rejected when it loads)
        assert training is not None
        tokenizer = training.teacher
    dirs = stage_dirs(config)
    if capture.system_prompt is not None:
        system_prompt = capture.system_prompt
    elif training is not None and training.system_prompt is not None:
        system_prompt = training.system_prompt
    else:
        system_prompt = config.teacher.system_prompt
    # Training's tokenisation decides the positions: its template (which defaults to the top-level
    # one) and max_length; a config where capture's differ is rejected when it loads.
    training_template = training.chat_template if training is not None and not greybox else None
    chat_template = capture.chat_template or training_template or config.chat_template
    max_length = capture.max_length or (training.max_length if training else 2048)
    return CaptureSettings(
        source=capture.source,
        model=str(model),
        tokenizer=str(tokenizer),
        k=capture.k,
        input_dir=str(dirs.capture_input),
        output_dir=str(dirs.capture_output),
        system_prompt=system_prompt,
        chat_template=chat_template,
        max_length=max_length,
        batch_size=capture.batch_size,
        rows_per_read=capture.rows_per_read,
        device=capture.device,
        base_url=capture.base_url or config.teacher.base_url,
        api_key_env=capture.api_key_env or config.teacher.api_key_env,
        max_concurrency=capture.max_concurrency,
        timeout_s=capture.timeout_s,
        max_retries=capture.max_retries,
        method=capture.method,
        seed=capture.seed,
    )


# -- alignment ------------------------------------------------------------------------------


def supervised_targets(labels: Sequence[int]) -> np.ndarray:
    """Indices i ≥ 1 with labels[i] != -100: the tokens the teacher's top-k must predict.

    The distribution predicting token i comes from the logits at index i-1, so index 0
    (never a target after the causal shift) is excluded.
    """
    labels = np.asarray(labels)
    if len(labels) and labels[0] != IGNORE_INDEX:
        raise ValueError(
            "the first token of an example is supervised, so no teacher distribution predicts "
            "it; the chat template must put at least one token before the answer"
        )
    return np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1


# The training tokenizer loader, cached: capture reads the same tokenizer for every batch.
cached_tokenizer = functools.lru_cache(maxsize=2)(load_tokenizer)


def encode_rows(settings: CaptureSettings, prompts: Sequence[str], responses: Sequence[str]):
    """(input_ids, targets) of each row, tokenised exactly as training tokenises it."""
    from distillflow.training.data import encode_example

    tokenizer = cached_tokenizer(settings.tokenizer)
    template = chat_template_text(settings.chat_template) if settings.chat_template else None
    encoded = []
    for prompt, response in zip(prompts, responses):
        example = encode_example(
            tokenizer, prompt, response, system_prompt=settings.system_prompt, max_length=settings.max_length,
            chat_template=template,
        )
        input_ids = [int(token) for token in example["input_ids"]]
        encoded.append((input_ids, supervised_targets(example["labels"])))
    return encoded


# -- scorers --------------------------------------------------------------------------------


class LocalScorer:
    """Top-k logprobs from a local Hugging Face causal LM (float32 forward passes).

    Memory: one forward pass holds (batch_size, longest sequence, vocabulary) float32
    logits; lower capture.batch_size for long examples or large vocabularies.
    """

    def __init__(self, model_dir: str, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"capture.model is {model_dir!r}, which is not a model directory (no config.json); "
                "with source: local it must be a directory saved by save_pretrained"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.vocab_size = self.model.config.vocab_size

    def topk(self, sequences: list[list[int]], targets: list[np.ndarray], k: int, batch_size: int) -> list[TopK]:
        import torch

        if k > self.vocab_size:
            raise ValueError(f"capture.k = {k} exceeds the teacher's vocabulary of {self.vocab_size}")
        results: list[TopK | None] = [None] * len(sequences)
        for index, logprobs in self.target_logprobs(sequences, targets, batch_size):
            values, ids = torch.topk(logprobs, k, dim=-1)  # (T, k) each, descending
            results[index] = (ids.cpu().numpy().astype(np.int64), values.cpu().numpy())
        return results  # type: ignore[return-value]

    def sampled(
        self, sequences: list[list[int]], targets: list[np.ndarray], k: int, batch_size: int,
        row_ids: Sequence[str], seed: int,
    ) -> list[TopK]:
        """k draws from the teacher's distribution per position: (distinct ids, log draw
        frequencies), padded to k (`tasks.capture.sampling.sample_sparse_targets`)."""
        from distillflow.tasks.capture.sampling import sample_sparse_targets

        if k > self.vocab_size:
            raise ValueError(f"capture.k = {k} exceeds the teacher's vocabulary of {self.vocab_size}")
        results: list[TopK | None] = [None] * len(sequences)
        for index, logprobs in self.target_logprobs(sequences, targets, batch_size):
            results[index] = sample_sparse_targets(logprobs, k, row_ids[index], seed)
        return results  # type: ignore[return-value]

    def target_logprobs(self, sequences: list[list[int]], targets: list[np.ndarray], batch_size: int):
        """Yield (index, (T, V) float32 log-probabilities of the teacher at the row's targets)."""
        import torch

        largest = max((max(ids) for ids in sequences if ids), default=0)
        if largest >= self.vocab_size:
            raise ValueError(
                f"token id {largest} is outside the teacher's vocabulary of {self.vocab_size}; "
                "capture.tokenizer must be a tokenizer that teacher and student share"
            )
        # Similar lengths share a batch (less padding); right padding + attention mask leaves
        # the logits of real tokens unchanged (causal attention never looks right).
        order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(sequences[index]) for index in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, L)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, L)
            for row, index in enumerate(chunk):
                length = len(sequences[index])
                input_ids[row, :length] = torch.tensor(sequences[index])
                attention_mask[row, :length] = 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits  # (B, L, V)
                for row, index in enumerate(chunk):
                    positions = torch.as_tensor(targets[index] - 1, device=self.device)  # (T,)
                    yield index, torch.log_softmax(logits[row, positions].float(), dim=-1)  # (T, V)


class VllmScorer:
    """Top-k logprobs from an OpenAI-compatible vLLM server (completions + prompt_logprobs)."""

    def __init__(self, settings: CaptureSettings):
        from openai import OpenAI

        api_key = os.environ.get(settings.api_key_env or "", "") or "EMPTY"
        # The client retries connection errors, 408/409/429 and 5xx with backoff (I/O only).
        self.client = OpenAI(
            base_url=settings.base_url,
            api_key=api_key,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )
        self.model = settings.model
        self.max_concurrency = settings.max_concurrency

    def _score(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        return request_prompt_logprobs(self.client, self.model, sequences, k)

    def topk(self, sequences: list[list[int]], targets: list[np.ndarray], k: int, batch_size: int) -> list[TopK]:
        chunks = [list(range(start, min(start + batch_size, len(sequences)))) for start in range(0, len(sequences), batch_size)]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            answers = list(pool.map(lambda chunk: self._score([sequences[i] for i in chunk], k), chunks))
        results: list[TopK] = [None] * len(sequences)  # type: ignore[list-item]
        for chunk, scored in zip(chunks, answers):
            for index, prompt_logprobs in zip(chunk, scored):
                results[index] = prompt_logprobs_to_topk(prompt_logprobs, targets[index], k)
        return results


@functools.lru_cache(maxsize=1)
def _local_scorer(model_dir: str, device: str) -> LocalScorer:
    return LocalScorer(model_dir, device)  # loaded once per process, reused by every shard


def make_scorer(settings: CaptureSettings) -> LocalScorer | VllmScorer:
    match settings.source:
        case "local":
            return _local_scorer(settings.model, settings.device)
        case "vllm":
            return VllmScorer(settings)
    raise ValueError(f"unknown capture source {settings.source!r}")


# -- shards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardCapture:
    """What capturing one shard produced."""

    shard: dict[str, Any]  # ShardInfo.to_dict() of the written shard
    rows: int
    positions: int  # supervised tokens, summed over rows
    blob_bytes: int  # sum of teacher_topk blob sizes
    stored_bytes: int  # compressed on-disk bytes of the teacher_topk column
    skipped: bool  # already captured with the same settings


def shard_is_captured(in_path: Path, out_path: Path, settings: CaptureSettings) -> dict[str, Any] | None:
    """The provenance of `out_path` if it already holds this capture of `in_path`, else None."""
    if not out_path.is_file():
        return None
    provenance = read_provenance(out_path)
    if not provenance or provenance.get("capture") != settings.fingerprint():
        return None
    if not settings.in_place and provenance.get("source_sha256") != file_sha256(in_path):
        return None
    return provenance


def captured_shard_stats(path: Path) -> dict[str, int]:
    """rows, positions, blob_bytes and stored_bytes of a shard that has a teacher_topk column."""
    blobs = pq.read_table(path, columns=["teacher_topk"]).column("teacher_topk").to_pylist()
    return {
        "rows": len(blobs),
        "positions": sum(topk_shape(blob)[0] for blob in blobs if blob is not None),
        "blob_bytes": sum(len(blob) for blob in blobs if blob is not None),
        "stored_bytes": column_compressed_bytes(path, "teacher_topk"),
    }


def capture_shard(in_path: Path, settings: CaptureSettings) -> ShardCapture:
    """Add the top-k columns to one shard (skipped if it is already captured)."""
    out_root = Path(settings.output_dir)
    out_path = out_root / "data" / in_path.name
    if shard_is_captured(in_path, out_path, settings) is not None:
        stats = captured_shard_stats(out_path)
        info = ShardInfo(
            str(out_path.relative_to(out_root)), stats["rows"], out_path.stat().st_size, file_sha256(out_path)
        )
        return ShardCapture(info.to_dict(), skipped=True, **stats)

    scorer = make_scorer(settings)
    totals = {"rows": 0, "positions": 0, "blob_bytes": 0}
    rows_in_shard = pq.ParquetFile(in_path).metadata.num_rows

    def topk_columns(batch: pa.RecordBatch) -> list[pa.Array]:
        prompts = batch.column("prompt").to_pylist()
        responses = batch.column("response").to_pylist()
        encoded = encode_rows(settings, prompts, responses)
        sequences = [input_ids for input_ids, _ in encoded]
        targets = [target for _, target in encoded]
        if settings.method == "sampled":
            row_ids = [str(row_id) for row_id in batch.column("id").to_pylist()]
            topks = scorer.sampled(sequences, targets, settings.k, settings.batch_size, row_ids, settings.seed)
        else:
            topks = scorer.topk(sequences, targets, settings.k, settings.batch_size)
        blobs = [encode_topk(ids, logprobs) for ids, logprobs in topks]
        totals["rows"] += batch.num_rows
        totals["positions"] += sum(len(target) for target in targets)
        totals["blob_bytes"] += sum(len(blob) for blob in blobs)
        bar.advance(batch.num_rows)
        return [
            pa.array(blobs, type=pa.binary()),
            pa.array([settings.k] * batch.num_rows, type=pa.int16()),
            pa.array([settings.model] * batch.num_rows, type=pa.string()),
        ]

    provenance = {"capture": settings.fingerprint(), "source_sha256": file_sha256(in_path)}
    key = artifact_key_for("capture", Path(out_root).name, in_path.stem, "progress")
    with progress(f"capture {in_path.name}", total=rows_in_shard, unit="rows", artifact_key=key) as bar:
        info = add_columns_atomic(
            in_path, out_path, TOPK_FIELDS, topk_columns, provenance, out_root, settings.rows_per_read
        )
    stored = column_compressed_bytes(out_path, "teacher_topk")
    return ShardCapture(info.to_dict(), skipped=False, stored_bytes=stored, **totals)


SAMPLED_NOTE = {
    "sampled_note": "each position holds the distinct ids of k draws from the teacher's distribution "
    "with logprob = log(draw count / k) (weights sum to 1; the expected weight of a token is its "
    "teacher probability); spare slots hold undrawn tokens at weight 0; train with kd_topk at "
    "temperature 1 and forward_kl",
}


# -- dataset --------------------------------------------------------------------------------


def source_manifest(settings: CaptureSettings) -> dict[str, Any]:
    """The input dataset's manifest (for a resumed in-place capture: the copy kept aside)."""
    input_dir = Path(settings.input_dir)
    kept_aside = input_dir / PRE_CAPTURE_MANIFEST
    if not (input_dir / MANIFEST_NAME).is_file() and kept_aside.is_file():
        return json.loads(kept_aside.read_text(encoding="utf-8"))
    return read_manifest(input_dir)


def check_capture_input(settings: CaptureSettings) -> list[Path]:
    """The input shards; raises ConfigError when the input is not a finished dataset."""
    input_dir = Path(settings.input_dir)
    shards = list_shards(input_dir / "data")
    if not shards:
        raise ConfigError(
            f"{input_dir}/data has no .parquet shards; point capture.input_dir at a dataset "
            "written by `distill build`"
        )
    try:
        Manifest.of(source_manifest(settings), f"{input_dir}/{MANIFEST_NAME}")
    except (FileNotFoundError, ValueError) as error:  # ManifestError and bad JSON are ValueErrors
        raise ConfigError(str(error)) from None
    return shards


def plan_capture(settings: CaptureSettings) -> list[Path]:
    """The input shards to capture; marks the output dataset incomplete until `finish_capture`."""
    input_dir, output_dir = Path(settings.input_dir), Path(settings.output_dir)
    shards = check_capture_input(settings)
    manifest = source_manifest(settings)
    if settings.in_place:
        kept_aside = input_dir / PRE_CAPTURE_MANIFEST
        if not kept_aside.is_file():
            write_manifest_copy(kept_aside, manifest)
        remove_manifest(output_dir)
    else:
        remove_manifest(output_dir)
        (output_dir / "data").mkdir(parents=True, exist_ok=True)
        if (input_dir / "rejects").is_dir():
            shutil.copytree(input_dir / "rejects", output_dir / "rejects", dirs_exist_ok=True)
        if (input_dir / "README.md").is_file():
            shutil.copy2(input_dir / "README.md", output_dir / "README.md")
    return shards


def write_manifest_copy(path: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(path, manifest)


def capture_summary(settings: CaptureSettings, results: Sequence[ShardCapture]) -> dict[str, Any]:
    """The manifest's `capture` record: what was captured, its size, and the codec's error."""
    positions = sum(result.positions for result in results)
    return {
        **settings.fingerprint(),
        "method": settings.method,
        **(SAMPLED_NOTE if settings.method == "sampled" else {}),
        "input_dir": settings.input_dir,
        "columns": [field.name for field in TOPK_FIELDS],
        "rows": sum(result.rows for result in results),
        "positions": positions,
        "shards_captured": sum(not result.skipped for result in results),
        "shards_skipped": sum(result.skipped for result in results),
        "blob_bytes_per_token": round(sum(r.blob_bytes for r in results) / positions, 2) if positions else None,
        "stored_bytes_per_token": round(sum(r.stored_bytes for r in results) / positions, 2) if positions else None,
        "gap_encoding": f"uint16 round(sqrt(top1 - logprob) * {GAP_SCALE:g})",
        "max_abs_logprob_error_nats": MAX_LOGPROB_ERROR,
        "max_abs_prob_error": MAX_PROB_ERROR,
        "saturation_nats_below_top1": MAX_DELTA_NATS,
        "error_note": "ids and the top-1 logprob are exact; a logprob g nats below the top-1 "
        "is within sqrt(g)/8192 nats (max_abs_logprob_error_nats at the saturation end), every "
        "probability within max_abs_prob_error; gaps beyond saturation_nats_below_top1 decode "
        "at that gap",
    }


def finish_capture(settings: CaptureSettings, results: Sequence[ShardCapture]) -> dict[str, Any]:
    """Write the output manifest (last): the input's, with new shard digests and `capture`."""
    rewritten = {result.shard["path"]: result.shard for result in results}
    summary = capture_summary(settings, results)
    manifest = captured_manifest(source_manifest(settings), rewritten, summary)
    output_dir = Path(settings.output_dir)
    refresh_card(output_dir, manifest)  # the shards have new columns: the header's features follow
    write_manifest(output_dir, manifest)
    (Path(settings.input_dir) / PRE_CAPTURE_MANIFEST).unlink(missing_ok=True)
    return summary


def capture_dataset(settings: CaptureSettings) -> dict[str, Any]:
    """The whole capture without Prefect: plan, every shard, manifest. Returns the summary."""
    shards = plan_capture(settings)
    return finish_capture(settings, [capture_shard(path, settings) for path in shards])


# -- Prefect tasks --------------------------------------------------------------------------


@task(name="capture-shard", cache_policy=NO_CACHE)
def capture_shard_task(in_path: Path, settings: CaptureSettings) -> ShardCapture:
    """One shard: teacher top-k for every row, written atomically (skipped when done)."""
    result = capture_shard(in_path, settings)
    verb = "already captured" if result.skipped else "captured"
    get_run_logger().info(
        "%s %s: %d rows, %d positions, %.1f bytes/token stored",
        verb, result.shard["path"], result.rows, result.positions,
        result.stored_bytes / max(result.positions, 1),
    )
    return result


@task(name="plan-capture", cache_policy=NO_CACHE)
def plan_capture_task(settings: CaptureSettings) -> list[Path]:
    return plan_capture(settings)


@task(name="finish-capture", cache_policy=NO_CACHE)
def finish_capture_task(settings: CaptureSettings, results: list[ShardCapture]) -> dict[str, Any]:
    return finish_capture(settings, results)
