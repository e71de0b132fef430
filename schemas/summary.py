"""`RunSummary`: what one run did, returned by `pipeline.render` and written to `summary.json`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, computed_field


class RunSummary(BaseModel):
    """Counts, throughput and time per stage of one run over an OUTPUT."""

    output: str
    run_id: str
    model_id: str
    model_revision: str | None = None
    manifest_files: int = 0
    manifest_rows: int = 0
    invalid_rows: int = 0
    images_expected: int = 0
    images_already_done: int = 0
    images_planned: int = 0
    images_rendered: int = 0
    images_failed: int = 0
    images_total_done: int = 0
    images_per_second: float = 0.0
    seconds: dict[str, float] = Field(default_factory=dict, description="wall seconds per stage")
    failures_by_reason: dict[str, int] = Field(default_factory=dict)
    started_at: datetime
    finished_at: datetime | None = None

    @computed_field  # in summary.json and _SUCCESS, so a sensor reading _SUCCESS knows the outcome
    @property
    def complete(self) -> bool:
        """Every expected image exists."""
        return self.images_total_done == self.images_expected

    @computed_field
    @property
    def succeeded(self) -> bool:
        """`fluxbatch render` exits 0 (README, "Exit codes"): some row was valid, no row was invalid, and
        every valid row's images exist. A run that refused rows or rendered nothing is not a success."""
        return self.complete and self.invalid_rows == 0 and self.images_expected > 0
