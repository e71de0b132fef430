"""The manifest row (`RenderRequest`) and the bounds each of its fields must satisfy.

Validation errors are data: `row_errors` turns a pydantic error into one `RowError` per field, with a
message that names the field and says what to do, so the driver can write them to the failures table.

Each rule is written once here: the model's validators and the column checks of `pipeline/fast_validate.py`
(which flag rows for these validators, a whole manifest column at a time) both read the constants, patterns
and `request_id` below. `REQUEST_SCHEMA` is a valid row as Arrow columns, the manifest's one representation.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from schemas.records import ADAPTERS_TYPE, REFERENCES_TYPE

MAX_PROMPT_CHARS = 4000
MAX_ID_CHARS = 256
MAX_IMAGES_PER_ROW = 64
MAX_CANDIDATES = 64  # schemas/quality.py: best-of-n
MAX_ADAPTERS = 8
MAX_REFERENCE_URL_CHARS = 2048
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
SEED_MAX = 2**64 - 1
SIDE_MULTIPLE = 16  # the VAE and the 2x2 patching halve each side four times
# Control characters never belong in a prompt (but tab and newline) or an id (none at all). Patterns that Python's
# re and Arrow's RE2 read alike.
PROMPT_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f]"
ID_CONTROL = r"[\x00-\x1f\x7f]"
# What str.strip() removes (every character whose isspace() is true; tests/test_schemas.py checks): spelled out so
# that the column checks trim and find blank text exactly as the validators do.
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
FORMAT_ALIASES = {"jpg": "jpeg"}
_PROMPT_CONTROL = re.compile(PROMPT_CONTROL)
_ID_CONTROL = re.compile(ID_CONTROL)


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"

    @property
    def extension(self) -> str:
        return {"png": "png", "jpeg": "jpg", "webp": "webp"}[self.value]


OUTPUT_FORMATS = tuple(f.value for f in OutputFormat)


class ModelLimits(BaseModel):
    """The image sizes a model renders well; passed as validation context so rows are checked per model."""

    model_config = ConfigDict(frozen=True)

    min_side: int = 256
    max_side: int = 2048
    # Who set the bounds, as the size message says it: the model's, or the job's ("this job's watermark").
    sides_set_by: str = "this model"
    max_steps: int = MAX_STEPS
    takes_guidance: bool = True  # False for step-distilled models, whose pipeline ignores guidance
    min_references: int = 0  # reference images a row must give (FLUX.1 Kontext: 1)
    max_references: int = 0  # ... and may give (0: the model renders from text alone)
    # Best-of-n (schemas/quality.py): whether the job has a score to keep a row's best candidates by, and the
    # job's default `candidates` for rows that give none (JobSpec.row_limits).
    keeps_best: bool = True
    default_candidates: int | None = None


# The limits every model shares, for a value checked before its model is known (a job's defaults, as its spec loads):
# sides a multiple of SIDE_MULTIPLE, steps and guidance in their ranges. The model's own are checked once it is.
ANY_MODEL = ModelLimits(min_side=SIDE_MULTIPLE, max_side=2**31 - 1)


class AdapterRef(BaseModel):
    """A LoRA adapter by the name the job's model spec declares it under, with its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if not math.isfinite(value) or abs(value) > 10:
            raise ValueError(f"adapter scale must be a finite number in [-10, 10], got {value}")
        return value


# Columns fluxbatch reads from a manifest; every other column is carried through to the metadata.
MANIFEST_COLUMNS = (
    "id",
    "prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "num_images",
    "candidates",
    "adapters",
    "output_format",
    "reference_images",
)


