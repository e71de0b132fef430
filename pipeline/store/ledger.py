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
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flux_worker.model_folder import ModelFolder, is_model_url
from flux_worker.presets import PRESETS
from flux_worker.storage import Storage, StorageError
from pipeline.store import compaction_journal
from schemas import FAILURE_SCHEMA, IMAGE_RECORD_SCHEMA, FailureRecord, JobSpec
from schemas.errors import FluxbatchError, first_line
from schemas.layout import FAILURES, JOB_FILE, METADATA, VERSIONS, failure_part, is_part_of_run, metadata_part
from schemas.records import ADDED_COLUMNS, nullable_integers_for_pandas, signed_seeds

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobMismatchError(FluxbatchError, ValueError):
    """OUTPUT was made by a job with different render parameters; mixing them would mix images."""


def parts(fs: Storage, folder: str) -> list[str]:
    """The Parquet files in `folder` (metadata/ or failures/), in name order: for the ledger's live parts, read
    `metadata_parts`, which leaves out what an interrupted compaction left behind."""
    return sorted(part_sizes(fs, folder))


def part_sizes(fs: Storage, folder: str) -> dict[str, int]:
    """The Parquet files in `folder` with their sizes in bytes: one listing."""
    return {path: size for path, size in _listing(fs, folder).items() if path.endswith(".parquet")}


def _listing(fs: Storage, folder: str) -> dict[str, int]:
    """Every file under `folder` with its size: one listing, no existence check first (on S3 that is a HEAD and
    a LIST more for a folder that is not there)."""
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {path: info["size"] for path, info in found.items()}


def metadata_listing(fs: Storage, root: str) -> tuple[dict[str, int], compaction_journal.Journal | None]:
    """The metadata parts of `root` with their sizes, and the journal of an unfinished compaction (None when
    there is none): one listing of metadata/, which shows the journal too, so it is read only when there."""
    found = _listing(fs, f"{root}/{METADATA}")
    journal = compaction_journal.read(fs, root) if compaction_journal.path(root) in found else None
    return {path: size for path, size in found.items() if path.endswith(".parquet")}, journal


def metadata_parts(fs: Storage, root: str) -> list[str]:
    """The live metadata parts of `root`, in name order: the listing, less the parts a compaction's journal says
    are dead (store/compaction_journal.py). Every reader of the ledger lists through here, so a compaction killed
    at any step is read as the ledger it started from or the one it made."""
    sizes, journal = metadata_listing(fs, root)
    return compaction_journal.live(sorted(sizes), journal)


READ_THREADS = 16  # parts are read in parallel: on object storage each read is a round trip


def read_metadata(fs: Storage, root: str, columns: list[str] | None, locate: bool = False,
                  each: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table | None:
    """`columns` of every live metadata part, read in parallel (Parquet column projection), as one table in
    part name order; None when there are none. `locate` adds each row's `part` (its path) and `index` (its row
    in the part), for callers that rewrite parts; `each` is applied to each part as it is read (to shrink it).

    CorruptLedgerError on an unreadable part. A part that vanishes while being read was merged by a compaction
    running beside this reader (`fluxbatch verify` holds no lease): the listing is read again."""
    def read_all() -> pa.Table | None:
        found = metadata_parts(fs, root)
        def read_one(part: str) -> pa.Table:
            table = read_part(fs, root, part, columns)
            return each(table) if each is not None else table  # shrunk as it is read, not once all are

        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(read_one, found))
        if not tables:
            return None
        if locate:
            tables = [table.append_column("part", pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(table.num_rows, np.int32)), pa.array([part])))
                .append_column("index", pa.array(np.arange(table.num_rows, dtype=np.int64)))
                for part, table in zip(found, tables)]
        return pa.concat_tables(tables, promote_options="permissive")

    return again_if_parts_vanish(fs, root, read_all)


def again_if_parts_vanish(fs: Storage, root: str, read: Callable[[], T]) -> T:
    """`read()` (which lists the live parts and reads them), again from a fresh listing when a part it listed
    vanished meanwhile: a compaction running beside a reader that holds no lease (`fluxbatch verify`) merged it.
    Any other missing file is raised as it is."""
    for attempt in range(3):
        listed = metadata_parts(fs, root)
        try:
            return read()
        except (FileNotFoundError, StorageError):
            if attempt == 2 or set(metadata_parts(fs, root)) >= set(listed):
                raise
    raise AssertionError("unreachable")


