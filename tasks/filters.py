"""The filtering stage of `distill build` as two plain functions.

`filter_prompts` runs before the teacher is paid: decontamination, exact dedup, near-dup
(MinHash) dedup, semantic dedup, diversity selection, in that order, each on the rows the
previous one kept. `filter_responses` runs after: empty, truncated, length bounds,
refusal, repetition, prompt echo, language.

Both keep the input order of what they keep, and return one `Reject` per dropped row with
a reason code (and, for duplicates, `duplicate_of` = the id of the kept row). The kept row
of a duplicate cluster is the first in input order, so batch sizes and worker counts never
change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillflow.records import PromptRecord, Reject
from tasks.dedup import KEEP, exact_duplicates
from tasks.filter_config import FiltersConfig
from tasks.quality import ResponseChecker

PROMPT_REASONS = ("contaminated", "exact_duplicate", "near_duplicate", "semantic_duplicate", "diversity")
RESPONSE_REASONS = ("empty", "truncated", "too_short", "too_long", "refusal", "repetition", "prompt_echo", "language")


@dataclass(slots=True)
class StageResult:
    """What one prompt-side stage decided for the N rows it saw.

    duplicate_of: (N,) int64, index (into the same N rows) of the kept row, -1 = keep.
    dropped: (N,) bool, rows dropped for a reason that is not a duplicate (contaminated, diversity).
    detail: per dropped row, a short human-readable detail.
    """

    duplicate_of: np.ndarray
    dropped: np.ndarray
    detail: dict[int, str]


def _duplicates_result(duplicate_of: np.ndarray, detail: dict[int, str] | None = None) -> StageResult:
    return StageResult(duplicate_of, duplicate_of != KEEP, detail or {})


def run_prompt_stages(texts: Sequence[str], strategies: Sequence[str], config: FiltersConfig, embed=None):  # noqa: ANN001, ANN201
    """Run every enabled prompt-side stage over `texts`.

    Yields nothing; returns (keep mask (N,) bool, list of (row, reason, detail, kept_row or -1)).
    `embed` optionally replaces the sentence-embedding function (texts -> (n, d) float32,
    L2-normalised), e.g. with a model already loaded.
    """
    num_rows = len(texts)
    alive = np.arange(num_rows)  # indices of rows still kept, in input order
    drops: list[tuple[int, str, str, int]] = []

    def apply(reason: str, result: StageResult) -> None:
        nonlocal alive
        for local in np.flatnonzero(result.dropped):
            kept_local = int(result.duplicate_of[local])
            drops.append(
                (
                    int(alive[local]),
                    reason,
                    result.detail.get(int(local), ""),
                    int(alive[kept_local]) if kept_local != KEEP else KEEP,
                )
            )
        alive = alive[~result.dropped]

    if config.decontamination.eval_files:
        from tasks.decontam import contamination_stage

        apply("contaminated", contamination_stage([texts[i] for i in alive], config.decontamination))
    if config.exact_dedup:
        duplicate_of = exact_duplicates(texts[i] for i in alive)
        detail = {int(row): "normalised text equal" for row in np.flatnonzero(duplicate_of != KEEP)}
        apply("exact_duplicate", _duplicates_result(duplicate_of, detail))
    if config.near_dedup.enabled:
        from tasks.minhash import near_duplicate_stage

        apply("near_duplicate", near_duplicate_stage([texts[i] for i in alive], config.near_dedup))
    embeddings = None
    if config.semantic_dedup.enabled:
        from tasks.semantic import embed_texts, semantic_duplicate_stage

        embed = embed or (lambda batch: embed_texts(batch, config.semantic_dedup))
        embeddings = embed([texts[i] for i in alive])
        result = semantic_duplicate_stage(embeddings, config.semantic_dedup)
        apply("semantic_duplicate", result)
        embeddings = embeddings[~result.dropped]
    if config.diversity.keep is not None and config.diversity.keep < len(alive):
        from tasks.diversity import diversity_stage

        apply(
            "diversity",
            diversity_stage(
                [texts[i] for i in alive], [strategies[i] for i in alive], config, embeddings=embeddings, embed=embed
            ),
        )
    keep = np.zeros(num_rows, dtype=bool)
    keep[alive] = True
    return keep, drops


def filter_prompts(
    records: list[PromptRecord], config: FiltersConfig, embed=None  # noqa: ANN001
) -> tuple[list[PromptRecord], list[Reject]]:
    """Prompt-side filters. Returns (kept records in input order, one Reject per dropped record)."""
    keep, drops = run_prompt_stages(
        [record.prompt for record in records], [record.strategy for record in records], config, embed=embed
    )
    rejects = [
        Reject.of(
            records[row], reason, detail, duplicate_of=records[kept].id if kept != KEEP else None
        )
        for row, reason, detail, kept in sorted(drops)
    ]
    return [record for record, flag in zip(records, keep) if flag], rejects


def response_reject(row: dict[str, Any], reason: str, detail: str) -> Reject:
    return Reject(
        id=row["id"],
        prompt=row["prompt"],
        strategy=row.get("strategy") or "",
        parent_id=row.get("parent_id"),
        reason=reason,
        detail=detail,
        response=row.get("response"),
    )


def filter_responses(rows: list[dict[str, Any]], config: FiltersConfig) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Response-side filters. Returns (kept rows in input order, one Reject per dropped row)."""
    check = ResponseChecker(config)
    kept: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    for row in rows:
        verdict = check(row.get("prompt") or "", row.get("response"), row.get("finish_reason"))
        if verdict is None:
            kept.append(row)
        else:
            rejects.append(response_reject(row, verdict.reason, verdict.detail))
    return kept, rejects
