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

For a large build (`filter_prompts(..., spill_dir=DIR)`), the MinHash signatures (4·K bytes
per row) go to a file in DIR as each batch is computed and only the LSH band keys (8 bytes
per band and row) and exact keys (8 bytes per row) stay in memory; the reduce step reads
back only the signatures of candidate pairs. The decisions are the same as in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillflow.progress import ProgressBar, progress
from distillflow.records import PromptRecord, Reject
from distillflow.storage.parquet import AnsweredRow
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.dedup import KEEP, exact_keys, first_occurrence
from distillflow.tasks.filters.quality import ResponseChecker

PROMPT_REASONS = ("contaminated", "exact_duplicate", "near_duplicate", "semantic_duplicate", "diversity")
RESPONSE_REASONS = ("empty", "truncated", "too_short", "too_long", "refusal", "repetition", "prompt_echo", "language")

TextsOf = Callable[[np.ndarray], list[str]]  # row indices -> their prompt texts
Embed = Callable[[list[str]], np.ndarray]  # texts -> (n, D) float32, L2-normalised


@dataclass(slots=True)
class PromptFeatures:
    """Per-row values of the prompt-side filters (None where a filter is off).

    exact_keys (N,) uint64; signatures (N, num_perm) uint32 (in memory or a `np.memmap`);
    overlap (N,) float32 = fraction of the prompt's word n-grams found in the eval set;
    band_keys (bands, N) uint64, the LSH keys of the signatures when computed per batch.
    """

    num_rows: int
    exact_keys: np.ndarray | None = None
    signatures: np.ndarray | None = None
    overlap: np.ndarray | None = None
    band_keys: np.ndarray | None = None

    @staticmethod
    def concat(parts: Sequence[PromptFeatures]) -> PromptFeatures:
        def join(name: str) -> np.ndarray | None:
            arrays = [getattr(part, name) for part in parts]
            return None if not arrays or arrays[0] is None else np.concatenate(arrays)

        band_keys = [part.band_keys for part in parts]
        return PromptFeatures(
            num_rows=sum(part.num_rows for part in parts),
            exact_keys=join("exact_keys"),
            signatures=join("signatures"),
            overlap=join("overlap"),
            band_keys=None if not band_keys or band_keys[0] is None else np.concatenate(band_keys, axis=1),
        )


class SignatureSpill:
    """MinHash signatures appended batch by batch to `path` ((N, num_perm) uint32, row-major),
    read back as a `np.memmap`: only the pages of rows that are read come into memory."""

    def __init__(self, path: str | Path, num_perm: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_perm = num_perm
        self.num_rows = 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in `array`

    def append(self, signature: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(signature, dtype=np.uint32).tobytes())
        self.num_rows += signature.shape[0]

    def array(self) -> np.ndarray:
        self._handle.close()
        if self.num_rows == 0:
            return np.empty((0, self.num_perm), dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.num_rows, self.num_perm))


def spilled_prompt_features(texts: Sequence[str], config: FiltersConfig, spill: SignatureSpill) -> PromptFeatures:
    """`prompt_features` with the signatures written to `spill` and only their band keys kept."""
    features = prompt_features(texts, config)
    if features.signatures is not None:
        from distillflow.tasks.filters.minhash import band_keys, banding

        bands, rows = banding(config.near_dedup)
        features.band_keys = band_keys(features.signatures, bands, rows)
        spill.append(features.signatures)
        features.signatures = None
    return features