class CorruptLedgerError(FluxbatchError):
    """A metadata part that is not a readable Parquet table with the ledger's columns: its keys are unknown."""

    def __init__(self, message: str, part: str, reason: str):
        super().__init__(message)
        self.part, self.reason = part, reason  # for `fluxbatch verify`'s report


def read_part(fs: Storage, root: str, part: str, columns: list[str] | None = None) -> pa.Table:
    """One metadata part (only `columns` if given), or CorruptLedgerError naming it and the way out.

    A part is written in one put, so a damaged one was truncated, emptied or replaced from outside; every
    run and `fluxbatch verify` read parts through here so they agree on what counts as unreadable.
    """
    data = fs.read_bytes(part)
    reason = "is empty (0 bytes)"
    if data:
        try:
            file = pq.ParquetFile(pa.BufferReader(data))
            names = file.schema_arrow.names
            missing = [name for name in columns or ["key"] if name not in names and name not in ADDED_COLUMNS]
            if not missing:
                return signed_seeds(_with_added(file.read(columns=[c for c in columns or names if c in names]),
                                                columns))
            reason = f"has no {', '.join(map(repr, missing))} column (not a fluxbatch metadata part)"
        except pa.ArrowException:
            reason = "is not a whole Parquet file (truncated, or another format)"
    raise CorruptLedgerError(
        f"metadata part {fs.uri(part)} {reason}; run `fluxbatch verify {fs.uri(root)} --repair` to move it "
        "aside (its images render again), then run again", part, reason)


def _with_added(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """`table` with each of `columns` its part was written without (ADDED_COLUMNS) as nulls, in `columns`' order."""
    if columns is None or table.column_names == columns:
        return table
    return pa.table({name: table.column(name) if name in table.column_names
                     else pa.nulls(table.num_rows, IMAGE_RECORD_SCHEMA.field(name).type) for name in columns})


def done_keys(fs: Storage, root: str) -> set[str]:
    """Keys of every image recorded in OUTPUT/metadata; CorruptLedgerError on the first unreadable part."""
    table = read_metadata(fs, root, ["key"])
    return set(table.column("key").to_pylist()) if table is not None else set()


def read_table(fs: Storage, root: str, which: str) -> pa.Table | None:
    """All parts of `metadata` or `failures` (METADATA, FAILURES) as one table, or None when there are none.

    The metadata keeps one row per key: the row of the last part in name order. Part names start with the
    run id, a UTC timestamp, so that is the latest commit: a re-rendered key's new row supersedes the old.
    """
    if which == METADATA:
        table = read_metadata(fs, root, None)
        return latest_row_per_key(table) if table is not None else None
    tables = [signed_seeds(pq.read_table(pa.BufferReader(fs.read_bytes(p)))) for p in parts(fs, f"{root}/{which}")]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def latest_row_per_key(table: pa.Table) -> pa.Table:
    """`table` with each key once, its last row kept, rows in their order (a part repeating a key, two parts
    of overlapping runs, a key re-rendered after its prompt changed)."""
    kept = last_row_indices(table.column("key"))
    return table if kept is None else table.take(kept)


def last_row_indices(keys: pa.ChunkedArray | pa.Array) -> pa.Array | None:
    """The index of each key's last row, in row order; None when every key is there once (nothing to drop).

    Keys are hex digests, so the first 16 digits of each, as an integer read straight from Arrow's buffers, tell
    almost every pair of keys apart: a stable sort of those integers finds the few rows that may share a key, and
    only those are compared whole. Ten million keys cost about 30 bytes each and seconds, with no Python object
    per key. Keys of another shape (a foreign part) go through one hash aggregation in Arrow instead."""
    keys = pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys
    prefixes = _hex_prefixes(keys)
    if prefixes is None:
        candidates = np.arange(len(keys), dtype=np.int64)
    else:
        order = np.argsort(prefixes, kind="stable")
        same = prefixes[order[1:]] == prefixes[order[:-1]]
        del prefixes
        if not same.any():
            return None
        candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    rows = pa.table({"key": keys.take(pa.array(candidates)), "row": pa.array(candidates)})
    last = rows.group_by("key", use_threads=False).aggregate([("row", "max")])
    if last.num_rows == len(candidates):
        return None
    keep = np.ones(len(keys), dtype=bool)
    keep[candidates] = False
    keep[last.column("row_max").to_numpy()] = True
    return pa.array(np.flatnonzero(keep))


_HEX_VALUE = np.zeros(256, np.uint64)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)


