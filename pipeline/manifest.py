"""Read manifests (a Parquet file, a folder or a glob; local or s3://) and validate their rows.

Problems are data: an unreadable file, a missing column or a bad row becomes a `FailureRecord` naming
the file, the row and the field, and everything else goes on to render.

Every file, whatever its size, takes one path: the column checks (`pipeline/fast_validate.py`) flag the rows
that may be bad, pydantic checks those and writes the messages, and the valid rows become one Arrow table
(`Manifest.requests`) in which a repeated request id is refused after its first row.
"""

from __future__ import annotations

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

from flux_worker.storage import Storage, filesystem
from pipeline.cluster.metrics import FailureCounts
from pipeline.fast_validate import check_file
from schemas import (
    MANIFEST_COLUMNS,
    REQUEST_SCHEMA,
    FailureRecord,
    ModelLimits,
    RenderRequest,
    request_id,
    row_errors,
)
from schemas.errors import FluxbatchError, first_line
from schemas.layout import JOB_FILE
from schemas.records import PLAN_SCHEMA, RESULT_SCHEMA

log = logging.getLogger(__name__)
_RESERVED = set(RESULT_SCHEMA.names) | set(PLAN_SCHEMA.names)
# Rows are checked this many at a time: the rows the column checks flag become Python values for pydantic, so a
# million bad rows are never a million dicts or failure records at once.
CHUNK_ROWS = 10_000
FailureSink = Callable[[FailureRecord], None]


class ManifestError(FluxbatchError, ValueError):
    """The manifest cannot be found at all (nothing matches, or no access)."""


@dataclass
class Manifest:
    """The valid rows as one table, the count of failures of the rest.

    The failures themselves went to `read_manifest`'s sink as they were found; only their counts stay here.
    """

    files: list[str] = field(default_factory=list)
    # Every valid row, in file and row order: REQUEST_SCHEMA columns, then the manifest's extra columns.
    requests: pa.Table = field(default_factory=REQUEST_SCHEMA.empty_table)
    failures: FailureCounts = field(default_factory=FailureCounts)  # `.rows`: the invalid rows
    total_rows: int = 0

    @property
    def extra_fields(self) -> list[pa.Field]:
        """The extra columns, each in its one type over all files."""
        return list(self.requests.schema)[len(REQUEST_SCHEMA):]

    @property
    def valid_count(self) -> int:
        return self.requests.num_rows

    @property
    def image_count(self) -> int:
        """Images the valid rows ask for."""
        return pc.sum(self.requests.column("num_images")).as_py() or 0


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
        found = fs.glob(path, detail=True)
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        if not files:
            raise ManifestError(f"no files match the manifest glob {url!r}")
        for file in files:
            holder = outputs.holding(file.rsplit("/", 1)[0])
            if holder:
                raise ManifestError(
                    f"the manifest glob {url!r} matches {fs.uri(file)}, inside the fluxbatch OUTPUT "
                    f"{fs.uri(holder)}; fluxbatch never reads an OUTPUT as a manifest: narrow the glob to your "
                    "manifest files, or keep OUTPUT outside the manifests' folder")
    elif fs.isdir(path):
        holder = outputs.holding(path)
        if holder:
            raise ManifestError(f"the manifest folder {url!r} is inside the fluxbatch OUTPUT {fs.uri(holder)}; "
                                "fluxbatch never reads an OUTPUT as a manifest: name the folder of your manifests")
        found = fs.find(path)
        skip = {p.rsplit("/", 1)[0] for p in found if p.rsplit("/", 1)[-1] == JOB_FILE} | outputs.own
        files = sorted(p for p in found if p.endswith((".parquet", ".pq")) and not _under(p, skip))
        if not files:
            raise ManifestError(f"the manifest folder {url!r} holds no .parquet files"
                                + (" outside fluxbatch OUTPUT folders" if skip else ""))
    elif fs.exists(path):
        files = [path]
    else:
        raise ManifestError(f"no manifest at {url!r}")
    return [fs.uri(p) for p in files]