class RenderRequest(BaseModel):
    """One manifest row. Unset fields take the job's defaults, then the model preset's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    prompt: str
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    # Best-of-n: render this many candidates and keep the `num_images` best by the job's quality.keep_by.
    candidates: int | None = Field(default=None, validate_default=True)
    adapters: tuple[AdapterRef, ...] = ()
    output_format: OutputFormat | None = None
    # Checked against the model here; whether each URL may be read, and is an image, on the driver before
    # rendering (pipeline/references.py).
    reference_images: tuple[str, ...] = Field(default=(), validate_default=True)

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"id must be text or an integer, got {type(value).__name__}")
        text = str(value)
        if not text.strip(WHITESPACE):
            raise ValueError("id is empty; leave the column null to derive an id from the row")
        if len(text) > MAX_ID_CHARS:
            raise ValueError(f"id is {len(text)} characters; at most {MAX_ID_CHARS} are allowed")
        if _ID_CONTROL.search(text):
            raise ValueError("id contains control characters")
        return text

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise ValueError(f"prompt must be text, got {kind}")
        if not value.strip(WHITESPACE):
            raise ValueError("prompt is empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        if _PROMPT_CONTROL.search(value):
            raise ValueError("prompt contains control characters (only tab and newline are allowed)")
        return value

    @field_validator("width", "height", mode="before")
    @classmethod
    def _integral(cls, value: Any, info: ValidationInfo) -> Any:
        return _as_int(value, info.field_name)

    @field_validator("steps", "seed", "num_images", "candidates", mode="before")
    @classmethod
    def _integral_counts(cls, value: Any, info: ValidationInfo) -> Any:
        return _as_int(value, info.field_name)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        limits = _limits(info)
        if value % SIDE_MULTIPLE:
            raise ValueError(f"{info.field_name} must be a multiple of {SIDE_MULTIPLE}, got {value}")
        if not limits.min_side <= value <= limits.max_side:
            raise ValueError(
                f"{info.field_name} must be between {limits.min_side} and {limits.max_side} "
                f"for {limits.sides_set_by}, got {value}"
            )
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if value is not None and not 1 <= value <= limits.max_steps:
            raise ValueError(f"steps must be between 1 and {limits.max_steps}, got {value}")
        return value

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if not _limits(info).takes_guidance:
            raise ValueError("guidance must be empty: this model is step-distilled and takes no guidance")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"guidance must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"guidance must be a finite number, got {value}")
        if not 0.0 <= value <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be between 0 and {MAX_GUIDANCE}, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= SEED_MAX:
            raise ValueError(f"seed must be an unsigned 64-bit integer (0 to 2**64-1), got {value}")
        return value

    @field_validator("num_images", mode="before")
    @classmethod
    def _default_images(cls, value: Any) -> Any:
        return 1 if value is None else value

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, value: int) -> int:
        if not 1 <= value <= MAX_IMAGES_PER_ROW:
            raise ValueError(f"num_images must be between 1 and {MAX_IMAGES_PER_ROW}, got {value}")
        return value

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        count = value if value is not None else limits.default_candidates
        if count is None:
            return value
        if not 1 <= count <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be between 1 and {MAX_CANDIDATES}, got {count}")
        if count > 1 and not limits.keeps_best:
            raise ValueError("candidates needs a score to keep the best by: set quality.keep_by (--keep-by) and "
                             "its scorer (--clip)")
        images = info.data.get("num_images")
        if isinstance(images, int) and count < images:
            raise ValueError(f"candidates ({count}) must be at least num_images ({images}): a row keeps its "
                             "num_images best of its candidates")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_text(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.strip(WHITESPACE)):
            raise ValueError("model must be a non-empty preset name or path, or null for the job's model")
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ValueError("adapters must be a list of {name, scale} entries")
        items = list(value)
        if len(items) > MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} adapters per row, got {len(items)}")
        names = [item.get("name") for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)]
        if len(set(names)) != len(names):
            raise ValueError("an adapter is named twice")
        return items

    @field_validator("output_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {type(value).__name__}")
        text = value.strip(WHITESPACE).lower()
        text = FORMAT_ALIASES.get(text, text)
        if text not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {value!r}")
        return text

    @field_validator("reference_images", mode="before")
    @classmethod
    def _references(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if value is None:
            value = ()
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ValueError("reference_images must be a list of image URLs")
        urls = list(value)
        for url in urls:
            if not isinstance(url, str) or not url.strip(WHITESPACE):
                raise ValueError("reference_images must be a list of non-empty URL texts")
            if len(url) > MAX_REFERENCE_URL_CHARS:
                raise ValueError(f"a reference image URL is {len(url)} characters; at most "
                                 f"{MAX_REFERENCE_URL_CHARS} are allowed")
            if _ID_CONTROL.search(url):
                raise ValueError("a reference image URL contains control characters")
        if urls and not limits.max_references:
            raise ValueError("reference_images must be empty: this model renders from text alone; use "
                             "flux.1-kontext-dev or a FLUX.2 model for rows with reference images")
        if len(urls) < limits.min_references:
            raise ValueError(f"reference_images needs {limits.min_references} image URL"
                             f"{'s' if limits.min_references > 1 else ''}: this model edits a reference image")
        if len(urls) > limits.max_references:
            raise ValueError(f"at most {limits.max_references} reference images per row for this model, "
                             f"got {len(urls)}")
        return urls


# A valid manifest row as Arrow columns: its fields normalized (jpg is jpeg, integral floats are integers), its
# `request_id`, and where it came from. The manifest's valid rows are one table of these columns, then the
# manifest's extra columns; the planner expands it into images.
REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("model", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("steps", pa.int64()),
    ("guidance", pa.float64()),
    ("seed", pa.uint64()),
    ("num_images", pa.int64()),
    ("candidates", pa.int64()),  # null: the job's default (defaults.candidates), else one image per image kept
    ("adapters", ADAPTERS_TYPE),
    ("output_format", pa.string()),
    ("reference_images", REFERENCES_TYPE),  # URLs as the row gives them; sha256 null until pipeline/references.py
    # Dictionary-encoded: one file name for all its rows (half a gigabyte of repeated paths at ten million rows).
    ("source", pa.dictionary(pa.int32(), pa.string())),
    ("row", pa.int64()),
])


def request_id(row: Mapping[str, Any]) -> str:
    """A row's `id`, or else a hash of its render parameters (every other manifest column), from which its images'
    keys derive. `row` is normalized: `RenderRequest.model_dump(mode="json")`, or a row of REQUEST_SCHEMA columns.

    The hash must never change: images already in an OUTPUT are found again by it.
    """
    if row.get("id") is not None:
        return row["id"]
    params = {name: row.get(name) for name in MANIFEST_COLUMNS if name not in ("id", "reference_images", "candidates")}
    params["adapters"] = list(params["adapters"] or [])
    references = reference_urls(row.get("reference_images"))
    if references:  # only then: the hash of every row without references stays what it was before them
        params["reference_images"] = references
    if (row.get("candidates") or 1) > 1:  # likewise (1 candidate is a plain row)
        params["candidates"] = row["candidates"]
    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=12).hexdigest()
    return f"h-{digest}"


def row_value(field: str, value: Any, limits: ModelLimits) -> Any:
    """`value` of `field` as a manifest row's validator takes it (normalized: 8.0 is 8, jpg is jpeg), or ValueError
    with the row's own message: how a job's defaults obey the rules of a row (schemas/job.py)."""
    row = {"prompt": "-", "reference_images": ["-"] * limits.min_references, field: value}  # else a valid row
    limits = limits.model_copy(update={"default_candidates": None})  # the row's own value, or none: no default
    try:
        return getattr(RenderRequest.model_validate(row, context={"limits": limits}), field)
    except ValidationError as error:
        raise ValueError(row_errors(error)[0].reason) from None


def reference_urls(value: Any) -> list[str]:
    """A row's reference URLs, whether given as texts (a RenderRequest) or as REFERENCES_TYPE structs."""
    return [item["url"] if isinstance(item, dict) else item for item in value or ()]


