"""Check a manifest file column by column with Arrow compute, whatever its size.

Per-row pydantic costs tens of microseconds a row; these checks cost nanoseconds. They are deliberately
conservative: they *flag* every row that might break a rule of `schemas.request.RenderRequest`, and
flagged rows go on to pydantic (`pipeline/manifest.py`), so the failure messages are pydantic's own, word for
word. Rows that pass are normalized here, as REQUEST_SCHEMA columns, without building a `RenderRequest` each.
The rules' constants, patterns and the id hash are `schemas.request`'s, the ones the validators use.

A file whose column types these checks do not cover (text widths, adapters lists, ...) has every row flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.records import ADAPTERS_TYPE, REFERENCES_TYPE
from schemas.request import (
    FORMAT_ALIASES,
    ID_CONTROL,
    MAX_CANDIDATES,
    MAX_GUIDANCE,
    MAX_ID_CHARS,
    MAX_IMAGES_PER_ROW,
    MAX_PROMPT_CHARS,
    MAX_REFERENCE_URL_CHARS,
    OUTPUT_FORMATS,
    PROMPT_CONTROL,
    REQUEST_SCHEMA,
    SIDE_MULTIPLE,
    WHITESPACE,
    ModelLimits,
    RenderRequest,
    request_id,
)

_NOT_BLANK = f"[^{WHITESPACE}]"  # a character str.strip() keeps: the text is not empty to the validators
_DEFAULT_IMAGES = RenderRequest.model_fields["num_images"].default


class NotVectorizable(Exception):
    """A column type the column checks do not cover; every row of the file goes to pydantic."""


@dataclass
class CheckedFile:
    """A file's rows split in two: normalized valid rows (columns) and the indices pydantic must see."""

    valid: pa.Table  # REQUEST_SCHEMA columns, then the extra columns named; in row order
    flagged: np.ndarray  # row indices (int64, ascending) to check one by one


def check_file(table: pa.Table, source: str, limits: ModelLimits, model_name: str | None,
               extra_names: list[str]) -> CheckedFile:
    """Flag the rows that may be invalid and normalize the rest; every row is flagged when a column's type is one
    these checks do not cover."""
    try:
        return _check(table, source, limits, model_name, extra_names)
    except NotVectorizable:
        schema = pa.schema(list(REQUEST_SCHEMA) + [table.schema.field(name) for name in extra_names])
        return CheckedFile(valid=schema.empty_table(), flagged=np.arange(table.num_rows, dtype=np.int64))


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
    flag(pc.match_substring_regex(prompt, PROMPT_CONTROL))

    ids = column("id")
    if ids is not None and not pa.types.is_null(ids.type):
        if pa.types.is_integer(ids.type):
            ids = ids.cast(pa.string())
        ids = _text(ids, "id")
        present = pc.is_valid(ids)
        flag(pc.and_(present, pc.invert(pc.match_substring_regex(ids, _NOT_BLANK))))
        flag(pc.and_(present, pc.greater(pc.utf8_length(ids), MAX_ID_CHARS)))
        flag(pc.and_(present, pc.match_substring_regex(ids, ID_CONTROL)))
    else:
        ids = _nulls(count, pa.string())

    model = column("model")
    if model is not None and not pa.types.is_null(model.type):
        model = _text(model, "model")
        present = pc.is_valid(model)
        flag(pc.and_(present, pc.invert(pc.match_substring_regex(model, _NOT_BLANK))))
        if model_name is not None:
            flag(pc.and_(present, pc.not_equal(model, model_name)))
    else:
        model = _nulls(count, pa.string())

    width = _integers(column("width"), flag, count)
    height = _integers(column("height"), flag, count)
    for side in (width, height):
        present = pc.is_valid(side)
        flag(pc.and_(present, pc.not_equal(pc.modulo(side, SIDE_MULTIPLE), 0)))
        flag(pc.and_(present, pc.or_(pc.less(side, limits.min_side), pc.greater(side, limits.max_side))))
    steps = _integers(column("steps"), flag, count)
    flag(pc.and_(pc.is_valid(steps), pc.or_(pc.less(steps, 1), pc.greater(steps, limits.max_steps))))
    images = pc.fill_null(_integers(column("num_images"), flag, count), _DEFAULT_IMAGES)
    flag(pc.or_(pc.less(images, 1), pc.greater(images, MAX_IMAGES_PER_ROW)))
    candidates = _integers(column("candidates"), flag, count)
    wanted = pc.fill_null(candidates, limits.default_candidates) if limits.default_candidates else candidates
    flag(pc.and_(pc.is_valid(wanted), pc.or_(pc.less(wanted, images), pc.greater(wanted, MAX_CANDIDATES))))
    if not limits.keeps_best:
        flag(pc.greater(wanted, 1))  # the per-row check says why
    seed = _seeds(column("seed"), flag, count)
    guidance = _guidance(column("guidance"), flag, count)
    if not limits.takes_guidance:
        flag(pc.is_valid(guidance))  # the per-row check says why

    adapters = column("adapters")
    if adapters is not None and not pa.types.is_null(adapters.type):
        if not pa.types.is_list(adapters.type) and not pa.types.is_large_list(adapters.type):
            raise NotVectorizable("adapters")
        if pc.any(pc.greater(pc.list_value_length(adapters), 0)).as_py():
            raise NotVectorizable("adapters")  # names and scales are checked per row

    references = _references(column("reference_images"), limits, flag, count)

    fmt = column("output_format")
    if fmt is not None and not pa.types.is_null(fmt.type):
        fmt = _text(fmt, "output_format")
        fmt = pc.utf8_lower(pc.utf8_trim(fmt, characters=WHITESPACE))
        for alias, name in FORMAT_ALIASES.items():
            fmt = pc.if_else(pc.equal(fmt, alias), name, fmt)
        flag(pc.and_(pc.is_valid(fmt), pc.invert(pc.is_in(fmt, value_set=pa.array(OUTPUT_FORMATS)))))
    else:
        fmt = _nulls(count, pa.string())

    good = pa.array(~bad)
    normalized = pa.table([ids, prompt, model, width, height, steps, guidance, seed, images, candidates, fmt,
                           references],
                          names=["id", "prompt", "model", "width", "height", "steps", "guidance", "seed",
                                 "num_images", "candidates", "output_format", "reference_images"])
    if bad.any():  # a filter copies every column: none when every row passed (the common case)
        normalized = normalized.filter(good)
    rows = pa.array(np.flatnonzero(~bad), pa.int64())
    valid = pa.table(
        [_request_ids(normalized), *normalized.columns[:10], _empty_lists(len(rows), ADAPTERS_TYPE),
         normalized.column("output_format"), _as_references(normalized.column("reference_images")),
         pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(rows), np.int32)), pa.array([source])), rows],
        schema=REQUEST_SCHEMA,
    )
    for name in extra_names:
        valid = valid.append_column(name, table.column(name).filter(good) if bad.any() else table.column(name))
    return CheckedFile(valid=valid, flagged=np.flatnonzero(bad))