def _hex_prefixes(keys: pa.ChunkedArray) -> np.ndarray | None:
    """The first 16 characters of each key read as hex digits, as uint64; None unless every key is 32 characters
    (a digest) and none is null. Another character counts as 0: only a tie, settled by comparing whole keys."""
    out = []
    for chunk in keys.chunks:
        n = len(chunk)
        if not n:
            continue
        if chunk.null_count or pc.min_max(pc.binary_length(chunk)).as_py() != {"min": 32, "max": 32}:
            return None
        if chunk.type != pa.string():
            return None
        offsets = np.frombuffer(chunk.buffers()[1], np.int32, n + 1, chunk.offset * 4)
        data = np.frombuffer(chunk.buffers()[2], np.uint8, 32 * n, int(offsets[0])).reshape(n, 32)
        value = np.zeros(n, np.uint64)
        for digit in range(16):
            value = (value << np.uint64(4)) | _HEX_VALUE[data[:, digit]]
        out.append(value)
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def first_failures(fs: Storage, root: str, rows: int) -> tuple[pa.Table | None, int]:
    """The first `rows` failure rows (None when there are none) and the count of all, one part at a time:
    a run may have written millions, and only their count and a few are needed to report them."""
    tables: list[pa.Table] = []
    kept = total = 0
    for part in parts(fs, f"{root}/{FAILURES}"):
        file = pq.ParquetFile(pa.BufferReader(fs.read_bytes(part)))
        total += file.metadata.num_rows
        if kept < rows:
            tables.append(file.read().slice(0, rows - kept))
            kept += tables[-1].num_rows
    return (pa.concat_tables(tables, promote_options="permissive") if tables else None), total


# Identity sections newer than some OUTPUTs: a `_job.json` written before one existed records nothing for it, and a
# re-run goes on in that OUTPUT (its older images carry no marks: `fluxbatch verify --provenance` names them); the
# first such run records its own section (record_added_sections), which later runs must then match.
ADDED_SINCE = ("provenance", "quality")


def check_job(fs: Storage, root: str, job: JobSpec, new_version: bool = False) -> tuple[str, bool]:
    """The folder this job renders into (OUTPUT or the version whose `_job.json` matches the job), and whether this
    call wrote its `_job.json`.

    A first run writes OUTPUT/_job.json. A job matching no recorded version is refused with what differs,
    or, with `new_version`, gets the next OUTPUT/_versions/<n>/ so no image of another version is touched.
    """
    identity = job_identity(job)
    if not fs.exists(f"{root}/{JOB_FILE}"):
        _write_job(fs, root, job, version=1)
        return root, True
    recorded_versions = [(1, root)] + versions(fs, root)
    differences: list[str] = []
    for _, folder in recorded_versions:
        recorded = recorded_identity(fs, folder)
        differences = _differences(recorded, {name: value for name, value in identity.items()
                                              if name in recorded or name not in ADDED_SINCE})
        if not differences:
            return folder, False
    latest, folder = recorded_versions[-1]
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
    return folder, True


class CorruptJobFileError(FluxbatchError, ValueError):
    """`_job.json` is not the JSON record fluxbatch writes: which job made OUTPUT is unknown."""


def job_identity(job: JobSpec) -> dict[str, Any]:
    """What `_job.json` records and a re-run must match: `JobSpec.identity()`, a model folder or model URL named by
    its fingerprint (ModelFolder.fingerprint), so `./tiny`, `/abs/tiny/`, `s3://models/tiny` (a mirror of it)
    and a node's cached copy are one job, and a folder rebuilt with other weights is another."""
    identity = job.identity()
    name = identity["model"]["name"]
    if is_model_url(name):
        folder = ModelFolder(name, job.storage_options)
    elif name not in PRESETS and Path(name).expanduser().is_dir():
        folder = ModelFolder(Path(name).expanduser())
    else:
        return identity
    identity["model"] = {**identity["model"], "name": folder.fingerprint()}
    return identity


