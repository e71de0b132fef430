"""`ScheduleSpec`: fluxbatch jobs to run on cron expressions (`fluxbatch schedule SPEC.yaml`).

    state: .fluxbatch/schedule        # locks, history.jsonl and run logs; relative to SPEC's folder
    timezone: Europe/Berlin           # the cron expressions' clock (default UTC)
    jobs:
      - name: nightly-catalog
        cron: "0 2 * * *"
        run: catalog run catalog.yaml # a fluxbatch command line, run from SPEC's folder
        max_delay: 3600               # a fire time missed by more than this many seconds is skipped
      - name: products-on-cluster
        cron: "*/30 * * * *"
        run: submit products.yaml --address http://head:8265
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.overrides import load_spec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ScheduledJob(BaseModel):
    """One fluxbatch command and when to run it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique; names the job's lock file and its history rows")
    cron: str = Field(description="five-field cron expression, e.g. '0 2 * * *'")
    run: str = Field(description="fluxbatch command line without 'fluxbatch', e.g. 'render --job j.yaml m out'")
    max_delay: float = Field(default=3600, gt=0, description="seconds after a fire time it may still start")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"name {value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a file)")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"cron {value!r} is not a valid cron expression (five fields: min hour day month dow)")
        return value

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        words = shlex.split(value)
        if not words:
            raise ValueError("run is empty; give a fluxbatch command line such as 'render m.parquet out --job j.yaml'")
        if words[0] in ("fluxbatch", "schedule"):
            raise ValueError(f"run {value!r}: leave out 'fluxbatch', and a schedule cannot run 'schedule'")
        return value

    def args(self) -> list[str]:
        """The command line's words."""
        return shlex.split(self.run)


class ScheduleSpec(BaseModel):
    """The scheduled jobs, where their state lives, and the clock of their cron expressions."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(default=".fluxbatch/schedule", description="folder for locks, history and logs")
    timezone: str = Field(default="UTC")
    tick_seconds: float = Field(default=20, gt=0, le=3600, description="how often due jobs are looked for")
    jobs: list[ScheduledJob] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {value!r} is not an IANA zone name such as 'UTC' or 'Europe/Berlin'") from None
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ScheduleSpec:
        names = [job.name for job in self.jobs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"job names must be unique; {', '.join(twice)} appear more than once")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ScheduleSpec:
        """Load a schedule from YAML."""
        return load_spec(cls, path, "schedule")
