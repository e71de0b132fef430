"""The run's ledger in OUTPUT: `_job.json`, the metadata parts (images done) and the failure parts.

A metadata part is written in one put after its images exist, so it is whole or absent, and every row
in it points at a complete image. A re-run reads the keys of all parts and renders only the rest.
"""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import read_bytes, with_retries, write_bytes
from schemas import FAILURE_SCHEMA, IMAGE_RECORD_SCHEMA, FailureRecord, JobSpec

log = logging.getLogger(__name__)
JOB_FILE = "_job.json"


class JobMismatchError(ValueError):
    """OUTPUT was made by a job with different render parameters; mixing them would mix images."""


def _parts(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    if not with_retries(lambda: fs.exists(folder), f"list {folder}"):
        return []
    found = with_retries(lambda: fs.find(folder), f"list {folder}")
    return sorted(p for p in found if p.endswith(".parquet"))


def done_keys(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Keys of every image recorded in OUTPUT/metadata."""
    keys: set[str] = set()
    for part in _parts(fs, f"{root}/metadata"):
        table = pq.read_table(pa.BufferReader(read_bytes(fs, part)), columns=["key"])
        keys.update(table.column("key").to_pylist())
    return keys


def read_table(fs: fsspec.AbstractFileSystem, root: str, which: str) -> pa.Table | None:
    """All parts of `metadata` or `failures` as one table, or None when there are none."""
    tables = [pq.read_table(pa.BufferReader(read_bytes(fs, p))) for p in _parts(fs, f"{root}/{which}")]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def check_job(fs: fsspec.AbstractFileSystem, root: str, job: JobSpec, new_version: bool = False) -> None:
    """Write `_job.json` on a first run; on a re-run refuse a job whose identity differs, saying how."""
    path = f"{root}/{JOB_FILE}"
    identity = job.identity()
    if with_retries(lambda: fs.exists(path), f"stat {path}") and not new_version:
        recorded = json.loads(read_bytes(fs, path)).get("identity", {})
        differences = _differences(recorded, identity)
        if differences:
            raise JobMismatchError(
                f"{root} was rendered by a job with other parameters: {'; '.join(differences)}. "
                "Use a new OUTPUT, or pass --new-version to render this job as a new version in place."
            )
        return
    document = {
        "identity": identity,
        "job": job.model_dump(mode="json"),  # storage options are excluded by the schema
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    write_bytes(fs, path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} was {old!r}, now {new!r}"]


def clear_failures(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Drop the previous run's failure parts: this run retries those images and re-checks those rows."""
    for part in _parts(fs, f"{root}/failures"):
        with_retries(lambda p=part: fs.rm_file(p), f"remove {part}")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_failures(fs: fsspec.AbstractFileSystem, root: str, name: str, failures: list[FailureRecord]) -> None:
    if not failures:
        return
    table = pa.Table.from_pylist([f.model_dump() for f in failures], schema=FAILURE_SCHEMA)
    write_bytes(fs, f"{root}/failures/part-{name}.parquet", _parquet_bytes(table))


class MetadataWriter:
    """Buffers finished images' rows and commits them as metadata parts, every `rows` rows or `seconds`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, run_id: str, extra_fields: list[pa.Field],
                 rows: int = 512, seconds: float = 30.0):
        self.fs, self.root, self.run_id = fs, root, run_id
        self.schema = pa.schema(list(IMAGE_RECORD_SCHEMA) + extra_fields)
        self.max_rows, self.max_seconds = rows, seconds
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self._seq = 0
        self.written = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.select(self.schema.names).cast(self.schema))
            self._pending_rows += table.num_rows
        if self._pending_rows >= self.max_rows or time.monotonic() - self._last_flush >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        path = f"{self.root}/metadata/part-{self.run_id}-{self._seq:05d}.parquet"
        write_bytes(self.fs, path, _parquet_bytes(table))
        self._seq += 1
        self.written += table.num_rows
        self._pending, self._pending_rows = [], 0