def _limits(info: ValidationInfo) -> ModelLimits:
    context = info.context or {}
    return context.get("limits") or ModelLimits()


def _as_int(value: Any, field: str | None) -> Any:
    """Accept integers and integral floats (Parquet often stores ints as doubles); refuse the rest."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got a boolean")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{field} must be an integer, got {value}")
        return int(value)
    if isinstance(value, int):
        return value
    if hasattr(value, "__index__"):  # numpy integers
        return int(value)
    raise ValueError(f"{field} must be an integer, got {type(value).__name__}")


class RowError(BaseModel):
    """One reason a row cannot render: the field at fault (None for the whole row) and what to do."""

    field: str | None
    reason: str


def row_errors(error: ValidationError) -> list[RowError]:
    """Flatten a pydantic error into one plain message per field, without pydantic's boilerplate."""
    out: list[RowError] = []
    for item in error.errors(include_url=False):
        loc = item.get("loc") or ()
        field = str(loc[0]) if loc else None
        message = str(item.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        if item.get("type") == "missing":
            message = f"{field} is required"
        elif item.get("type") == "extra_forbidden":
            message = f"{'.'.join(str(p) for p in loc)} is not a known field"
        elif len(loc) > 1:
            message = f"{'.'.join(str(p) for p in loc)}: {message}"
        out.append(RowError(field=field, reason=message))
    return out
