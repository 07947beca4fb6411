"""Config of student training (the `training:` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
