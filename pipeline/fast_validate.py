"""Validate a manifest file column by column with Arrow compute, for manifests of millions of rows.

Per-row pydantic costs tens of microseconds a row; these checks cost nanoseconds. They are deliberately
conservative: they *flag* every row that might break a rule of `schemas.request.RenderRequest`, and
flagged rows go on to the per-row pydantic check, so the failure messages are pydantic's own, word for
word. Rows that pass are normalized here, as columns, without building a `RenderRequest` each.

A file whose column types these checks do not cover (text widths, adapters lists, ...) returns None and
takes the per-row path whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.records import ADAPTERS_TYPE
from schemas.request import MAX_GUIDANCE, MAX_ID_CHARS, MAX_IMAGES_PER_ROW, MAX_PROMPT_CHARS, ModelLimits

# The normalized request columns of the valid rows, as `pipeline.plan` reads them.
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
    ("adapters", ADAPTERS_TYPE),
    ("output_format", pa.string()),
    ("source", pa.string()),
    ("row", pa.int64()),
])
# Python's str.strip() removes these; a text made only of them is "empty" to the row validators.
_NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f\x85\pZ]"
_PROMPT_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f]"
_ID_CONTROL = r"[\x00-\x1f\x7f]"
_ASCII_SPACE = " \t\n\r\x0b\x0c"


class NotVectorizable(Exception):
    """A column type the vectorized checks do not cover; the file takes the per-row path."""


@dataclass
class CheckedFile:
    """A file's rows split in two: normalized valid rows (columns) and the indices pydantic must see."""

    valid: pa.Table  # REQUEST_SCHEMA columns, then the file's extra columns
    flagged: np.ndarray  # row indices (int64) to check one by one


def check_file(table: pa.Table, source: str, limits: ModelLimits, model_name: str | None,
               extra_names: list[str]) -> CheckedFile | None:
    """Flag the rows that may be invalid and normalize the rest; None when a column needs the per-row path."""
    try:
        return _check(table, source, limits, model_name, extra_names)
    except NotVectorizable:
        return None


def _check(table: pa.Table, source: str, limits: ModelLimits, model_name: str | None,
           extra_names: list[str]) -> CheckedFile:
    count = table.num_rows
    bad = np.zeros(count, dtype=bool)
    names = set(table.column_names)

    def column(name: str) -> pa.ChunkedArray | None:
        return table.column(name) if name in names else None

    def flag(mask: pa.ChunkedArray | pa.Array) -> None:
        nonlocal bad
        # A null outcome means a null value, which each check below allows unless it flags nulls itself.
        bad |= np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)

    prompt = _text(column("prompt"), "prompt")
    flag(pc.is_null(prompt))
    flag(pc.invert(pc.match_substring_regex(prompt, _NOT_BLANK)))
    flag(pc.greater(pc.utf8_length(prompt), MAX_PROMPT_CHARS))
    flag(pc.match_substring_regex(prompt, _PROMPT_CONTROL))

    ids = column("id")
    if ids is not None and not pa.types.is_null(ids.type):
        if pa.types.is_integer(ids.type):
            ids = ids.cast(pa.string())
        ids = _text(ids, "id")
        present = pc.is_valid(ids)
        flag(pc.and_(present, pc.invert(pc.match_substring_regex(ids, _NOT_BLANK))))
        flag(pc.and_(present, pc.greater(pc.utf8_length(ids), MAX_ID_CHARS)))
        flag(pc.and_(present, pc.match_substring_regex(ids, _ID_CONTROL)))
    else:
        ids = pa.nulls(count, pa.string())

    model = column("model")
    if model is not None and not pa.types.is_null(model.type):
        model = _text(model, "model")
        present = pc.is_valid(model)
        flag(pc.and_(present, pc.invert(pc.match_substring_regex(model, _NOT_BLANK))))
        if model_name is not None:
            flag(pc.and_(present, pc.not_equal(model, model_name)))
    else:
        model = pa.nulls(count, pa.string())

    width = _integers(column("width"), flag, count)
    height = _integers(column("height"), flag, count)
    for side in (width, height):
        present = pc.is_valid(side)
        flag(pc.and_(present, pc.not_equal(pc.bit_wise_and(side, 15), 0)))
        flag(pc.and_(present, pc.or_(pc.less(side, limits.min_side), pc.greater(side, limits.max_side))))
    steps = _integers(column("steps"), flag, count)
    flag(pc.and_(pc.is_valid(steps), pc.or_(pc.less(steps, 1), pc.greater(steps, limits.max_steps))))
    images = pc.fill_null(_integers(column("num_images"), flag, count), 1)
    flag(pc.or_(pc.less(images, 1), pc.greater(images, MAX_IMAGES_PER_ROW)))
    seed = _seeds(column("seed"), flag, count)
    guidance = _guidance(column("guidance"), flag, count)

    adapters = column("adapters")
    if adapters is not None and not pa.types.is_null(adapters.type):
        if not pa.types.is_list(adapters.type) and not pa.types.is_large_list(adapters.type):
            raise NotVectorizable("adapters")
        if pc.any(pc.greater(pc.list_value_length(adapters), 0)).as_py():
            raise NotVectorizable("adapters")  # names and scales are checked per row

    fmt = column("output_format")
    if fmt is not None and not pa.types.is_null(fmt.type):
        fmt = _text(fmt, "output_format")
        fmt = pc.utf8_lower(pc.utf8_trim(fmt, characters=_ASCII_SPACE))
        fmt = pc.replace_substring_regex(fmt, "^jpg$", "jpeg")
        flag(pc.and_(pc.is_valid(fmt), pc.invert(pc.is_in(fmt, value_set=pa.array(["png", "jpeg", "webp"])))))
    else:
        fmt = pa.nulls(count, pa.string())

    good = pa.array(~bad)
    normalized = pa.table([ids, prompt, model, width, height, steps, guidance, seed, images, fmt],
                          names=["id", "prompt", "model", "width", "height", "steps", "guidance", "seed",
                                 "num_images", "output_format"]).filter(good)
    rows = pa.array(np.flatnonzero(~bad), pa.int64())
    valid = pa.table(
        [_request_ids(normalized), *normalized.columns[:9], pa.array([[]] * len(rows), ADAPTERS_TYPE),
         normalized.column("output_format"), pa.repeat(pa.scalar(source, pa.string()), len(rows)), rows],
        schema=REQUEST_SCHEMA,
    )
    for name in extra_names:
        valid = valid.append_column(name, table.column(name).filter(good))
    return CheckedFile(valid=valid, flagged=np.flatnonzero(bad))