def _under(path: str, folders: set[str]) -> bool:
    return any(path == folder or path.startswith(f"{folder}/") for folder in folders)


class _Outputs:
    """Finds the fluxbatch OUTPUT (a folder holding `_job.json`, or this job's own) at or above a folder."""

    def __init__(self, fs: Storage, output: str | None):
        self.fs = fs
        same_store = output is not None and (split_protocol(output)[0] or "file") in fs.protocols
        self.own = {strip_protocol(output).rstrip("/")} if same_store else set()
        self._holds_job: dict[str, bool] = {}  # folder -> has _job.json, asked once per folder

    def holding(self, folder: str) -> str | None:
        path = folder.rstrip("/")
        for own in self.own:
            if _under(path, {own}):
                return own
        while path:  # up to the file system's or bucket's root: a folder inside an OUTPUT is inside it too
            if path not in self._holds_job:
                self._holds_job[path] = self.fs.exists(f"{path}/{JOB_FILE}")
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
    columns: list[str] | None = None,
) -> Manifest:
    """Read and validate every row of every file; duplicates of an id after its first row are refused.

    Each failure goes to `sink` (e.g. `ledger.FailureWriter.add`, or a printer) as it is found, all of one
    row's together, in file and row order, then the rows refused as repeated ids, in file and row order too
    (`refuse_repeats`); the manifest keeps only their counts (`manifest.failures`).
    `output`: this job's OUTPUT, never read as a manifest (see `list_manifest_files`). `columns`: keep only these
    of the valid rows (`fluxbatch validate` keeps what counts them and finds repeats: VALIDATE_COLUMNS), so a
    manifest of ten million rows is checked without holding its prompts.
    """
    manifest = Manifest(files=list_manifest_files(url, storage_options, output))

    def report(failure: FailureRecord) -> None:
        manifest.failures.add(failure)
        if sink is not None:
            sink(failure)

    now = datetime.now(timezone.utc)
    tables: list[tuple[str, pa.Table]] = []
    for source in manifest.files:
        table = _read_table(source, storage_options, report, now)
        if table is not None:
            tables.append((source, table.rename_columns(_carried_names(table.column_names, source))))
    # Files may disagree on an extra column's type; the metadata holds one type per column.
    extra_types = _extra_types([table for _, table in tables])
    rules = _Rules(limits or ModelLimits(), model_name, adapter_names, list(extra_types), now)
    parts = []
    while tables:  # each file's columns are let go once checked: memory holds one file twice, not all
        source, table = tables.pop(0)
        table = _readable(source, table, extra_types, report, now)
        if table is None:
            continue
        manifest.total_rows += table.num_rows
        for valid, failures in _checked(source, table, rules):
            for index in sorted(failures):  # file and row order, as documented
                for failure in failures[index]:
                    report(failure)
            parts.append(valid if columns is None else valid.select(columns))
        del table
    schema = pa.schema(list(REQUEST_SCHEMA) + list(extra_types.values()))
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    requests = pa.concat_tables(parts) if parts else schema.empty_table()
    del parts
    manifest.requests = refuse_repeats(requests, report, now)
    return manifest


@dataclass
class _Rules:
    """What a row is checked against besides its own fields: the model's limits, the job's model and adapters."""

    limits: ModelLimits
    model_name: str | None
    adapter_names: set[str] | None
    extras: list[str]  # the extra columns of every file (each file holds them all, see `_readable`)
    now: datetime


