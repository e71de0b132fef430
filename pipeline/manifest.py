"""Read manifests (a Parquet file, a folder or a glob; local or s3://) and validate their rows.

Problems are data: an unreadable file, a missing column or a bad row becomes a `FailureRecord` naming
the file, the row and the field, and everything else goes on to render.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from flux_worker.storage import filesystem, uri, with_retries
from pipeline.fast_validate import REQUEST_SCHEMA, check_file
from schemas import MANIFEST_COLUMNS, FailureRecord, ModelLimits, OutputFormat, RenderRequest, row_errors
from schemas.errors import FluxbatchError
from schemas.records import RESULT_SCHEMA

log = logging.getLogger(__name__)
_RESERVED = set(RESULT_SCHEMA.names)
# Files this long are checked by columns first (pipeline/fast_validate.py); shorter ones row by row,
# where the cost is nothing and the checks are the reference.
VECTORIZE_FROM_ROWS = 2048


class ManifestError(FluxbatchError, ValueError):
    """The manifest cannot be found at all (nothing matches, or no access)."""


@dataclass
class ValidRow:
    source: str
    row: int
    request: RenderRequest
    extras: dict[str, Any]


@dataclass
class Manifest:
    """The rows that passed validation, the failures of the rest, and the extra columns' types."""

    files: list[str] = field(default_factory=list)
    checked_rows: list[ValidRow] = field(default_factory=list)  # validated one by one
    tables: list[pa.Table] = field(default_factory=list)  # validated by columns: REQUEST_SCHEMA, then extras
    failures: list[FailureRecord] = field(default_factory=list)
    extra_fields: list[pa.Field] = field(default_factory=list)
    total_rows: int = 0

    @property
    def valid_count(self) -> int:
        return len(self.checked_rows) + sum(t.num_rows for t in self.tables)

    @property
    def image_count(self) -> int:
        """Images the valid rows ask for."""
        return (sum(r.request.num_images for r in self.checked_rows)
                + sum(pc.sum(t.column("num_images")).as_py() or 0 for t in self.tables))

    def valid_rows(self) -> list[ValidRow]:
        """Every valid row as a `ValidRow`, in file and row order. Builds a pydantic request per row checked by
        columns, so it is for inspection and tests: the planner reads `requests()`."""
        built = [
            ValidRow(row["source"], row["row"], _request(row), {f.name: row[f.name] for f in self.extra_fields})
            for table in self.tables for row in self._conform(table).to_pylist()
        ]
        order = {source: i for i, source in enumerate(self.files)}
        return sorted(self.checked_rows + built, key=lambda r: (order.get(r.source, 0), r.row))

    def requests(self) -> pa.Table:
        """Every valid row as REQUEST_SCHEMA columns plus the extra columns: what the planner expands."""
        checked = [
            {"request_id": request_id_of(r.request), **r.request.model_dump(mode="json"), "source": r.source,
             "row": r.row, **r.extras}
            for r in self.checked_rows
        ]
        schema = pa.schema(list(REQUEST_SCHEMA) + self.extra_fields)
        parts = [pa.Table.from_pylist(checked, schema=schema)] + [self._conform(t) for t in self.tables]
        return pa.concat_tables(parts)

    def _conform(self, table: pa.Table) -> pa.Table:
        schema = pa.schema(list(REQUEST_SCHEMA) + self.extra_fields)
        columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                   else pa.nulls(table.num_rows, f.type) for f in schema]
        return pa.table(columns, schema=schema)


