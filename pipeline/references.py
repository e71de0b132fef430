"""Check every reference image of a manifest on the driver, before anything renders, and record its sha256.

A job submitted to a cluster reads references only under its roots (`--reference-root`, repeatable; default: the
manifest's own folder, or its bucket on S3). A URL with a `..` segment, on another bucket or protocol, outside
every root, or (local disk) whose real path leaves its root through a symlink is a failure row and is never read,
listed or opened. The rest are checked cheaply first: one listing per folder (not one request per row, for a
million rows naming ten thousand photos) says which exist, are files and how big; then each distinct file within
the size limit is read once, hashed, and decoded with the renderers' own rules (flux_worker/references.py: only
PNG, JPEG and WebP, a pixel limit checked from the header before any decoding).

Each reference that fails makes a failure row (stage validate, field reference_images) naming the row, the URL and
why; its row is dropped. The rows kept get each reference's resolved URL and sha256 (REFERENCES_TYPE), which the
planner puts in the image's key: a replaced photo renders anew, an unchanged one is skipped.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol

from flux_worker.references import MAX_REFERENCE_BYTES, ReferenceImageError, decode
from flux_worker.storage import Storage, filesystem
from pipeline.manifest import Manifest
from schemas import FailureRecord, JobSpec
from schemas.errors import FluxbatchError, first_line
from schemas.records import REFERENCES_TYPE

FIELD = "reference_images"
READ_THREADS = 8  # references are read this many at a time: object stores answer in tens of milliseconds each
_ALIASES = {"local": "file", "s3a": "s3"}
TENSOR_PARALLEL = ("not read: tensor-parallel replicas (gpus_per_replica 2 or more) take no reference images yet; "
                   "render rows with references with gpus_per_replica 1")


@dataclass(frozen=True)
class Location:
    """Where a reference is: its protocol ("file", "s3" ...) and its path as that file system names it."""

    protocol: str
    path: str

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def uri(self) -> str:
        return self.path if self.protocol == "file" else f"{self.protocol}://{self.path}"


class Refused(Exception):
    """A reference that is not read: the message says why."""


def default_roots(manifest: str) -> list[str]:
    """The manifest's own folder (a local manifest, file, folder or glob), or its bucket (an object store)."""
    protocol, path = _split(manifest)
    if protocol != "file":
        return [f"{protocol}://{path.split('/', 1)[0]}"]
    for mark in "*?[":  # a glob: the folder above its first wildcard
        path = path.split(mark, 1)[0]
    path = os.path.abspath(os.path.expanduser(path))
    return [path if os.path.isdir(path) else os.path.dirname(path)]


def roots_of(job: JobSpec) -> list[Location]:
    """The job's reference roots (`reference_roots`, else `default_roots`), normalized."""
    roots = []
    for url in job.reference_roots or default_roots(job.manifest):
        protocol, path = _split(url)
        if protocol == "file":
            path = os.path.realpath(os.path.expanduser(path))  # compared with each reference's real path
        roots.append(Location(protocol, path.rstrip("/") or "/"))
    return roots


def locate(url: str, source: str, roots: list[Location]) -> Location:
    """The reference `url` of a row of `source` as a Location inside one of `roots`; Refused when outside.

    A relative path is relative to the manifest file's folder (on its file system), so a manifest and its photos
    move together.
    """
    protocol, path = _split(url)
    if protocol == "file" and not url.startswith("file:") and not os.path.isabs(os.path.expanduser(path)):
        base_protocol, base = _split(source)
        protocol, path = base_protocol, posixpath.join(posixpath.dirname(base), path)
    if ".." in path.split("/"):
        raise Refused("a path with '..' is not allowed in a reference; give the path from its root")
    path = os.path.expanduser(path) if protocol == "file" else path
    path = posixpath.normpath(path) if protocol == "file" else path.strip("/")
    inside = [root for root in roots if root.protocol == protocol and _under(path, root.path)]
    if not inside:
        shown = ", ".join(root.uri for root in roots)
        raise Refused(f"outside the reference roots ({shown}); add its folder or bucket with --reference-root "
                      "(job file: reference_roots)")
    if protocol == "file" and not any(_under(os.path.realpath(path), root.path) for root in inside):
        raise Refused("a symlink (or a folder on its path) points outside the reference roots")
    return Location(protocol, path)


def check_manifest(manifest: Manifest, job: JobSpec, sink: Callable[[FailureRecord], None] | None = None,
                   tensor_parallel: bool = False) -> None:
    """Check the references of `manifest`'s valid rows in place: the failing rows leave `manifest.requests` and
    are counted with its other failures (and sent to `sink`, as read_manifest sends the others).

    `tensor_parallel`: the job's replicas are tensor-parallel groups, whose ranks take no reference images yet;
    every row naming one is then a failure row, nothing read."""

    def report(failure: FailureRecord) -> None:
        manifest.failures.add(failure)
        if sink is not None:
            sink(failure)

    manifest.requests = check_references(manifest.requests, job, report, tensor_parallel=tensor_parallel)


