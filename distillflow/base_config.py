"""The base class of every config model: an unknown key is an error (a misspelt key must
never be ignored silently), and assigning to a field validates the new value."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