def list_manifest_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The Parquet files a manifest URL names: itself, the *.parquet under a folder, or a glob's matches."""
    fs, path = filesystem(url, storage_options)
    if any(ch in path for ch in "*?["):
        # glob(detail=True) lists once; calling isfile per match would cost one request each on S3.
        found = with_retries(lambda: fs.glob(path, detail=True), f"list {url}")
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        if not files:
            raise ManifestError(f"no files match the manifest glob {url!r}")
    elif with_retries(lambda: fs.isdir(path), f"stat {url}"):
        found = with_retries(lambda: fs.find(path), f"list {url}")
        files = sorted(p for p in found if p.endswith((".parquet", ".pq")))
        if not files:
            raise ManifestError(f"the manifest folder {url!r} holds no .parquet files")
    elif with_retries(lambda: fs.exists(path), f"stat {url}"):
        files = [path]
    else:
        raise ManifestError(f"no manifest at {url!r}")
    return [uri(fs, p) for p in files]


def read_manifest(
    url: str,
    storage_options: dict[str, Any] | None = None,
    limits: ModelLimits | None = None,
    model_name: str | None = None,
    adapter_names: set[str] | None = None,
) -> Manifest:
    """Read and validate every row of every file; duplicates of an id after its first row are refused."""
    manifest = Manifest(files=list_manifest_files(url, storage_options))
    context = {"limits": limits or ModelLimits()}
    first_seen: dict[str, tuple[str, int]] = {}
    now = datetime.now(timezone.utc)
    tables: list[tuple[str, pa.Table]] = []
    for source in manifest.files:
        table = _read_table(source, storage_options, manifest, now)
        if table is not None:
            tables.append((source, table.rename_columns(_carried_names(table.column_names, source))))
    # Files may disagree on an extra column's type; the metadata holds one type per column.
    extra_types = _extra_types([table for _, table in tables])
    for source, table in tables:
        if _read_by_columns(source, table, extra_types, manifest, context, model_name, adapter_names, first_seen,
                            now):
            continue
        converted = _rows(source, table, extra_types, manifest, now)
        if converted is None:
            continue
        known_rows, extra_rows = converted
        manifest.total_rows += table.num_rows
        for index, (values, extra) in enumerate(zip(known_rows, extra_rows)):
            failure = _check_row(values, context, model_name, adapter_names)
            if isinstance(failure, list):
                for err in failure:
                    manifest.failures.append(
                        FailureRecord(stage="validate", source=source, row=index, request_id=_id_of(values),
                                      field=err[0], reason=err[1], at=now)
                    )
                continue
            request = failure
            request_id = request_id_of(request)
            if request_id in first_seen:
                manifest.failures.append(_duplicate(source, index, request_id, request.id is not None,
                                                    first_seen[request_id], now))
                continue
            first_seen[request_id] = (source, index)
            manifest.checked_rows.append(ValidRow(source, index, request, extra))
    manifest.extra_fields = list(extra_types.values())
    return manifest


