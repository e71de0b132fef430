"""`CatalogSpec`: product images for a storefront, and `CatalogReport`: what one catalog run changed.

    products: products.parquet      # sku, title, category, attributes, updated_at
    templates:                      # a prompt template per category; "*" for every other category
      lamps: "studio photo of {title}, {color} {material}, white background"
      "*": "product photo of {title} ({category}), {attributes}"
    aspects: ["1:1", "4:5", "16:9"]
    size: 1024                      # an aspect's image has the area of a size x size square
    variants: 2                     # images per (sku, aspect)

Placeholders: {sku}, {title}, {category}, {attributes} (all of them as "name: value, ..."), and any
attribute by its name. `jobs/catalog.py` turns it into a manifest, renders, and publishes stable paths.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from schemas.job_template import JobTemplate, template_fields
from schemas.request import MAX_IMAGES_PER_ROW
from schemas.urls import storage_url

ASPECT = re.compile(r"^([1-9][0-9]?):([1-9][0-9]?)$")
DEFAULT_TEMPLATE = "*"


def aspect_size(aspect: str, size: int) -> tuple[int, int]:
    """Width and height, multiples of 16, of an aspect ratio with about the area of a size x size square."""
    found = ASPECT.match(aspect)
    if not found:
        raise ValueError(f"aspect {aspect!r} must be W:H with whole numbers below 100, e.g. 1:1, 4:5, 16:9")
    ratio = int(found.group(1)) / int(found.group(2))
    return (max(16, round(size * math.sqrt(ratio) / 16) * 16), max(16, round(size / math.sqrt(ratio) / 16) * 16))


class CatalogSpec(JobTemplate):
    """A product table, a prompt template per category, the aspect ratios and variants per SKU."""

    products: str = Field(min_length=1, description="Parquet product table: local path or any fsspec URL")
    templates: dict[str, str] = Field(min_length=1, description="category -> prompt template; '*' for the rest")
    aspects: list[str] = Field(default_factory=lambda: ["1:1"], min_length=1)
    size: int = Field(default=1024, ge=16, le=4096, description="side of the square whose area each image has")
    variants: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_ROW, description="images per (sku, aspect)")
    seed: int = Field(default=0, ge=0, le=2**62)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, exclude=True, repr=False, description="fsspec options for the product table"
    )

    @field_validator("products")
    @classmethod
    def _products(cls, value: str) -> str:
        return storage_url(value)

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for category, template in value.items():
            if not template.strip():
                raise ValueError(f"the template for category {category!r} is empty")
            template_fields(template)
        return value

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, value: list[str]) -> list[str]:
        for aspect in value:
            aspect_size(aspect, 1024)
            w, h = (int(p) for p in aspect.split(":"))
            if not 0.25 <= w / h <= 4:
                raise ValueError(f"aspect {aspect!r} is wider than 4:1 or taller than 1:4")
        if len(set(value)) != len(value):
            raise ValueError("an aspect is listed twice")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"size must be a multiple of 16, got {value}")
        return value


class CatalogReport(BaseModel):
    """What a catalog run did, by SKU; written to OUTPUT/catalog/_runs/<run_id>.json."""

    run_id: str
    products: int = 0
    skus_new: list[str] = Field(default_factory=list, description="not published before; rendered this run")
    skus_changed: list[str] = Field(default_factory=list, description="render parameters changed; re-rendered")
    skus_unchanged: int = 0
    skus_removed: list[str] = Field(default_factory=list, description="published before, gone from the table")
    skus_failed: list[str] = Field(default_factory=list, description="some image failed; the old one stays live")
    skus_refused: list[str] = Field(default_factory=list, description="bad product rows; see problems")
    images_rendered: int = 0
    assets_published: int = 0
    previous_versions_kept: int = 0
    problems: list[str] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime | None = None