def check_references(requests: pa.Table, job: JobSpec, report: Callable[[FailureRecord], None],
                     roots: list[Location] | None = None, tensor_parallel: bool = False) -> pa.Table:
    """`requests` (REQUEST_SCHEMA rows) without the rows whose references fail, each failure reported; the others'
    references with their resolved URL and sha256."""
    column = requests.column(FIELD)
    if not pc.sum(pc.list_value_length(column).fill_null(0)).as_py():
        return requests  # no row names a reference: nothing to read
    roots = roots if roots is not None else roots_of(job)
    rows = requests.select(["request_id", "source", "row", FIELD]).to_pylist()
    located: dict[tuple[int, int], Location | Refused] = {}  # (position, index) -> where, or why refused
    for position, row in enumerate(rows):
        for index, ref in enumerate(row[FIELD] or []):
            if tensor_parallel:
                located[(position, index)] = Refused(TENSOR_PARALLEL)
                continue
            try:
                located[(position, index)] = locate(ref["url"], row["source"], roots)
            except Refused as refused:
                located[(position, index)] = refused
    found = _Checker(job.storage_options).check({loc for loc in located.values() if isinstance(loc, Location)})

    now = datetime.now(timezone.utc)
    keep, references = [], []
    for position, row in enumerate(rows):
        resolved, bad = [], False
        for index, ref in enumerate(row[FIELD] or []):
            where = located[(position, index)]
            outcome = found[where] if isinstance(where, Location) else where
            if isinstance(outcome, Refused):
                bad = True
                report(FailureRecord(stage="validate", source=row["source"], row=row["row"],
                                     request_id=row["request_id"], field=FIELD, at=now,
                                     reason=f"{FIELD}[{index}] {ref['url']!r}: {outcome}"))
            else:
                resolved.append({"url": where.uri, "sha256": outcome})
        keep.append(not bad)
        references.append(resolved)
    checked = requests.set_column(requests.schema.get_field_index(FIELD), requests.schema.field(FIELD),
                                  pa.array(references, REFERENCES_TYPE))
    return checked.filter(pa.array(keep))


class _Checker:
    """Lists each folder once, then reads and decodes each distinct file once: Location -> sha256, or a reason."""

    def __init__(self, storage_options: dict[str, Any]):
        self.options = storage_options
        self.stores: dict[str, Storage] = {}

    def check(self, locations: set[Location]) -> dict[Location, str | Refused]:
        outcome: dict[Location, str | Refused] = {}
        listed: dict[tuple[str, str], dict[str, dict[str, Any]] | Refused] = {}
        for loc in locations:
            folder = (loc.protocol, loc.folder)
            if folder not in listed:
                listed[folder] = self._listing(loc)
            entries = listed[folder]
            if isinstance(entries, Refused):
                outcome[loc] = entries
                continue
            info = entries.get(loc.path)
            if info is None:
                outcome[loc] = Refused("no such file")
            elif info.get("type") != "file":
                outcome[loc] = Refused("a folder, not an image file")
            elif not info.get("size"):
                outcome[loc] = Refused("an empty file (0 bytes), not an image")
            elif info["size"] > MAX_REFERENCE_BYTES:
                outcome[loc] = Refused(f"{info['size']} bytes; at most {MAX_REFERENCE_BYTES} are allowed")
        readable = [loc for loc in locations if loc not in outcome]
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="fluxbatch-reference") as pool:
            outcome.update(zip(readable, pool.map(self._read, readable)))
        return outcome

    def _store(self, loc: Location) -> Storage:
        if loc.protocol not in self.stores:
            self.stores[loc.protocol] = filesystem(loc.uri, self.options)[0]
        return self.stores[loc.protocol]

    def _listing(self, loc: Location) -> dict[str, dict[str, Any]] | Refused:
        """The folder's entries by path, or why it cannot be listed."""
        store = self._store(loc)
        try:
            entries = store.retry(lambda: store.fs.ls(loc.folder, detail=True), f"list {store.uri(loc.folder)}")
        except FileNotFoundError:
            return Refused("no such file (its folder does not exist)")
        except (FluxbatchError, OSError) as error:
            return Refused(f"cannot list its folder: {first_line(error)}")
        return {_normal(loc.protocol, entry["name"]): entry for entry in entries}

    def _read(self, loc: Location) -> str | Refused:
        """The sha256 of the file (hex), or why it is refused."""
        try:
            data = self._store(loc).read_bytes(loc.path)
        except (FluxbatchError, OSError) as error:
            return Refused(f"cannot be read: {first_line(error)}")
        if len(data) > MAX_REFERENCE_BYTES:  # grew since the listing
            return Refused(f"{len(data)} bytes; at most {MAX_REFERENCE_BYTES} are allowed")
        try:
            decode(data)
        except ReferenceImageError as error:
            return Refused(str(error))
        return hashlib.sha256(data).hexdigest()


def _split(url: str) -> tuple[str, str]:
    protocol, path = split_protocol(url)
    protocol = _ALIASES.get(protocol or "file", protocol or "file")
    return protocol, path


def _normal(protocol: str, name: str) -> str:
    return posixpath.normpath(name) if protocol == "file" else name.strip("/")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