def _text(values: pa.ChunkedArray | None, name: str) -> pa.ChunkedArray:
    if values is None:
        raise NotVectorizable(name)
    if pa.types.is_null(values.type):
        return values.cast(pa.string())
    if pa.types.is_large_string(values.type) or pa.types.is_string_view(values.type):
        return values.cast(pa.string())
    if not pa.types.is_string(values.type):
        raise NotVectorizable(name)
    return values


def _integers(values: pa.ChunkedArray | None, flag: Any, count: int) -> pa.ChunkedArray | pa.Array:
    """Integer columns as int64; integral floats are accepted as the row validator accepts them."""
    if values is None or pa.types.is_null(values.type):
        return pa.nulls(count, pa.int64())
    if pa.types.is_integer(values.type):
        if pa.types.is_unsigned_integer(values.type) and values.type.bit_width == 64:
            too_big = pc.greater(values, 2**63 - 1)
            flag(too_big)
            values = pc.if_else(too_big, 0, values)
        return values.cast(pa.int64())
    if pa.types.is_floating(values.type):
        finite = pc.is_finite(values)
        integral = pc.and_(finite, pc.equal(pc.floor(values), values))
        fits = pc.and_(integral, pc.less(pc.abs(values), 2.0**62))
        flag(pc.and_(pc.is_valid(values), pc.invert(fits)))
        return pc.if_else(fits, values, 0.0).cast(pa.int64())
    raise NotVectorizable(str(values.type))


def _seeds(values: pa.ChunkedArray | None, flag: Any, count: int) -> pa.ChunkedArray | pa.Array:
    if values is None or pa.types.is_null(values.type):
        return pa.nulls(count, pa.uint64())
    if pa.types.is_unsigned_integer(values.type):
        return values.cast(pa.uint64())
    seeds = _integers(values, flag, count)
    negative = pc.less(seeds, 0)
    flag(negative)
    return pc.if_else(negative, 0, seeds).cast(pa.uint64())


def _guidance(values: pa.ChunkedArray | None, flag: Any, count: int) -> pa.ChunkedArray | pa.Array:
    if values is None or pa.types.is_null(values.type):
        return pa.nulls(count, pa.float64())
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise NotVectorizable("guidance")
    values = values.cast(pa.float64())
    ok = pc.and_(pc.is_finite(values), pc.and_(pc.greater_equal(values, 0.0), pc.less_equal(values, MAX_GUIDANCE)))
    flag(pc.and_(pc.is_valid(values), pc.invert(ok)))
    return values


def _request_ids(normalized: pa.Table) -> pa.Array:
    """The manifest's id, else the same parameter hash as `pipeline.manifest.request_id_of`."""
    ids = normalized.column("id")
    if ids.null_count == 0:
        return ids.combine_chunks()
    out = [row["id"] if row["id"] is not None else params_request_id(row) for row in normalized.to_pylist()]
    return pa.array(out, pa.string())


def params_request_id(row: dict[str, Any]) -> str:
    """`request_id_of` for a normalized row with no id: the hash of its render parameters as JSON."""
    params = {
        "prompt": row["prompt"], "model": row.get("model"), "width": row["width"], "height": row["height"],
        "steps": row["steps"], "guidance": row["guidance"], "seed": row["seed"], "num_images": row["num_images"],
        "adapters": row.get("adapters") or [], "output_format": row["output_format"],
    }
    if params["guidance"] is not None and math.isfinite(params["guidance"]):
        params["guidance"] = float(params["guidance"])
    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=12).hexdigest()
    return f"h-{digest}"