_SHARED_ROWS = 65_536


def _nulls(count: int, kind: pa.DataType) -> pa.ChunkedArray:
    """`count` nulls of `kind` in chunks that share one buffer: a column the manifest does not have costs a few
    hundred kilobytes, not eight bytes a row (ten million rows: 500 MB for the absent columns together)."""
    chunk = pa.nulls(min(count, _SHARED_ROWS), kind)
    whole, rest = divmod(count, _SHARED_ROWS)
    return pa.chunked_array([chunk] * whole + ([chunk.slice(0, rest)] if rest else []), kind)


def _empty_lists(count: int, kind: pa.DataType) -> pa.Array:
    """`count` empty lists of `kind`, without a Python list per row."""
    return pa.ListArray.from_arrays(pa.array(np.zeros(count + 1, np.int32)), pa.array([], kind.value_type), type=kind)


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
        return _nulls(count, pa.int64())
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
        return _nulls(count, pa.uint64())
    if pa.types.is_unsigned_integer(values.type):
        return values.cast(pa.uint64())
    seeds = _integers(values, flag, count)
    negative = pc.less(seeds, 0)
    flag(negative)
    return pc.if_else(negative, 0, seeds).cast(pa.uint64())


def _guidance(values: pa.ChunkedArray | None, flag: Any, count: int) -> pa.ChunkedArray | pa.Array:
    if values is None or pa.types.is_null(values.type):
        return _nulls(count, pa.float64())
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise NotVectorizable("guidance")
    values = values.cast(pa.float64())
    ok = pc.and_(pc.is_finite(values), pc.and_(pc.greater_equal(values, 0.0), pc.less_equal(values, MAX_GUIDANCE)))
    flag(pc.and_(pc.is_valid(values), pc.invert(ok)))
    return values


def _references(values: pa.ChunkedArray | None, limits: ModelLimits, flag: Any, count: int) -> pa.Array:
    """The reference URL lists (list<string>); a row is flagged when its count is outside the model's or a URL
    is null, blank, too long or holds control characters."""
    kind = pa.list_(pa.string())
    if values is None or pa.types.is_null(values.type):
        if limits.min_references:
            flag(pa.array(np.ones(count, dtype=bool)))  # the per-row check says the model needs references
        return _empty_lists(count, kind)
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise NotVectorizable("reference_images")
    item = values.type.value_type
    if not (pa.types.is_string(item) or pa.types.is_large_string(item) or pa.types.is_null(item)):
        raise NotVectorizable("reference_images")
    values = values.cast(kind).fill_null(pa.scalar([], kind)).combine_chunks()  # null is none, as pydantic reads it
    lengths = pc.list_value_length(values).fill_null(0)
    flag(pc.or_(pc.less(lengths, limits.min_references), pc.greater(lengths, limits.max_references)))
    urls = pc.list_flatten(values)
    wrong = pc.or_(pc.is_null(urls), pc.invert(pc.match_substring_regex(urls, _NOT_BLANK)))
    wrong = pc.or_(wrong, pc.greater(pc.utf8_length(urls), MAX_REFERENCE_URL_CHARS))
    wrong = pc.or_(wrong, pc.match_substring_regex(urls, ID_CONTROL))
    parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
    rows = np.zeros(count, dtype=bool)
    rows[parents[pc.fill_null(wrong, True).to_numpy(zero_copy_only=False)]] = True
    flag(pa.array(rows))
    return values


def _as_references(urls: pa.ChunkedArray) -> pa.Array:
    """list<string> URLs as REFERENCES_TYPE, their sha256 null until the driver reads them (pipeline/references.py)."""
    urls = urls.combine_chunks()
    structs = pa.StructArray.from_arrays([urls.values, pa.nulls(len(urls.values), pa.string())],
                                         fields=list(REFERENCES_TYPE.value_type))
    return pa.ListArray.from_arrays(urls.offsets, structs, type=REFERENCES_TYPE)


def _request_ids(normalized: pa.Table) -> pa.Array:
    """The manifest's id, else `schemas.request.request_id`'s hash of the normalized row."""
    ids = normalized.column("id")
    if ids.null_count == 0:
        return ids
    return pa.array([row["id"] if row["id"] is not None else request_id(row) for row in normalized.to_pylist()],
                    pa.string())
