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
import pyarrow.parquet as pq
from pydantic import ValidationError

from flux_worker.storage import filesystem, uri, with_retries
from schemas import MANIFEST_COLUMNS, FailureRecord, ModelLimits, RenderRequest, row_errors
from schemas.records import RESULT_SCHEMA

log = logging.getLogger(__name__)
_RESERVED = set(RESULT_SCHEMA.names)


class ManifestError(ValueError):
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
    rows: list[ValidRow] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    extra_fields: list[pa.Field] = field(default_factory=list)
    total_rows: int = 0


def list_manifest_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The Parquet files a manifest URL names: itself, the *.parquet under a folder, or a glob's matches."""
    fs, path = filesystem(url, storage_options)
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not files:
            raise ManifestError(f"no files match the manifest glob {url!r}")
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith((".parquet", ".pq")))
        if not files:
            raise ManifestError(f"the manifest folder {url!r} holds no .parquet files")
    elif fs.exists(path):
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
    extra_types: dict[str, pa.Field] = {}
    now = datetime.now(timezone.utc)
    for source in manifest.files:
        table = _read_table(source, storage_options, manifest, now)
        if table is None:
            continue
        extras = [name for name in table.column_names if name not in MANIFEST_COLUMNS]
        renamed = {name: (f"manifest_{name}" if name in _RESERVED else name) for name in extras}
        for name in extras:
            if renamed[name] != name:
                log.warning("%s: column %r is a fluxbatch output column; carried as %r", source, name, renamed[name])
            extra_types.setdefault(renamed[name], table.schema.field(name).with_name(renamed[name]))
        known = [name for name in table.column_names if name in MANIFEST_COLUMNS]
        known_rows = table.select(known).to_pylist()
        extra_rows = table.select(extras).to_pylist() if extras else [{}] * table.num_rows
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
                where = first_seen[request_id]
                what = f"id {request.id!r}" if request.id is not None else "the same render parameters"
                manifest.failures.append(
                    FailureRecord(stage="validate", source=source, row=index, request_id=request_id,
                                  field="id" if request.id is not None else None,
                                  reason=f"duplicate: {what} as row {where[1]} of {where[0]}", at=now)
                )
                continue
            first_seen[request_id] = (source, index)
            manifest.rows.append(
                ValidRow(source, index, request, {renamed[k]: v for k, v in extra.items()})
            )
    manifest.extra_fields = list(extra_types.values())
    return manifest


def _read_table(source: str, storage_options: dict[str, Any] | None, manifest: Manifest,
                now: datetime) -> pa.Table | None:
    def fail(reason: str) -> None:
        manifest.failures.append(FailureRecord(stage="read", source=source, reason=reason, at=now))

    fs, path = filesystem(source, storage_options)
    try:
        data = with_retries(lambda: fs.cat_file(path), f"read {source}")
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as error:
        fail(f"not a readable Parquet file: {str(error).splitlines()[0][:300]}")
        return None
    if "prompt" not in table.column_names:
        fail(f"no 'prompt' column; the file has: {', '.join(table.column_names) or 'no columns'}")
        return None
    return table


def _check_row(values: dict[str, Any], context: dict, model_name: str | None,
               adapter_names: set[str] | None) -> RenderRequest | list[tuple[str | None, str]]:
    try:
        request = RenderRequest.model_validate(values, context=context)
    except ValidationError as error:
        return [(e.field, e.reason) for e in row_errors(error)]
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
