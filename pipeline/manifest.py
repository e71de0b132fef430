"""Read manifests (a Parquet file, a folder or a glob; local or s3://) and validate their rows.

Problems are data: an unreadable file, a missing column or a bad row becomes a `FailureRecord` naming
the file, the row and the field, and everything else goes on to render.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol, strip_protocol
from pydantic import ValidationError

from flux_worker.storage import filesystem, uri, with_retries
from pipeline.fast_validate import REQUEST_SCHEMA, check_file
from pipeline.ledger import JOB_FILE
from pipeline.metrics import FailureCounts
from schemas import MANIFEST_COLUMNS, FailureRecord, ModelLimits, OutputFormat, RenderRequest, row_errors
from schemas.errors import FluxbatchError
from schemas.records import RESULT_SCHEMA

log = logging.getLogger(__name__)
_RESERVED = set(RESULT_SCHEMA.names)
# Files this long are checked by columns first (pipeline/fast_validate.py); shorter ones row by row,
# where the cost is nothing and the checks are the reference.
VECTORIZE_FROM_ROWS = 2048
# Rows become Python values this many at a time (the flagged rows of the column path, every row of the
# per-row path), so a million bad rows are never a million dicts or failure records at once.
CHUNK_ROWS = 10_000
FailureSink = Callable[[FailureRecord], None]


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
    """The rows that passed validation, the count of failures of the rest, and the extra columns' types.

    The failures themselves went to `read_manifest`'s sink as they were found; only their counts stay here.
    """

    files: list[str] = field(default_factory=list)
    checked_rows: list[ValidRow] = field(default_factory=list)  # validated one by one
    tables: list[pa.Table] = field(default_factory=list)  # validated by columns: REQUEST_SCHEMA, then extras
    failures: FailureCounts = field(default_factory=FailureCounts)  # `.rows`: the invalid rows
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


def list_manifest_files(url: str, storage_options: dict[str, Any] | None = None,
                        output: str | None = None) -> list[str]:
    """The Parquet files a manifest URL names: itself, the *.parquet under a folder, or a glob's matches.

    Discovery never reads an OUTPUT: a folder's walk skips every folder holding `_job.json` (a fluxbatch
    OUTPUT, with its metadata/, failures/, _versions/...) and `output`, this job's OUTPUT, even before it has
    one; a glob matching a file inside either, or a folder inside one, is refused. A file named on its own is
    read wherever it is: the user chose it (`fluxbatch synthesize` renders the manifest it wrote into OUTPUT).
    """
    fs, path = filesystem(url, storage_options)
    outputs = _Outputs(fs, output)
    if any(ch in path for ch in "*?["):
        # glob(detail=True) lists once; calling isfile per match would cost one request each on S3.
        found = with_retries(lambda: fs.glob(path, detail=True), f"list {url}")
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        if not files:
            raise ManifestError(f"no files match the manifest glob {url!r}")
        for file in files:
            holder = outputs.holding(file.rsplit("/", 1)[0])
            if holder:
                raise ManifestError(
                    f"the manifest glob {url!r} matches {uri(fs, file)}, inside the fluxbatch OUTPUT "
                    f"{uri(fs, holder)}; fluxbatch never reads an OUTPUT as a manifest: narrow the glob to your "
                    "manifest files, or keep OUTPUT outside the manifests' folder")
    elif with_retries(lambda: fs.isdir(path), f"stat {url}"):
        holder = outputs.holding(path)
        if holder:
            raise ManifestError(f"the manifest folder {url!r} is inside the fluxbatch OUTPUT {uri(fs, holder)}; "
                                "fluxbatch never reads an OUTPUT as a manifest: name the folder of your manifests")
        found = with_retries(lambda: fs.find(path), f"list {url}")
        skip = {p.rsplit("/", 1)[0] for p in found if p.rsplit("/", 1)[-1] == JOB_FILE} | outputs.own
        files = sorted(p for p in found if p.endswith((".parquet", ".pq")) and not _under(p, skip))
        if not files:
            raise ManifestError(f"the manifest folder {url!r} holds no .parquet files"
                                + (" outside fluxbatch OUTPUT folders" if skip else ""))
    elif with_retries(lambda: fs.exists(path), f"stat {url}"):
        files = [path]
    else:
        raise ManifestError(f"no manifest at {url!r}")
    return [uri(fs, p) for p in files]


def _under(path: str, folders: set[str]) -> bool:
    return any(path == folder or path.startswith(f"{folder}/") for folder in folders)


class _Outputs:
    """Finds the fluxbatch OUTPUT (a folder holding `_job.json`, or this job's own) at or above a folder."""

    def __init__(self, fs: Any, output: str | None):
        self.fs = fs
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        same_store = output is not None and (split_protocol(output)[0] or "file") in protocols
        self.own = {strip_protocol(output).rstrip("/")} if same_store else set()
        self._holds_job: dict[str, bool] = {}  # folder -> has _job.json, asked once per folder

    def holding(self, folder: str) -> str | None:
        path = folder.rstrip("/")
        for own in self.own:
            if _under(path, {own}):
                return own
        while path:  # up to the file system's or bucket's root: a folder inside an OUTPUT is inside it too
            if path not in self._holds_job:
                self._holds_job[path] = with_retries(lambda p=path: self.fs.exists(f"{p}/{JOB_FILE}"),
                                                     f"stat {path}/{JOB_FILE}")
            if self._holds_job[path]:
                return path
            path = path.rsplit("/", 1)[0] if "/" in path else ""
        return None


def read_manifest(
    url: str,
    storage_options: dict[str, Any] | None = None,
    limits: ModelLimits | None = None,
    model_name: str | None = None,
    adapter_names: set[str] | None = None,
    output: str | None = None,
    sink: FailureSink | None = None,
) -> Manifest:
    """Read and validate every row of every file; duplicates of an id after its first row are refused.

    Each failure goes to `sink` (e.g. `ledger.FailureWriter.add`, or a printer) as it is found, all of one
    row's together, in file and row order; the manifest keeps only their counts (`manifest.failures`).
    `output`: this job's OUTPUT, never read as a manifest (see `list_manifest_files`).
    """
    manifest = Manifest(files=list_manifest_files(url, storage_options, output))

    def report(failure: FailureRecord) -> None:
        manifest.failures.add(failure)
        if sink is not None:
            sink(failure)

    context = {"limits": limits or ModelLimits()}
    first_seen: dict[str, tuple[str, int]] = {}
    now = datetime.now(timezone.utc)
    tables: list[tuple[str, pa.Table]] = []
    for source in manifest.files:
        table = _read_table(source, storage_options, report, now)
        if table is not None:
            tables.append((source, table.rename_columns(_carried_names(table.column_names, source))))
    # Files may disagree on an extra column's type; the metadata holds one type per column.
    extra_types = _extra_types([table for _, table in tables])
    for source, table in tables:
        if _read_by_columns(source, table, extra_types, manifest, report, context, model_name, adapter_names,
                            first_seen, now):
            continue
        chunks = _rows(source, table, extra_types, report, now)
        if chunks is None:
            continue
        manifest.total_rows += table.num_rows
        for start, known_rows, extra_rows in chunks:
            for index, values, extra in zip(range(start, start + len(known_rows)), known_rows, extra_rows):
                result = _check_row(values, context, model_name, adapter_names)
                if isinstance(result, list):
                    for name, reason in result:
                        report(FailureRecord(stage="validate", source=source, row=index, request_id=_id_of(values),
                                             field=name, reason=reason, at=now))
                    continue
                request_id = request_id_of(result)
                if request_id in first_seen:
                    report(_duplicate(source, index, request_id, result.id is not None, first_seen[request_id], now))
                    continue
                first_seen[request_id] = (source, index)
                manifest.checked_rows.append(ValidRow(source, index, result, extra))
    manifest.extra_fields = list(extra_types.values())
    return manifest


def _read_by_columns(source: str, table: pa.Table, extra_types: dict[str, pa.Field], manifest: Manifest,
                     report: FailureSink, context: dict, model_name: str | None, adapter_names: set[str] | None,
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
    valid = checked.valid
    keep = np.ones(valid.num_rows, dtype=bool)  # False: a repeated request id, refused after its first row
    flagged = _flagged_rows(source, table, checked.flagged, extras, context, model_name, adapter_names, now)
    # Both kinds of rows in row order, so a repeated request id is refused after its first row whichever kind
    # each is, and failures leave in row order as the per-row path sends them.
    for index, outcome in heapq.merge(_passed_rows(valid), flagged, key=lambda item: item[0]):
        if isinstance(outcome, list):
            for failure in outcome:
                report(failure)
            continue
        if isinstance(outcome, ValidRow):
            request_id, has_id = request_id_of(outcome.request), outcome.request.id is not None
        else:
            request_id, has_id = outcome.request_id, outcome.has_id
        if request_id in first_seen:
            report(_duplicate(source, index, request_id, has_id, first_seen[request_id], now))
            if not isinstance(outcome, ValidRow):
                keep[outcome.position] = False
            continue
        first_seen[request_id] = (source, index)
        if isinstance(outcome, ValidRow):
            manifest.checked_rows.append(outcome)
    manifest.tables.append(valid if keep.all() else valid.filter(pa.array(keep)))
    return True


@dataclass
class _PassedRow:
    """A row the column checks passed: where it is in the checked table, and its request id."""

    position: int
    request_id: str
    has_id: bool


def _passed_rows(valid: pa.Table) -> Iterator[tuple[int, _PassedRow]]:
    """(row, _PassedRow) for the rows the column checks passed, in row order, CHUNK_ROWS at a time."""
    for start in range(0, valid.num_rows, CHUNK_ROWS):
        part = valid.slice(start, CHUNK_ROWS)
        rows, ids = part.column("row").to_pylist(), part.column("request_id").to_pylist()
        has_id = pc.is_valid(part.column("id")).to_pylist()
        for offset in range(part.num_rows):
            yield rows[offset], _PassedRow(start + offset, ids[offset], has_id[offset])


def _flagged_rows(source: str, table: pa.Table, flagged: np.ndarray, extras: list[str], context: dict,
                  model_name: str | None, adapter_names: set[str] | None,
                  now: datetime) -> Iterator[tuple[int, list[FailureRecord] | ValidRow]]:
    """(row, its failures or the ValidRow pydantic made of it) for each flagged row, in row order, checked
    CHUNK_ROWS at a time: a file of a million flagged rows never holds a million dicts or records."""
    known = [name for name in table.column_names if name in MANIFEST_COLUMNS]
    for start in range(0, len(flagged), CHUNK_ROWS):
        indices = flagged[start:start + CHUNK_ROWS]
        suspects = table.take(pa.array(indices, pa.int64()))
        for index, values, extra in zip(indices.tolist(), suspects.select(known).to_pylist(),
                                        suspects.select(extras).to_pylist()):
            result = _check_row(values, context, model_name, adapter_names)
            if isinstance(result, list):
                yield index, [FailureRecord(stage="validate", source=source, row=index, request_id=_id_of(values),
                                            field=name, reason=reason, at=now) for name, reason in result]
            else:
                yield index, ValidRow(source, index, result, extra)


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


def _rows(source: str, table: pa.Table, extra_types: dict[str, pa.Field], report: FailureSink,
          now: datetime) -> Iterator[tuple[int, list[dict[str, Any]], list[dict[str, Any]]]] | None:
    """The file's rows as Python values, CHUNK_ROWS at a time as (first row, manifest columns as stored,
    extras in their run-wide type); None, having reported why, when a column cannot be converted.

    Every chunk is converted once before the first is handed out, so a file is refused whole or checked whole.
    """
    starts = range(0, max(table.num_rows, 1), CHUNK_ROWS)
    first = _columns(source, table.slice(0, CHUNK_ROWS), extra_types, report, now)
    if first is None or any(_columns(source, table.slice(start, CHUNK_ROWS), extra_types, report, now) is None
                            for start in starts[1:]):
        return None

    def chunks() -> Iterator[tuple[int, list[dict[str, Any]], list[dict[str, Any]]]]:
        for start in starts:
            known, extras = first if start == 0 else _columns(source, table.slice(start, CHUNK_ROWS), extra_types,
                                                              report, now)
            count = min(CHUNK_ROWS, table.num_rows - start)
            yield (start, [{name: values[i] for name, values in known.items()} for i in range(count)],
                   [{name: values[i] for name, values in extras.items()} for i in range(count)])

    return chunks()


def _columns(source: str, table: pa.Table, extra_types: dict[str, pa.Field], report: FailureSink,
             now: datetime) -> tuple[dict[str, list[Any]], dict[str, list[Any]]] | None:
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
            report(FailureRecord(stage="read", source=source, field=name, at=now,
                                 reason=f"column {name!r} ({column.type}) cannot be read: {_first_line(error)}"))
            return None
    return known, extras


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


def _read_table(source: str, storage_options: dict[str, Any] | None, report: FailureSink,
                now: datetime) -> pa.Table | None:
    def fail(reason: str) -> None:
        report(FailureRecord(stage="read", source=source, reason=reason, at=now))

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
