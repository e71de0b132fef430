"""`RunSummary`: what one run did, returned by `pipeline.render` and written to `summary.json`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, computed_field


class ActorStart(BaseModel):
    """One renderer actor's cold start, in seconds (flux_worker/cold_start.py writes it, the driver gathers it).

    process_start, model_load and warmup follow each other; first_image counts from the process's creation to
    its first image written, so it holds the three and any wait for a first batch."""

    worker: str = Field(description="host:pid, as in the metadata's worker column")
    device: str
    started_at: datetime = Field(description="when the actor's process was created")
    process_start: float = Field(description="process created -> renderer constructed (Ray worker start, imports)")
    model_load: float = Field(description="weights loaded to the device, fast-path options applied")
    warmup: float | None = Field(default=None, description="the first pipeline call: compile (or cache load) "
                                 "and the first denoising; None if the actor rendered nothing")
    first_image: float | None = Field(default=None, description="process created -> first image written")
    compile: bool = False
    compile_cache_hit: bool | None = Field(default=None, description="a compile-cache blob was loaded; None "
                                           "without model.compile")
    compile_cache_loaded: int = 0
    compile_cache_saved: int = 0
    compile_cache_ignored: int = 0
    inductor_cache_hits: int | None = Field(default=None, description="compiled graphs read back, not built")
    inductor_cache_misses: int | None = Field(default=None, description="compiled graphs built by this actor")


class PoolSummary(BaseModel):
    """One pool of a mixed fleet (a card type): its shape, what it rendered, how busy it was."""

    card_type: str
    replicas: int
    gpus_per_replica: float
    images: int = 0
    images_per_second: float | None = None
    busy: float | None = Field(default=None, description="render seconds over replicas x (last end - first start)")
    first_started_at: datetime | None = None
    last_finished_at: datetime | None = None


class RunSummary(BaseModel):
    """Counts, throughput and time per stage of one run over an OUTPUT."""

    output: str
    run_id: str
    model_id: str
    model_revision: str | None = None
    model_source: str | None = Field(default=None, description="where the weights were loaded from: a model URL, "
                                     "a local folder, or hub:<id>[@<revision>]")
    marks: str = Field(default="", description="the provenance marks this run's images carry: xmp, xmp+c2pa, "
                       "xmp+watermark, xmp+c2pa+watermark; empty with --no-provenance (docs/provenance.md)")
    manifest_files: int = 0
    manifest_rows: int = 0
    invalid_rows: int = 0
    images_expected: int = 0
    images_already_done: int = 0
    images_planned: int = 0
    images_rendered: int = 0
    images_failed: int = 0
    images_total_done: int = 0
    images_missing: int = Field(default=0, description="committed images found missing or altered (another size "
                                "than their ledger row says) when the run ended; each is a failure row of stage "
                                "'check'")
    images_without_watermark: int = Field(
        default=0, description="images this run rendered whose picture could not hold the job's watermark: written "
        "and committed without it (their ledger rows say so; `fluxbatch verify --provenance` names them)")
    candidates_rendered: int = Field(
        default=0, description="best-of-n candidates rendered for the images this run kept (a row's n candidates "
        "for its num_images kept)")
    near_duplicates: dict[str, Any] = Field(
        default_factory=dict, description="OUTPUT's near-duplicate groups (perceptual hashes within max_distance "
        "bits): how many, how many images, the largest; every group in runs/<run id>/near_duplicates.parquet; "
        "nothing is deleted")
    scores: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="each score of OUTPUT's images (clip_score, aesthetic_score): count, "
        "quantiles, histogram, and the lowest and highest images")
    images_per_second: float = 0.0
    seconds: dict[str, float] = Field(default_factory=dict, description="wall seconds per stage")
    failures_by_reason: dict[str, int] = Field(default_factory=dict)
    actors: list[ActorStart] = Field(default_factory=list, description="each renderer actor's cold start")
    pools: list[PoolSummary] = Field(default_factory=list, description="a mixed fleet's pools, one per card type")
    started_at: datetime
    finished_at: datetime | None = None

    @computed_field  # in summary.json and _SUCCESS, so a sensor reading _SUCCESS knows the outcome
    @property
    def complete(self) -> bool:
        """Every expected image exists, and every committed image of OUTPUT is there with its recorded size."""
        return self.images_total_done == self.images_expected and self.images_missing == 0

    @computed_field
    @property
    def succeeded(self) -> bool:
        """`fluxbatch render` exits 0 (README, "Exit codes"): some row was valid, no row was invalid, and
        every valid row's images exist. A run that refused rows or rendered nothing is not a success."""
        return self.complete and self.invalid_rows == 0 and self.images_expected > 0

    def outcome(self) -> str:
        """The exit code and what it means, in one line: the end of `fluxbatch render` and the report's headline."""
        if self.succeeded:
            return "exit 0: every image the manifest asks for is in OUTPUT"
        if not self.images_expected:
            return "exit 1: no valid row in the manifest, so nothing was rendered"
        missing = self.images_expected - self.images_total_done
        why = [f"{missing} of {self.images_expected} images are not in OUTPUT" if missing else "",
               f"{self.invalid_rows} rows were refused" if self.invalid_rows else "",
               f"{self.images_missing} committed images are missing or altered" if self.images_missing else ""]
        # A re-run renders what failed or went missing; a refused row waits for its fix in the manifest.
        fix = "a re-run renders what failed" if missing or self.images_missing else "fix them in the manifest"
        return f"exit 1: {'; '.join(w for w in why if w)} ({fix})"