def prompt_features(texts: Sequence[str], config: FiltersConfig) -> PromptFeatures:
    """The map step over one batch of prompt texts."""
    features = PromptFeatures(num_rows=len(texts))
    if config.exact_dedup:
        features.exact_keys = exact_keys(texts)
    if config.near_dedup.enabled:
        from distillflow.tasks.filters.minhash import signatures

        features.signatures = signatures(texts, config.near_dedup)
    if config.decontamination.eval_files:
        from distillflow.tasks.filters.decontam import contaminated

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
    texts for row indices (exact near-duplicate verification, semantic dedup, diversity). embed: replaces the
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
        from distillflow.tasks.filters.minhash import (
            near_duplicate_details,
            near_duplicates_from_signatures,
        )

        keys = features.band_keys
        if keys is not None and len(alive) < features.num_rows:  # (all rows alive: no copy)
            keys = keys[:, alive]
        result = near_duplicates_from_signatures(
            features.signatures, config.near_dedup, index=alive, keys=keys, texts_of=texts_of
        )
        apply(
            "near_duplicate",
            result.duplicate_of != KEEP,
            result.duplicate_of,
            near_duplicate_details(result, config.near_dedup.threshold),
        )

    embeddings = None
    if config.semantic_dedup.enabled or (config.diversity.keep is not None and config.diversity.embedding == "semantic"):
        from distillflow.tasks.filters.semantic import embed_texts

        embed = embed or (lambda batch: embed_texts(batch, config.semantic_dedup))
    if config.semantic_dedup.enabled and len(alive) > 1:
        from distillflow.tasks.filters.semantic import semantic_details, semantic_duplicates

        embeddings = embed(texts_of(alive))
        result = semantic_duplicates(embeddings, config.semantic_dedup)
        dropped = result.duplicate_of != KEEP
        apply("semantic_duplicate", dropped, result.duplicate_of, semantic_details(result, config.semantic_dedup.threshold))
        embeddings = embeddings[~dropped]

    diversity = config.diversity
    if diversity.keep is not None and diversity.keep < len(alive):
        from distillflow.tasks.filters.diversity import (
            hashed_embeddings,
            nearest_kept_distance,
            select_diverse,
        )

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
    records: list[PromptRecord], config: FiltersConfig, embed: Embed | None = None, spill_dir: str | Path | None = None
) -> tuple[list[PromptRecord], list[Reject]]:
    """Prompt-side filters. Returns (kept records in input order, one Reject per dropped record).

    spill_dir: keep the MinHash signatures in a file there instead of in memory (same result).
    """
    texts = [record.prompt for record in records]
    step = config.batch_size
    spill = None
    if spill_dir is not None and config.near_dedup.enabled:
        spill = SignatureSpill(Path(spill_dir) / "signatures.u32", config.near_dedup.num_perm)
    parts = []
    band_keys = None
    if spill is not None:  # filled batch by batch: no list of parts to concatenate
        from distillflow.tasks.filters.minhash import banding

        band_keys = np.empty((banding(config.near_dedup)[0], len(texts)), dtype=np.uint64)
    with progress("prompt filters", total=len(texts), unit="prompts") as bar:
        for start in range(0, len(texts), step):
            batch = texts[start : start + step]
            if spill is None:
                parts.append(prompt_features(batch, config))
            else:
                part = spilled_prompt_features(batch, config, spill)
                band_keys[:, start : start + len(batch)] = part.band_keys
                part.band_keys = None
                parts.append(part)
            bar.advance(len(batch))
    features = PromptFeatures.concat(parts or [prompt_features([], config)])
    del parts
    if spill is not None:
        features.signatures = spill.array()
        features.band_keys = band_keys
    decisions = resolve_prompt_filters(
        features, lambda rows: [texts[i] for i in rows], [r.strategy for r in records], config, embed=embed
    )
    if spill is not None:
        features.signatures = None
        spill.path.unlink(missing_ok=True)
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


def filter_responses(
    rows: list[AnsweredRow], config: FiltersConfig, shown: bool = True
) -> tuple[list[AnsweredRow], list[Reject]]:
    """Response-side filters. Returns (kept rows in input order, one Reject per dropped row).
    `shown=False`: no progress of its own (a caller filtering batch by batch reports its own)."""
    check = ResponseChecker(config)
    kept: list[AnsweredRow] = []
    rejects: list[Reject] = []
    shown_bar = (
        progress("response filters", total=len(rows), unit="responses") if shown else ProgressBar("", None, mode="off").shown()
    )
    with shown_bar as bar:
        for number, row in enumerate(rows, 1):
            verdict = check(row.get("prompt") or "", row.get("response"), row.get("finish_reason"), row.get("strategy") or "")
            if verdict is None:
                kept.append(row)
            else:
                rejects.append(response_reject(row, verdict.reason, verdict.detail))
            if not number % 256:
                bar.advance(256)
        bar.advance(len(rows) % 256)
    return kept, rejects
