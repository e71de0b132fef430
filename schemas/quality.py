"""Quality signals (`quality:` in a job file): scorers run on each image, best-of-n, near-duplicates.

A scorer runs on the renderer actor right after each image is rendered, on the same device, before it is encoded
(flux_worker/scorers.py); its score is a metadata column. `clip_score` is the prompt-image alignment of a CLIP
model (torchmetrics' CLIP score: 100 x the cosine of the image and text embeddings, at least 0); `aesthetic_score`
is the LAION aesthetic predictor (an MLP on the same CLIP model's image embedding). A row with `candidates` n
renders n candidates and keeps its `num_images` k best by `keep_by` (flux_worker/best_of.py). Every image gets a
perceptual hash (`phash`), and images within `duplicate_distance` bits of another are reported as near-duplicates
at the end of a run and by `fluxbatch verify`, never deleted (pipeline/store/near_duplicates.py). docs/quality.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.urls import storage_url

CLIP_SCORE, AESTHETIC_SCORE = "clip_score", "aesthetic_score"
SCORES = (CLIP_SCORE, AESTHETIC_SCORE)  # the metadata's score columns, in this order
AESTHETIC_WEIGHTS = "model.safetensors"  # the aesthetic predictor's file in its folder
# Named CLIP models: the hub id each stands for (the aesthetic predictor was trained on ViT-L/14's embeddings).
CLIP_PRESETS = {"clip-vit-large-patch14": "openai/clip-vit-large-patch14",
                "clip-vit-base-patch32": "openai/clip-vit-base-patch32"}
# Bits of 64. A phash has 32 bits set (those above the median), so distances are even: 4 is two frequencies that
# crossed the median. A one-pixel edit, a JPEG re-encode or a slight resize of a rendered-looking picture stays
# within 2, unrelated ones were 20 or more apart, and at 4 a million random hashes with 32 bits set make about
# 0.07 chance pairs (at 8: about 360). Grouping a million images takes about 2 s at 4, 13 s at 6, and grows fast
# past that: 8 at most. benchmarks/README.md, "Near-duplicates".
DEFAULT_DUPLICATE_DISTANCE = 4
MAX_DUPLICATE_DISTANCE = 8


def scorer_kind(name: str) -> Literal["preset", "url", "folder", "hub"]:
    """Where a scorer named `name` is: a preset (CLIP_PRESETS), a storage URL, a local folder or file (it exists, or
    is written as a path), else a hub id (`owner/name`). The driver's checks, the planner and the renderer agree."""
    if name in CLIP_PRESETS:
        return "preset"
    if "://" in name:
        return "url"
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return "folder"
    return "hub"


class QualitySpec(BaseModel):
    """Scores each image gets, which of a row's candidates are kept, and how near a near-duplicate is."""

    model_config = ConfigDict(extra="forbid")

    clip: str | None = Field(
        default=None,
        description=f"CLIP model for clip_score (prompt-image alignment): a preset ({', '.join(CLIP_PRESETS)}), "
        "hub id, local folder or fsspec URL of a transformers folder",
    )
    aesthetic: str | None = Field(
        default=None,
        description="LAION aesthetic predictor for aesthetic_score: a folder or fsspec URL holding its "
        "model.safetensors (an MLP on --clip's image embeddings; needs --clip)",
    )
    keep_by: Literal["clip_score", "aesthetic_score"] | None = Field(
        default=None, description="best-of-n: the score that picks the num_images best of a row's candidates")
    keep_candidates: bool = Field(
        default=False,
        description="best-of-n: also write the candidates not kept, under OUTPUT/candidates/ (their scores and "
        "seeds are recorded either way)",
    )
    duplicate_distance: int = Field(
        default=DEFAULT_DUPLICATE_DISTANCE, ge=0, le=MAX_DUPLICATE_DISTANCE,
        description="images whose perceptual hashes differ in at most this many of 64 bits are reported as "
        "near-duplicates (never deleted)",
    )

    @field_validator("clip", "aesthetic")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty; give a preset, hub id, folder or URL")
        return storage_url(value) if "://" in value else value

    @model_validator(mode="after")
    def _scorers_needed(self) -> QualitySpec:
        if self.aesthetic and not self.clip:
            raise ValueError("quality.aesthetic scores CLIP image embeddings: name the CLIP model too (--clip, "
                             "e.g. clip-vit-large-patch14)")
        if self.keep_by is not None and self.scorer_of(self.keep_by) is None:
            flag = "--clip" if self.keep_by == CLIP_SCORE else "--aesthetic"
            raise ValueError(f"quality.keep_by {self.keep_by} needs its scorer: set {flag}")
        return self

    def scorer_of(self, score: str) -> str | None:
        """The model the job names for `score`, or None when the job does not compute it."""
        return {CLIP_SCORE: self.clip, AESTHETIC_SCORE: self.aesthetic}[score]

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores this job computes, in column order."""
        return tuple(score for score in SCORES if self.scorer_of(score))

    def identity(self) -> dict[str, Any]:
        """What decides which images a best-of-n row keeps: the score and the models computing it. Scores alone
        change no image (a scorer may be added to an OUTPUT later), nor does writing the candidates not kept or the
        duplicate distance: {} when nothing is kept by a score."""
        if self.keep_by is None:
            return {}
        return {"keep_by": self.keep_by, "clip": _as_recorded(self.clip),
                **({"aesthetic": _as_recorded(self.aesthetic)} if self.keep_by == AESTHETIC_SCORE else {})}


def _as_recorded(name: str | None) -> str | None:
    """A scorer as `_job.json` records it: a local folder by its absolute path (`./clip` and `/abs/clip` are one)."""
    if name is None or scorer_kind(name) != "folder":
        return name
    return str(Path(name).expanduser().resolve())
