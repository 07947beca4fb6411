"""Config of prompt generation (the `prompts:` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromptsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_prompts: int = Field(1000, ge=1, description="Target prompt count after generation, before filtering.")
    strategies: dict[str, float] = Field(
        default_factory=lambda: {"seed": 1.0, "edge_case": 0.3, "adversarial": 0.3, "evolve": 0.0},
        description="Mix weights per strategy family.",
    )
    random_seed: int = 0
