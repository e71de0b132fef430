"""`SynthesisSpec`: a synthetic data set as prompt templates with slots, the vocabulary of each slot, and counts.

    templates: ["a photo of a {color} {animal} in {place}"]
    slots: {color: [red, green], animal: {parquet: animals.parquet, column: name}, place: [a forest, a city]}
    prompts: 1000          # prompts to draw
    images_per_prompt: 2
    seed: 7                # same spec, same seed: same manifest
    label_slot: animal     # optional: each image's class label is its value of this slot

`jobs/synthesize.py` draws the manifest from it and renders it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.job_template import JobTemplate, template_fields
from schemas.request import MAX_IMAGES_PER_ROW
from schemas.urls import storage_url

MAX_PROMPTS = 100_000_000


class SlotColumn(BaseModel):
    """A slot vocabulary read from one column of a Parquet file (local or any fsspec URL)."""

    model_config = ConfigDict(extra="forbid")

    parquet: str = Field(min_length=1)
    column: str = Field(min_length=1)

    @field_validator("parquet")
    @classmethod
    def _parquet(cls, value: str) -> str:
        return storage_url(value)


class SynthesisSpec(JobTemplate):
    """How to draw the prompts of a synthetic data set, and how to render them."""

    templates: list[str] = Field(min_length=1, description="prompt templates; {slot} marks a slot")
    slots: dict[str, list[str] | SlotColumn] = Field(default_factory=dict, description="slot -> vocabulary")
    prompts: int = Field(ge=1, le=MAX_PROMPTS, description="how many prompts to draw")
    images_per_prompt: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_ROW)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    label_slot: str | None = Field(default=None, description="the slot whose value is each image's class label")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, exclude=True, repr=False, description="fsspec options for slot Parquet files"
    )

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        for template in value:
            if not template.strip():
                raise ValueError("a template is empty")
            template_fields(template)
        return value

    @field_validator("slots")
    @classmethod
    def _slots(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, vocabulary in value.items():
            if not name.isidentifier():
                raise ValueError(f"slot name {name!r} must be a plain identifier (letters, digits, _)")
            if isinstance(vocabulary, list):
                if not vocabulary:
                    raise ValueError(f"slot {name!r} has an empty vocabulary")
                blank = [i for i, word in enumerate(vocabulary) if not word.strip()]
                if blank:
                    raise ValueError(f"slot {name!r}: entry {blank[0]} is empty")
        return value

    @model_validator(mode="after")
    def _slots_declared(self) -> SynthesisSpec:
        for template in self.templates:
            missing = [name for name in template_fields(template) if name not in self.slots]
            if missing:
                raise ValueError(f"template {template!r} uses slot {missing[0]!r}, which `slots` does not declare")
        if self.label_slot is not None:
            if self.label_slot not in self.slots:
                raise ValueError(f"label_slot {self.label_slot!r} is not one of the declared slots")
            lacking = [t for t in self.templates if self.label_slot not in template_fields(t)]
            if lacking:
                raise ValueError(f"template {lacking[0]!r} does not use the label slot {{{self.label_slot}}}; "
                                 "every prompt must name its class")
        return self
