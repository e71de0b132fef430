"""The run's ledger in OUTPUT: `_job.json`, the metadata parts (images done) and the failure parts.

A metadata part is written in one put after its images exist, so it is whole or absent, and every row
in it points at a complete image. A re-run reads the keys of all parts and renders only the rest.

Versions: OUTPUT holds the first job rendered into it. A job with other render parameters is refused,
unless the user asks for a new version: that renders into OUTPUT/_versions/<n>/ (n = 2, 3, ...) with the
same layout, leaving every earlier version whole. A later run of any recorded job resumes its version.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import TMP_MARK, protocol_of, read_bytes, with_retries, write_bytes
from schemas import FAILURE_SCHEMA, IMAGE_RECORD_SCHEMA, FailureRecord, JobSpec
from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)
JOB_FILE = "_job.json"
VERSIONS = "_versions"


class JobMismatchError(FluxbatchError, ValueError):
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


def check_job(fs: fsspec.AbstractFileSystem, root: str, job: JobSpec, new_version: bool = False) -> str:
    """The folder this job renders into: OUTPUT or the version whose `_job.json` matches the job.

    A first run writes OUTPUT/_job.json. A job matching no recorded version is refused with what differs,
    or, with `new_version`, gets the next OUTPUT/_versions/<n>/ so no image of another version is touched.
    """
    identity = job.identity()
    if not with_retries(lambda: fs.exists(f"{root}/{JOB_FILE}"), f"stat {root}/{JOB_FILE}"):
        _write_job(fs, root, job, version=1)
        return root
    versions = [(1, root)] + _versions(fs, root)
    differences: list[str] = []
    for _, folder in versions:
        recorded = json.loads(read_bytes(fs, f"{folder}/{JOB_FILE}")).get("identity", {})
        differences = _differences(recorded, identity)
        if not differences:
            return folder
    latest, folder = versions[-1]
    if not new_version:
        which = root if latest == 1 else f"{root} (latest version: {folder})"
        raise JobMismatchError(
            f"{which} was rendered by a job with other parameters: {'; '.join(differences)}. "
            "Use a new OUTPUT, or pass --new-version to render this job as a new version "
            f"in {root}/{VERSIONS}/{latest + 1}/."
        )
    folder = f"{root}/{VERSIONS}/{latest + 1}"
    log.warning("job parameters differ from %s (%s); rendering a new version into %s",
                root, "; ".join(differences), folder)
    _write_job(fs, folder, job, version=latest + 1)
    return folder


def _versions(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[int, str]]:
    """The recorded versions after the first, oldest first: OUTPUT/_versions/<n> holding a `_job.json`."""
    base = f"{root}/{VERSIONS}"
    if not with_retries(lambda: fs.exists(base), f"stat {base}"):
        return []
    entries = with_retries(lambda: fs.ls(base, detail=False), f"list {base}")
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        folder = f"{base}/{name}"
        if name.isdigit() and with_retries(lambda f=folder: fs.exists(f"{f}/{JOB_FILE}"), f"stat {folder}"):
            found.append((int(name), folder))
    return sorted(found)


def _write_job(fs: fsspec.AbstractFileSystem, folder: str, job: JobSpec, version: int) -> None:
    document = {
        "identity": job.identity(),
        "job": job.model_dump(mode="json"),  # storage options are excluded by the schema
        "version": version,
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    write_bytes(fs, f"{folder}/{JOB_FILE}", (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def remove_partial_files(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete temporary files a killed writer left on local disk (`write_bytes` renames them when whole).

    Object stores need nothing: a put is atomic. No metadata row ever points at one of these files.
    """
    if protocol_of(fs) not in ("file", "local") or not os.path.isdir(root):
        return 0
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if TMP_MARK in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    if removed:
        log.warning("removed %d partial files left in %s by an interrupted run", removed, root)
    return removed


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