def _read_by_columns(source: str, table: pa.Table, extra_types: dict[str, pa.Field], manifest: Manifest,
                     context: dict, model_name: str | None, adapter_names: set[str] | None,
                     first_seen: dict[str, tuple[str, int]], now: datetime) -> bool:
    """Check a long file with Arrow compute; only the rows it flags meet pydantic, so the messages are the
    per-row path's own. False when the file must take the per-row path (short, or types it cannot check)."""
    if table.num_rows < VECTORIZE_FROM_ROWS:
        return False
    extras = [name for name in table.column_names if name not in MANIFEST_COLUMNS]
    try:
        for name in extras:
            if table.column(name).type != extra_types[name].type:
                index = table.column_names.index(name)
                table = table.set_column(index, name, table.column(name).cast(extra_types[name].type))
    except (pa.ArrowException, ValueError, OverflowError):
        return False
    checked = check_file(table, source, context["limits"], model_name, extras)
    if checked is None:
        return False
    manifest.total_rows += table.num_rows
    known = [name for name in table.column_names if name in MANIFEST_COLUMNS]
    suspects = table.take(pa.array(checked.flagged, pa.int64()))
    failures: list[FailureRecord] = []
    passed: list[ValidRow] = []
    for index, values, extra in zip(checked.flagged.tolist(), suspects.select(known).to_pylist(),
                                    suspects.select(extras).to_pylist()):
        result = _check_row(values, context, model_name, adapter_names)
        if isinstance(result, list):
            failures += [FailureRecord(stage="validate", source=source, row=index, request_id=_id_of(values),
                                       field=name, reason=reason, at=now) for name, reason in result]
        else:
            passed.append(ValidRow(source, index, result, extra))
    # A repeated request id is refused after its first row, in row order over both kinds of rows.
    valid = checked.valid
    rows = valid.column("row").to_pylist()
    without_id = set(valid.filter(pc.is_null(valid.column("id"))).column("row").to_pylist())
    candidates: list[tuple[int, str, ValidRow | None]] = list(zip(rows, valid.column("request_id").to_pylist(),
                                                                  [None] * len(rows)))
    if passed:
        candidates = sorted(candidates + [(r.row, request_id_of(r.request), r) for r in passed], key=lambda c: c[0])
    repeated: list[int] = []
    for index, request_id, item in candidates:
        if request_id in first_seen:
            has_id = item.request.id is not None if item else index not in without_id
            failures.append(_duplicate(source, index, request_id, has_id, first_seen[request_id], now))
            if item is None:
                repeated.append(index)
            continue
        first_seen[request_id] = (source, index)
        if item is not None:
            manifest.checked_rows.append(item)
    if repeated:
        valid = valid.filter(pc.invert(pc.is_in(valid.column("row"), value_set=pa.array(repeated, pa.int64()))))
    manifest.tables.append(valid)
    manifest.failures += sorted(failures, key=lambda f: f.row)
    return True


def _duplicate(source: str, index: int, request_id: str, has_id: bool, where: tuple[str, int],
               now: datetime) -> FailureRecord:
    what = f"id {request_id!r}" if has_id else "the same render parameters"
    return FailureRecord(stage="validate", source=source, row=index, request_id=request_id,
                         field="id" if has_id else None,
                         reason=f"duplicate: {what} as row {where[1]} of {where[0]}", at=now)


def _request(row: dict[str, Any]) -> RenderRequest:
    """A RenderRequest from a row the column checks passed, without validating it again."""
    fmt = row["output_format"]
    return RenderRequest.model_construct(
        id=row["id"], prompt=row["prompt"], model=row["model"], width=row["width"], height=row["height"],
        steps=row["steps"], guidance=row["guidance"], seed=row["seed"], num_images=row["num_images"],
        adapters=(), output_format=OutputFormat(fmt) if fmt else None,
    )


def _carried_names(names: list[str], source: str) -> list[str]:
    """Extra columns keep their names, except those fluxbatch writes itself (`key` becomes `manifest_key`)."""
    taken = set(names)
    out = []
    for name in names:
        if name in MANIFEST_COLUMNS or name not in _RESERVED:
            out.append(name)
            continue
        new = f"manifest_{name}"
        while new in taken:
            new = f"manifest_{new}"
        taken.add(new)
        log.warning("%s: column %r is a fluxbatch output column; carried as %r", source, name, new)
        out.append(new)
    return out


def _extra_types(tables: list[pa.Table]) -> dict[str, pa.Field]:
    """One Arrow type per extra column over all files: the common type, widened, else text."""
    found: dict[str, list[pa.DataType]] = {}
    for table in tables:
        for item in table.schema:
            if item.name not in MANIFEST_COLUMNS:
                found.setdefault(item.name, []).append(item.type)
    fields = {}
    for name, types in found.items():
        try:
            unified = pa.unify_schemas([pa.schema([(name, t)]) for t in types], promote_options="permissive")
            fields[name] = unified.field(name)
        except (pa.ArrowException, TypeError):
            log.warning("extra column %r has different types across files (%s); carried as text",
                        name, ", ".join(sorted({str(t) for t in types})))
            fields[name] = pa.field(name, pa.string())
    return fields