def recorded_identity(fs: Storage, folder: str) -> dict[str, Any]:
    """The identity `folder/_job.json` recorded; CorruptJobFileError naming the file when it is not one."""
    path = f"{folder}/{JOB_FILE}"
    data = fs.read_bytes(path)
    try:
        document = json.loads(data)
        identity = document.get("identity", {}) if isinstance(document, dict) else None
    except ValueError as error:  # also bytes that are not UTF-8
        reason = f"not JSON: {first_line(error)}" if data.strip() else "empty"
    else:
        if isinstance(identity, dict) and isinstance(identity.get("model", {}), dict):
            return identity
        reason = "not the job record fluxbatch writes"
    raise CorruptJobFileError(
        f"{fs.uri(path)} is {reason}, so which job made this OUTPUT is unknown: restore the file from a backup, "
        "or render into a new OUTPUT")


def versions(fs: Storage, root: str) -> list[tuple[int, str]]:
    """The recorded versions after the first, oldest first: OUTPUT/_versions/<n> holding a `_job.json`."""
    base = f"{root}/{VERSIONS}"
    if not fs.exists(base):
        return []
    entries = fs.ls(base)
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        folder = f"{base}/{name}"
        if name.isdigit() and fs.exists(f"{folder}/{JOB_FILE}"):
            found.append((int(name), folder))
    return sorted(found)


