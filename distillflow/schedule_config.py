"""The `schedule:` section: when each Prefect deployment of a config runs by itself.

    schedule:
      build: {cron: "0 3 * * *", timezone: Europe/Berlin}
      train: {interval_s: 86400, active: false}   # registered, paused until switched on in the UI

One entry per deployment (the keys are the deployment names of `distill serve` and
`distill deploy`, see docs/operations.md); a deployment without an entry runs only when
started by hand (the UI's Run button, `prefect deployment run`, the API).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import Field, field_validator, model_validator

from distillflow.base_config import StrictModel

# Deployment names, in the order `distill serve` registers them.
DEPLOYMENT_NAMES = ("build", "capture", "train", "eval", "sweep", "mine", "run")


class ScheduleEntry(StrictModel):
    cron: str | None = Field(
        None, description='A cron expression (minute hour day-of-month month day-of-week), e.g. "0 3 * * *".'
    )
    interval_s: float | None = Field(None, gt=0, description="Run every this many seconds (instead of cron).")
    timezone: str = Field(
        "UTC", description="IANA time zone the cron expression (or the interval's anchor) is read in, e.g. Europe/Berlin."
    )
    active: bool = Field(
        True, description="false: the schedule is registered but paused; switch it on in the UI's deployment page."
    )

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from prefect._internal.schemas.validators import validate_cron_string

        try:
            return validate_cron_string(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a cron expression; write five fields: minute hour day-of-month "
                'month day-of-week, e.g. "0 3 * * *" for 03:00 every day'
            ) from None

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            close = sorted(name for name in available_timezones() if value.lower() in name.lower())[:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else " such as UTC or Europe/Berlin"
            raise ValueError(f"unknown time zone {value!r}; use an IANA name{hint}") from None
        return value

    @model_validator(mode="after")
    def _cron_or_interval(self) -> ScheduleEntry:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of `cron` or `interval_s`")
        return self

    def to_prefect(self) -> Any:
        """The Prefect schedule object (prefect.schedules.Cron / Interval)."""
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone, active=self.active)
        return Interval(timedelta(seconds=self.interval_s), timezone=self.timezone, active=self.active)


class ScheduleConfig(StrictModel):
    """One optional schedule per deployment."""

    build: ScheduleEntry | None = Field(None, description="The build-dataset deployment (`distill build`).")
    capture: ScheduleEntry | None = Field(None, description="The capture-logits deployment (`distill capture-logits`).")
    train: ScheduleEntry | None = Field(None, description="The train deployment (`distill train`).")
    eval: ScheduleEntry | None = Field(None, description="The eval deployment (`distill eval`).")
    sweep: ScheduleEntry | None = Field(None, description="The sweep deployment (`distill sweep`).")
    mine: ScheduleEntry | None = Field(None, description="The mine deployment (`distill mine`).")
    run: ScheduleEntry | None = Field(None, description="The whole pipeline (`distill run`).")

    def entries(self) -> dict[str, ScheduleEntry]:
        return {name: entry for name in DEPLOYMENT_NAMES if (entry := getattr(self, name)) is not None}
