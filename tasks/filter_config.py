"""Config of the filtering stage (the `filters:` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NearDedupConfig(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity threshold.")


class SemanticDedupConfig(_Strict):
    enabled: bool = False
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="Cosine similarity threshold.")


class FiltersConfig(_Strict):
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    semantic_dedup: SemanticDedupConfig = SemanticDedupConfig()
    drop_truncated: bool = True
    min_response_chars: int = Field(1, ge=0)