def _checked(source: str, table: pa.Table, rules: _Rules) -> Iterator[tuple[pa.Table, dict[int, list]]]:
    """The file's valid rows and its failures by row, CHUNK_ROWS rows at a time, in row order.

    The column checks run on the whole file; pydantic checks the rows they flag and writes their messages, and
    the flagged rows it passes join the table as it normalized them.
    """
    checked = check_file(table, source, rules.limits, rules.model_name, rules.extras)
    passed_rows = checked.valid.column("row").to_numpy()
    known = [name for name in table.column_names if name in MANIFEST_COLUMNS]
    for start in range(0, table.num_rows, CHUNK_ROWS):
        lo, hi = np.searchsorted(passed_rows, [start, start + CHUNK_ROWS])
        passed = checked.valid.slice(lo, hi - lo)
        lo, hi = np.searchsorted(checked.flagged, [start, start + CHUNK_ROWS])
        indices = checked.flagged[lo:hi]
        if not len(indices):
            yield passed, {}
            continue
        suspects = table.take(pa.array(indices, pa.int64()))
        failures: dict[int, list[FailureRecord]] = {}
        rows, positions = [], []
        for position, (index, values) in enumerate(zip(indices.tolist(), suspects.select(known).to_pylist())):
            result = _check_row(values, rules)
            if isinstance(result, list):
                failures[index] = [FailureRecord(stage="validate", source=source, row=index, request_id=_id_of(values),
                                                 field=name, reason=reason, at=rules.now) for name, reason in result]
                continue
            row = result.model_dump(mode="json")
            references = [{"url": url, "sha256": None} for url in row["reference_images"]]  # REFERENCES_TYPE
            rows.append({**row, "request_id": request_id(row), "reference_images": references, "source": source,
                         "row": index})
            positions.append(position)
        rescued = pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)
        extras = suspects.select(rules.extras).take(pa.array(positions, pa.int64()))
        for name in rules.extras:
            rescued = rescued.append_column(extras.schema.field(name), extras.column(name))
        valid = pa.concat_tables([passed, rescued]).sort_by("row") if rows else passed
        yield valid, failures


def refuse_repeats(valid: pa.Table, report: FailureSink, now: datetime) -> pa.Table:
    """`valid` (every file's valid rows, in file and row order) without the rows whose request id an earlier row
    has; each of those is reported, in file and row order, after the rows' own failures.

    One hash aggregation in Arrow over the ids: ten million rows need no Python object per row (a dict of every
    id once held gigabytes). Only the repeated rows become Python objects, DUPLICATES_SHOWN_AT_ONCE at a time."""
    ids = valid.column("request_id")
    positions = pa.array(np.arange(valid.num_rows, dtype=np.int64))
    first = pa.table({"id": ids, "at": positions}).group_by("id", use_threads=False).aggregate([("at", "min")])
    if first.num_rows == valid.num_rows:
        return valid
    keep = np.zeros(valid.num_rows, dtype=bool)
    keep[first.column("at_min").to_numpy()] = True
    repeats = valid.filter(pa.array(~keep)).select(["request_id", "source", "row", "id"])
    where = valid.select(["source", "row"]).take(
        first.column("at_min").take(pc.index_in(repeats.column("request_id"), value_set=first.column("id"))))
    for start in range(0, repeats.num_rows, DUPLICATES_SHOWN_AT_ONCE):
        chunk, origin = repeats.slice(start, DUPLICATES_SHOWN_AT_ONCE), where.slice(start, DUPLICATES_SHOWN_AT_ONCE)
        for request_id_, source, index, given, (first_source, first_row) in zip(
                *(chunk.column(name).to_pylist() for name in ("request_id", "source", "row", "id")),
                zip(origin.column("source").to_pylist(), origin.column("row").to_pylist())):
            what = f"id {request_id_!r}" if given is not None else "the same render parameters"
            report(FailureRecord(stage="validate", source=source, row=index, request_id=request_id_,
                                 field="id" if given is not None else None,
                                 reason=f"duplicate: {what} as row {first_row} of {first_source}", at=now))
    return valid.filter(pa.array(keep))


DUPLICATES_SHOWN_AT_ONCE = 65_536
# What `fluxbatch validate` keeps of the valid rows: repeats are found by request id (named by source, row and
# whether an id was given), images counted by num_images, references checked by reference_images.
VALIDATE_COLUMNS = ["request_id", "source", "row", "id", "num_images", "reference_images"]


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