def record_added_sections(fs: Storage, folder: str, job: JobSpec) -> None:
    """Write into `folder/_job.json` the identity sections (ADDED_SINCE) it was recorded without, once a run is
    under way there: from then on a re-run must match them, so marks once chosen for an older OUTPUT stay chosen.
    Called after the plan is made, so a refused run leaves `_job.json` as it was."""
    path = f"{folder}/{JOB_FILE}"
    document = json.loads(fs.read_bytes(path))
    identity = document.get("identity", {})
    missing = [name for name in ADDED_SINCE if name not in identity]
    if not missing:
        return
    ours = job_identity(job)
    identity.update({name: ours[name] for name in missing})
    log.warning("%s was recorded before fluxbatch recorded %s; recording this run's: %s", fs.uri(path),
                ", ".join(missing), "; ".join(f"{name} {ours[name]}" for name in missing))
    fs.write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def _write_job(fs: Storage, folder: str, job: JobSpec, version: int) -> None:
    document = {
        "identity": job_identity(job),
        "job": job.model_dump(mode="json"),  # storage options are excluded by the schema
        "version": version,
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    fs.write_bytes(f"{folder}/{JOB_FILE}", (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} was {old!r}, now {new!r}"]


def remove_failures_of_other_runs(fs: Storage, root: str, run_id: str) -> int:
    """Drop the failure parts of earlier runs, once this run has written all of its own (at its end).

    This run re-checked those rows and retried those images, so its parts replace theirs; a run that stops
    before its end removes nothing, and failures/ then holds the earlier run's parts beside this run's.
    """
    removed = 0
    for part in parts(fs, f"{root}/{FAILURES}"):
        if part.rsplit("/", 1)[-1].startswith("part-") and not is_part_of_run(part, run_id):
            fs.rm_file(part)
            removed += 1
    return removed


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as one zstd Parquet file in memory: every table fluxbatch writes goes out whole, in one put."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_failures(fs: Storage, root: str, run_id: str, stage: str,
                   failures: Iterable[FailureRecord]) -> None:
    """Write failures that are already at hand as this run's parts of `stage` (see FailureWriter)."""
    writer = FailureWriter(fs, root, run_id, stage)
    for failure in failures:
        writer.add(failure)
    writer.flush()


class FailureWriter:
    """Streams failure rows to `failures/part-<run_id>-<stage>-<n>.parquet`, `rows` at a time.

    It holds at most `rows` records, so a manifest of millions of bad rows costs the driver no more memory
    than one of ten: the rows are in their parts, and the summary keeps only counts (metrics.FailureCounts).
    """

    def __init__(self, fs: Storage, root: str, run_id: str, stage: str, rows: int = 10_000):
        self.fs, self.root, self.run_id, self.stage, self.max_rows = fs, root, run_id, stage, rows
        self._pending: list[dict[str, Any]] = []
        self._seq = 0
        self.written = 0

    def add(self, failure: FailureRecord) -> None:
        self._pending.append(failure.model_dump())
        if len(self._pending) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_pylist(self._pending, schema=FAILURE_SCHEMA)
        path = failure_part(self.root, self.run_id, self.stage, self._seq)
        self.fs.write_bytes(path, parquet_bytes(table))
        self._seq += 1
        self.written += table.num_rows
        self._pending = []


def rewrite_part(fs: Storage, root: str, part: str,
                 drop: Callable[[pa.Table], pa.Array]) -> int:
    """Rewrite a metadata part without the rows `drop(table)` marks; returns the rows removed.

    The one way rows leave the ledger (superseded rows of changed prompts, `fluxbatch verify --repair`). In place
    and whole: one put on object stores, write-then-rename on local disk, so a crash leaves the old part or the
    new one, never a key lost, and the part keeps its name, so name order stays commit order. An emptied part
    is removed.
    """
    table = read_part(fs, root, part)
    kept = table.filter(pc.invert(drop(table)))
    if kept.num_rows == table.num_rows:
        return 0
    if kept.num_rows:
        fs.write_bytes(part, parquet_bytes(kept))
    else:
        fs.rm_file(part)
    return table.num_rows - kept.num_rows


COMMIT_ROWS = 512  # a part holds at most this many rows; `commit_seconds` bounds how long rows wait


class MetadataWriter:
    """Buffers finished images' rows and commits them as metadata parts, every `rows` rows or `seconds`."""

    def __init__(self, fs: Storage, root: str, run_id: str, extra_fields: list[pa.Field], rows: int = COMMIT_ROWS,
                 seconds: float = JobSpec.model_fields["commit_seconds"].default,
                 before_commit: Callable[[], None] | None = None):
        self.fs, self.root, self.run_id = fs, root, run_id
        self.before_commit = before_commit  # e.g. Lease.check: a driver that lost OUTPUT's lease commits nothing
        # The integer columns that hold nulls (best-of-n's) read in pandas as Int32, not float64; the others as
        # they always have (seed int64, variant int32).
        self.schema = nullable_integers_for_pandas(pa.schema(list(IMAGE_RECORD_SCHEMA) + extra_fields),
                                                   ("candidates", "candidate"))
        self.max_rows, self.max_seconds = rows, seconds
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self._seq = 0
        self.written = 0
        self.marks: Counter[str | None] = Counter()  # committed rows by their `provenance` value
        # Best-of-n rows committed, by (request, first candidate's seed) -> their candidates: each row's candidates
        # render once, in one batch (pipeline/plan.py split_best_of), however many of its images are committed.
        self.best_of_rows: dict[tuple[str, int], int] = {}

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
        if self.before_commit is not None:
            self.before_commit()
        table = pa.concat_tables(self._pending)
        path = metadata_part(self.root, self.run_id, self._seq)
        self.fs.write_bytes(path, parquet_bytes(table))
        self._seq += 1
        self.written += table.num_rows
        counts = pc.value_counts(table.column("provenance")).to_pylist()
        self.marks.update({count["values"]: count["counts"] for count in counts})
        best = table.filter(pc.is_valid(table.column("candidates")))
        # A row's images by its first candidate's seed: each image's own less its `candidate`, wrapping as the
        # renderer's addition does (as changed_rows.for_planning takes it).
        first = pc.subtract(best.column("seed"), best.column("candidate").fill_null(0).cast(best.column("seed").type))
        for request, seed, candidates in zip(best.column("request_id").to_pylist(), first.to_pylist(),
                                             best.column("candidates").to_pylist()):
            self.best_of_rows[(request, seed)] = candidates
        self._pending, self._pending_rows = [], 0

    @property
    def candidates_rendered(self) -> int:
        """Best-of-n candidates this writer's runs rendered for the images it committed."""
        return sum(self.best_of_rows.values())
