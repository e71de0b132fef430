"""Compaction: merge a ledger's small metadata parts into few large ones, one row per key, under the lease.

A run commits a part every `commit_seconds` or 512 rows, so a three-day run leaves thousands of parts and a daily
catalog job hundreds a year; every run start reads them all. Compaction keeps that bounded:
- which parts: the *tail*, from the first part under SMALL_BYTES to the last in name order. Merging a tail keeps
  name order as commit order: the merged parts are named after the newest part of the tail
  (`layout.compacted_part`), so they sort after every part they replace and before every later run's;
- what it writes: each key's latest row (the row every reader keeps), rows in their order, in parts of at most
  PART_ROWS rows (about 40 MB of zstd Parquet for prompts of a dozen words: benchmarks/README.md);
- when: a run compacts when the tail holds AUTO_PARTS parts or more (after its plan is made, and again at its
  end); `fluxbatch compact OUTPUT` whenever the tail holds two or more.
- in bounded memory: a first pass reads only the keys (column projection) to find the rows kept, a second
  streams the parts, PART_ROWS rows at a time, into the new parts.

Atomic through a journal (store/compaction_journal.py): journal, new parts, journal marked complete, delete the
merged parts, delete the journal. A kill at any step leaves a ledger every reader reads as before or as after,
and the next run, compaction or `verify --repair` (`recover`, first thing under the lease) finishes or undoes it;
a compaction that fails (an error, not a kill) undoes itself at once. Rows are copied, never changed, and images are
not touched: a compaction neither renders nor retires anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from flux_worker.storage import Storage, filesystem
from pipeline.store import compaction_journal, ledger
from schemas.layout import COMPACTED_SEQ, JOB_FILE, PART_NAME, PART_RUN_ID, compacted_part

log = logging.getLogger(__name__)

PART_ROWS = 1_000_000  # rows per compacted part
SMALL_BYTES = 16 * 2**20  # a part under this is merged again: a run's own parts are ~50 kB each
AUTO_PARTS = 16  # a run compacts once the tail holds this many parts: a daily job reads at most 16 small parts
PREFETCH = 16  # parts read ahead while the new parts are written


@dataclass
class Compacted:
    """What one compaction did in one ledger folder."""

    folder: str
    parts_before: int = 0
    parts_after: int = 0
    merged: int = 0  # parts merged
    written: int = 0  # parts written
    rows_before: int = 0  # rows in the merged parts
    rows_after: int = 0  # rows kept: one per key
    seconds: float = 0.0

    def line(self, fs: Storage) -> str:
        if not self.merged:
            return f"{fs.uri(self.folder)}: {_count(self.parts_before, 'metadata part')}, nothing to compact"
        dropped = self.rows_before - self.rows_after
        return (f"{fs.uri(self.folder)}: merged {self.merged} metadata parts into {self.written} "
                f"({self.parts_before} -> {self.parts_after} parts, {self.rows_after:,} rows"
                + (f", {dropped:,} superseded rows dropped" if dropped else "") + f") in {self.seconds:.1f} s")


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def recover(fs: Storage, root: str) -> None:
    """Finish or undo a compaction killed in `root` (see compaction_journal): the caller holds the lease."""
    sizes, journal = ledger.metadata_listing(fs, root)
    if journal is None:
        return
    found = sorted(sizes)
    dead = compaction_journal.dead(found, journal)
    log.warning("%s: finishing a compaction that was interrupted (%s %d parts)", fs.uri(root),
                "removing the merged" if journal.complete else "removing the unfinished",
                len(dead))
    _remove(fs, dead)
    fs.rm_file(compaction_journal.path(root))


def tail(fs: Storage, root: str) -> tuple[list[str], list[str]]:
    """The live parts, and the tail of them a compaction merges (from the first small one on)."""
    sizes, journal = ledger.metadata_listing(fs, root)
    found = compaction_journal.live(sorted(sizes), journal)
    # A Parquet file in metadata/ that fluxbatch did not name is read like a part but never merged, moved or
    # deleted: the tail starts after the last of them, so merging never reorders a part around it.
    foreign = [i for i, part in enumerate(found) if not PART_NAME.search(part)]
    first = foreign[-1] + 1 if foreign else 0
    small = [i for i in range(first, len(found)) if sizes[found[i]] < SMALL_BYTES]
    return found, found[small[0]:] if small else []


def due(fs: Storage, root: str) -> bool:
    """Whether a run should compact `root` now: the tail holds AUTO_PARTS parts or more."""
    return len(tail(fs, root)[1]) >= AUTO_PARTS


def compact(fs: Storage, root: str, check: Callable[[], None] | None = None, least: int = 2) -> Compacted:
    """Merge the tail of `root`'s ledger when it holds `least` parts or more (see the module docstring).

    The caller holds `root`'s lease; `check` (Lease.check) is called before each write, so a driver that lost
    the lease stops writing."""
    started = time.monotonic()
    recover(fs, root)
    found, merging = tail(fs, root)
    result = Compacted(folder=root, parts_before=len(found), parts_after=len(found))
    if len(merging) < least:
        return result
    keep, rows_before = _rows_kept(fs, root, merging)
    kept = sum(len(rows) for rows in keep)
    newest = PART_RUN_ID.search(merging[-1]).group(1)
    first = 1 + max((int(m.group(2)) for p in found if (m := COMPACTED_SEQ.search(p)) and m.group(1) == newest),
                    default=-1)
    written = [compacted_part(root, newest, first + n) for n in range(max(1, -(-kept // PART_ROWS)))]
    names = tuple(compaction_journal.name(part) for part in merging)
    journal = compaction_journal.Journal(merged=names, written=tuple(map(compaction_journal.name, written)))
    _check(check)
    compaction_journal.write(fs, root, journal)
    try:
        for path, table in zip(written, _merged_tables(fs, root, merging, keep), strict=True):
            _check(check)
            fs.write_bytes(path, ledger.parquet_bytes(table))
        _check(check)
        compaction_journal.write(fs, root, dataclasses.replace(journal, complete=True))
        _remove(fs, merging)
        fs.rm_file(compaction_journal.path(root))
    except Exception:  # a failure, not a kill: put the ledger back in one piece now, not at the next run
        with contextlib.suppress(Exception):  # the store failing again: the journal stays, and says what is live
            recover(fs, root)
        raise
    result.merged, result.written = len(merging), len(written)
    result.parts_after = len(found) - len(merging) + len(written)
    result.rows_before, result.rows_after = rows_before, kept
    result.seconds = time.monotonic() - started
    log.info("%s", result.line(fs))
    return result


def compact_output(url: str, storage_options: dict[str, Any] | None = None) -> list[Compacted]:
    """`fluxbatch compact OUTPUT`: compact OUTPUT and each of its versions, each under its lease (a running
    driver's OUTPUT is refused with who holds it)."""
    from pipeline.store.lease import hold
    from pipeline.store.verify import NotAnOutputError

    fs, root = filesystem(url, storage_options)
    if not fs.exists(f"{root}/{JOB_FILE}"):
        raise NotAnOutputError(f"{fs.uri(root)} is not a fluxbatch OUTPUT (no {JOB_FILE}); nothing compacted")
    holder = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-compact-" + uuid.uuid4().hex[:6]
    results = []
    for folder in [root] + [folder for _, folder in ledger.versions(fs, root)]:
        with hold(fs, folder, holder) as held:
            results.append(compact(fs, folder, check=held.check))
    return results


def _check(check: Callable[[], None] | None) -> None:
    if check is not None:
        check()


def _rows_kept(fs: Storage, root: str, merging: list[str]) -> tuple[list[np.ndarray], int]:
    """For each part merged, the indices of the rows kept (each key's latest row over the tail; a key of an
    earlier part that is not merged keeps its row there, superseded by this one as before), and the rows read."""
    with ThreadPoolExecutor(ledger.READ_THREADS) as pool:
        tables = list(pool.map(lambda part: ledger.read_part(fs, root, part, ["key"]).cast(
            pa.schema([("key", pa.string())])), merging))
    counts = np.array([table.num_rows for table in tables], np.int64)
    keys = pa.chunked_array([table.column("key") for table in tables], pa.string())
    del tables
    last = ledger.last_row_indices(keys)
    rows = np.arange(len(keys), dtype=np.int64) if last is None else last.to_numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    bounds = np.searchsorted(rows, starts)
    keep = [rows[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(merging))]
    return keep, int(counts.sum())


def _merged_tables(fs: Storage, root: str, merging: list[str], keep: list[np.ndarray]) -> Iterator[pa.Table]:
    """The kept rows of `merging`, in order, PART_ROWS at a time (the last table holds the rest; one empty
    table when nothing is kept). Parts are read PREFETCH ahead, so memory holds about one new part. Carried
    columns differ between manifests: a new part has the union of its rows' columns, a missing one null, as
    every reader of the ledger combines parts."""
    pending: list[pa.Table] = []
    rows = 0
    with ThreadPoolExecutor(ledger.READ_THREADS) as pool:
        for start in range(0, len(merging), PREFETCH):
            batch = merging[start:start + PREFETCH]
            for table, indices in zip(pool.map(lambda part: ledger.read_part(fs, root, part), batch),
                                      keep[start:start + PREFETCH]):
                pending.append(table.take(pa.array(indices)))
                rows += len(indices)
                while rows >= PART_ROWS:
                    merged = pa.concat_tables(pending, promote_options="permissive").combine_chunks()
                    yield merged.slice(0, PART_ROWS)
                    rest = merged.slice(PART_ROWS)
                    pending, rows = [rest], rest.num_rows
    if rows or not any(len(indices) for indices in keep):
        yield pa.concat_tables(pending, promote_options="permissive")


def _remove(fs: Storage, paths: list[str]) -> None:
    fs.rm_files(paths)  # on S3 one request per 1,000 parts