def _readable(source: str, table: pa.Table, extra_types: dict[str, pa.Field], report: FailureSink,
              now: datetime) -> pa.Table | None:
    """The file with every extra column of the run, each in its run-wide type (nulls where the file has none);
    None, having reported why, when a column cannot be read, so a file is refused whole or checked whole."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        try:
            _check_values(column)
            columns[name] = column if name in MANIFEST_COLUMNS else _carry(column, extra_types[name].type)
        except (pa.ArrowException, ValueError, OverflowError, UnicodeDecodeError) as error:
            report(FailureRecord(stage="read", source=source, field=name, at=now,
                                 reason=f"column {name!r} ({column.type}) cannot be read: {first_line(error)[:300]}"))
            return None
    for name, item in extra_types.items():
        columns.setdefault(name, pa.nulls(table.num_rows, item.type))
    return pa.table(columns)


def _check_values(column: pa.ChunkedArray) -> None:
    """Raise if a value cannot become Python's (text that is not UTF-8, a date past year 9999), as it will
    for pydantic. Arrow's full validation checks every value's bytes; dates and times are converted to see."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        column.to_pylist()  # Python's own words for what is wrong, e.g. a UnicodeDecodeError
        raise
    if _holds_time(column.type):
        for start in range(0, len(column), CHUNK_ROWS):
            column.slice(start, CHUNK_ROWS).to_pylist()


def _holds_time(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _holds_time(kind.value_type)
    return pa.types.is_temporal(kind) or any(_holds_time(kind.field(i).type) for i in range(kind.num_fields))


def _carry(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """An extra column in its run-wide type; as text (JSON for nested values) where Arrow cannot cast it."""
    if column.type == target:
        return column
    try:
        return column.cast(target)
    except (pa.ArrowException, ValueError, OverflowError):
        if not pa.types.is_string(target):
            raise
        return pa.array([None if v is None else _as_text(v) for v in column.to_pylist()], pa.string())


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _short(reason: str, limit: int = 400) -> str:
    """Reasons may quote a value; a 100 KB cell must not become a 100 KB failure row."""
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _read_table(source: str, storage_options: dict[str, Any] | None, report: FailureSink,
                now: datetime) -> pa.Table | None:
    def fail(reason: str) -> None:
        report(FailureRecord(stage="read", source=source, reason=reason, at=now))

    fs, path = filesystem(source, storage_options)
    data = fs.read_bytes(path)
    if not data:
        fail("the file is empty (0 bytes), not a Parquet file")
        return None
    try:
        # ParquetFile reads files with repeated column names, so they can be reported below by name.
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError, ValueError, IndexError, TypeError) as error:
        fail(f"not a readable Parquet file ({len(data)} bytes): {first_line(error)[:300]}")
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


def _check_row(values: dict[str, Any], rules: _Rules) -> RenderRequest | list[tuple[str | None, str]]:
    try:
        request = RenderRequest.model_validate(values, context={"limits": rules.limits})
    except ValidationError as error:
        return [(e.field, _short(e.reason)) for e in row_errors(error)]
    except Exception as error:  # noqa: BLE001 - a row must never crash the job, whatever it holds
        return [(None, _short(f"row cannot be checked: {first_line(error, typed=True)}"))]
    errors: list[tuple[str | None, str]] = []
    if request.model is not None and rules.model_name is not None and request.model != rules.model_name:
        errors.append(("model", f"row asks for model {request.model!r}, but this job renders {rules.model_name!r}; "
                                "split the manifest per model"))
    declared = rules.adapter_names
    unknown = [a.name for a in request.adapters if declared is not None and a.name not in declared]
    if unknown:
        errors.append(("adapters", f"adapter {unknown[0]!r} is not declared in the job's model.adapters"))
    return errors or request


def _id_of(values: dict[str, Any]) -> str | None:
    value = values.get("id")
    return str(value)[:256] if isinstance(value, (str, int)) and not isinstance(value, bool) else None
