"""The filtering stage of `distill build` as plain functions.

`filter_prompts` runs before the teacher is paid: decontamination, exact dedup, near-dup
(MinHash) dedup, semantic dedup, diversity selection, in that order, each on the rows the
previous one kept. `filter_responses` runs after: empty, truncated, length bounds,
refusal, repetition, prompt echo, language.

Both keep the input order of what they keep and return one `Reject` per dropped row with a
reason code (and, for duplicates, `duplicate_of` = the id of the kept row). The prompt side
is split in two so it scales past one batch:

- map, `prompt_features`: per batch, per row values (exact key, MinHash signature, eval
  overlap). Each row's values depend only on its text, so batches can be computed in any
  order, by any number of workers.
- reduce, `resolve_prompt_filters`: one pass over the concatenated features of the whole
  dataset decides every drop; the kept row of a duplicate cluster is the first in input
  order. Hence the result never depends on batch size or worker count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distillflow.progress import progress
from distillflow.records import PromptRecord, Reject
from distillflow.tasks.dedup import KEEP, exact_keys, first_occurrence
from distillflow.tasks.filter_config import FiltersConfig
from distillflow.tasks.quality import ResponseChecker

PROMPT_REASONS = ("contaminated", "exact_duplicate", "near_duplicate", "semantic_duplicate", "diversity")
RESPONSE_REASONS = ("empty", "truncated", "too_short", "too_long", "refusal", "repetition", "prompt_echo", "language")

TextsOf = Callable[[np.ndarray], list[str]]  # row indices -> their prompt texts
Embed = Callable[[list[str]], np.ndarray]  # texts -> (n, D) float32, L2-normalised


@dataclass(slots=True)
class PromptFeatures:
    """Per-row values of the prompt-side filters (None where a filter is off).

    exact_keys (N,) uint64; signatures (N, num_perm) uint32; overlap (N,) float32 =
    fraction of the prompt's word n-grams found in the eval set.
    """

    num_rows: int
    exact_keys: np.ndarray | None = None
    signatures: np.ndarray | None = None
    overlap: np.ndarray | None = None

    @staticmethod
    def concat(parts: Sequence[PromptFeatures]) -> PromptFeatures:
        def join(name: str) -> np.ndarray | None:
            arrays = [getattr(part, name) for part in parts]
            return None if not arrays or arrays[0] is None else np.concatenate(arrays)

        return PromptFeatures(
            num_rows=sum(part.num_rows for part in parts),
            exact_keys=join("exact_keys"),
            signatures=join("signatures"),
            overlap=join("overlap"),
        )


def prompt_features(texts: Sequence[str], config: FiltersConfig) -> PromptFeatures:
    """The map step over one batch of prompt texts."""
    features = PromptFeatures(num_rows=len(texts))
    if config.exact_dedup:
        features.exact_keys = exact_keys(texts)
    if config.near_dedup.enabled:
        from distillflow.tasks.minhash import signatures

        features.signatures = signatures(texts, config.near_dedup)
    if config.decontamination.eval_files:
        from distillflow.tasks.decontam import contaminated

        features.overlap = contaminated(texts, config.decontamination)[1]
    return features


@dataclass(slots=True)
class PromptDrop:
    row: int  # index in the input
    reason: str
    detail: str
    duplicate_of: int = KEEP  # index of the kept row, for duplicate reasons


@dataclass(slots=True)
class PromptDecisions:
    keep: np.ndarray  # (N,) bool
    drops: list[PromptDrop] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for drop in self.drops:
            counts[drop.reason] = counts.get(drop.reason, 0) + 1
        return counts


def resolve_prompt_filters(
    features: PromptFeatures,
    texts_of: TextsOf,
    strategies: Sequence[str],
    config: FiltersConfig,
    alive: np.ndarray | None = None,
    embed: Embed | None = None,
) -> PromptDecisions:
    """The reduce step: decide every prompt-side drop over the whole dataset.

    alive: row indices still in play (default: all), in input order; rows outside it are
    neither kept nor reported (another stage already dropped them). texts_of: fetches prompt
    texts for row indices (semantic dedup and diversity only). embed: replaces the
    configured sentence-embedding model (e.g. one already loaded).
    """
    alive = np.arange(features.num_rows) if alive is None else np.asarray(alive, dtype=np.int64)
    drops: list[PromptDrop] = []

    def apply(reason: str, dropped: np.ndarray, duplicate_of: np.ndarray | None, details: dict[int, str]) -> None:
        """dropped/duplicate_of are local to `alive`; record and shrink `alive`."""
        nonlocal alive
        for local in np.flatnonzero(dropped):
            kept = KEEP if duplicate_of is None else int(alive[duplicate_of[local]])
            drops.append(PromptDrop(int(alive[local]), reason, details.get(int(local), ""), kept))
        alive = alive[~dropped]

    if features.overlap is not None:
        overlap = features.overlap[alive]
        dropped = overlap >= config.decontamination.min_overlap
        details = {
            int(i): f"{overlap[i]:.2f} of word {config.decontamination.ngram}-grams found in the eval set"
            for i in np.flatnonzero(dropped)
        }
        apply("contaminated", dropped, None, details)

    if features.exact_keys is not None:
        duplicate_of = first_occurrence(features.exact_keys[alive])
        dropped = duplicate_of != KEEP
        apply("exact_duplicate", dropped, duplicate_of, {int(i): "normalised text equal" for i in np.flatnonzero(dropped)})

    if features.signatures is not None:
        from distillflow.tasks.minhash import near_duplicate_details, near_duplicates_from_signatures

        result = near_duplicates_from_signatures(features.signatures, config.near_dedup, index=alive)
        apply(
            "near_duplicate",
            result.duplicate_of != KEEP,
            result.duplicate_of,
            near_duplicate_details(result, config.near_dedup.threshold),
        )

    embeddings = None
    if config.semantic_dedup.enabled or (config.diversity.keep is not None and config.diversity.embedding == "semantic"):
        from distillflow.tasks.semantic import embed_texts

        embed = embed or (lambda batch: embed_texts(batch, config.semantic_dedup))
    if config.semantic_dedup.enabled and len(alive) > 1:
        from distillflow.tasks.semantic import semantic_details, semantic_duplicates

        embeddings = embed(texts_of(alive))
        result = semantic_duplicates(embeddings, config.semantic_dedup)
        dropped = result.duplicate_of != KEEP
        apply("semantic_duplicate", dropped, result.duplicate_of, semantic_details(result, config.semantic_dedup.threshold))
        embeddings = embeddings[~dropped]

    diversity = config.diversity
    if diversity.keep is not None and diversity.keep < len(alive):
        from distillflow.tasks.diversity import hashed_embeddings, nearest_kept_distance, select_diverse

        if diversity.embedding == "hashed":
            embeddings = hashed_embeddings(texts_of(alive))
        elif embeddings is None:
            embeddings = embed(texts_of(alive))
        kept = select_diverse(embeddings, [strategies[i] for i in alive], diversity)
        dropped = np.ones(len(alive), dtype=bool)
        dropped[kept] = False
        rows = np.flatnonzero(dropped)
        distance = nearest_kept_distance(embeddings, kept, rows)
        details = {
            int(row): f"not among {diversity.keep} kept by {diversity.method}; cosine distance {d:.3f} to nearest kept"
            for row, d in zip(rows, distance)
        }
        apply("diversity", dropped, None, details)

    keep = np.zeros(features.num_rows, dtype=bool)
    keep[alive] = True
    return PromptDecisions(keep, sorted(drops, key=lambda drop: drop.row))


def filter_prompts(
    records: list[PromptRecord], config: FiltersConfig, embed: Embed | None = None
) -> tuple[list[PromptRecord], list[Reject]]:
    """Prompt-side filters. Returns (kept records in input order, one Reject per dropped record)."""
    texts = [record.prompt for record in records]
    step = config.batch_size
    parts = []
    with progress("prompt filters", total=len(texts), unit="prompts") as bar:
        for start in range(0, len(texts), step):
            parts.append(prompt_features(texts[start : start + step], config))
            bar.advance(parts[-1].num_rows)
    features = PromptFeatures.concat(parts or [prompt_features([], config)])
    decisions = resolve_prompt_filters(
        features, lambda rows: [texts[i] for i in rows], [r.strategy for r in records], config, embed=embed
    )
    keep = list(decisions.keep)
    rejects = []
    for drop in decisions.drops:
        record = records[drop.row]
        kept_row = records[drop.duplicate_of] if drop.duplicate_of != KEEP else None
        if config.keep_variants_of_parent and is_variant_of(record, kept_row, drop.reason):
            keep[drop.row] = True  # a casing/whitespace/typo variant is meant to look like its seed
            continue
        rejects.append(Reject.of(record, drop.reason, drop.detail, duplicate_of=kept_row.id if kept_row else None))
    return [record for record, flag in zip(records, keep) if flag], rejects


VARIANT_FAMILIES = ("adversarial", "edge_case")
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")


def is_variant_of(record: PromptRecord, kept: PromptRecord | None, reason: str) -> bool:
    """A rule-based variant that only duplicates its own parent (the perturbation is the point)."""
    return (
        kept is not None
        and reason in DUPLICATE_REASONS
        and record.parent_id is not None
        and record.parent_id == kept.id
        and record.strategy.split(":", 1)[0] in VARIANT_FAMILIES
    )


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
    with progress("response filters", total=len(rows), unit="responses") as bar:
        for row in rows:
            verdict = check(row.get("prompt") or "", row.get("response"), row.get("finish_reason"), row.get("strategy") or "")
            if verdict is None:
                kept.append(row)
            else:
                rejects.append(response_reject(row, verdict.reason, verdict.detail))
            bar.advance()
    return kept, rejects