def _rows(source: str, table: pa.Table, extra_types: dict[str, pa.Field], manifest: Manifest,
          now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The file's rows as Python values: manifest columns as stored, extras in their run-wide type."""
    known: dict[str, list[Any]] = {}
    extras: dict[str, list[Any]] = {}
    for name in table.column_names:
        column = table.column(name)
        try:
            if name in MANIFEST_COLUMNS:
                known[name] = column.to_pylist()
            else:
                extras[name] = _carry(column, extra_types[name].type)
        except (pa.ArrowException, ValueError, OverflowError, UnicodeDecodeError) as error:
            manifest.failures.append(FailureRecord(
                stage="read", source=source, field=name, at=now,
                reason=f"column {name!r} ({column.type}) cannot be read: {_first_line(error)}"))
            return None
    count = table.num_rows
    known_rows = [{name: values[i] for name, values in known.items()} for i in range(count)]
    extra_rows = [{name: values[i] for name, values in extras.items()} for i in range(count)]
    return known_rows, extra_rows


def _carry(column: pa.ChunkedArray, target: pa.DataType) -> list[Any]:
    if column.type == target:
        return column.to_pylist()
    try:
        return column.cast(target).to_pylist()
    except (pa.ArrowException, ValueError, OverflowError):
        if not pa.types.is_string(target):
            raise
        return [None if v is None else _as_text(v) for v in column.to_pylist()]


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _short(reason: str, limit: int = 400) -> str:
    """Reasons may quote a value; a 100 KB cell must not become a 100 KB failure row."""
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _read_table(source: str, storage_options: dict[str, Any] | None, manifest: Manifest,
                now: datetime) -> pa.Table | None:
    def fail(reason: str) -> None:
        manifest.failures.append(FailureRecord(stage="read", source=source, reason=reason, at=now))

    fs, path = filesystem(source, storage_options)
    data = with_retries(lambda: fs.cat_file(path), f"read {source}")
    if not data:
        fail("the file is empty (0 bytes), not a Parquet file")
        return None
    try:
        # ParquetFile reads files with repeated column names, so they can be reported below by name.
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError, ValueError, IndexError, TypeError) as error:
        fail(f"not a readable Parquet file ({len(data)} bytes): {_first_line(error)}")
        return None
    repeated = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if repeated:
        fail(f"column {repeated[0]!r} appears more than once; every column name must be unique")
        return None
    if "prompt" not in table.column_names:
        shown = ", ".join(repr(n) for n in table.column_names[:20]) or "no columns"
        fail(f"no 'prompt' column; the file has: {shown}")
        return None
    return table


def _check_row(values: dict[str, Any], context: dict, model_name: str | None,
               adapter_names: set[str] | None) -> RenderRequest | list[tuple[str | None, str]]:
    try:
        request = RenderRequest.model_validate(values, context=context)
    except ValidationError as error:
        return [(e.field, _short(e.reason)) for e in row_errors(error)]
    except Exception as error:  # noqa: BLE001 - a row must never crash the job, whatever it holds
        return [(None, _short(f"row cannot be checked: {type(error).__name__}: {_first_line(error)}"))]
    errors: list[tuple[str | None, str]] = []
    if request.model is not None and model_name is not None and request.model != model_name:
        errors.append(("model", f"row asks for model {request.model!r}, but this job renders {model_name!r}; "
                                "split the manifest per model"))
    unknown = [a.name for a in request.adapters if adapter_names is not None and a.name not in adapter_names]
    if unknown:
        errors.append(("adapters", f"adapter {unknown[0]!r} is not declared in the job's model.adapters"))
    return errors or request


def _id_of(values: dict[str, Any]) -> str | None:
    value = values.get("id")
    return str(value)[:256] if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def request_id_of(request: RenderRequest) -> str:
    """The manifest's id, or a hash of the row's render parameters when it has none."""
    if request.id is not None:
        return request.id
    params = request.model_dump(mode="json", exclude={"id"})
    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=12).hexdigest()
    return f"h-{digest}"
