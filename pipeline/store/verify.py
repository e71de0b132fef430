"""`fluxbatch verify OUTPUT [--repair] [--provenance]`: check the ledger against the images, put right what it finds.

The metadata parts are the ledger (pipeline/store/ledger.py): a run renders only the keys no part holds, so a
damaged ledger either stops every run or silently claims images that are not there. Verify checks, in
OUTPUT and in each OUTPUT/_versions/<n>/:
- every metadata part is a readable Parquet table with the columns key, image_uri, sha256, bytes;
- every row's image exists in this OUTPUT with the recorded byte count and sha256 (the image is looked
  up under OUTPUT/images/<kk>/ by the file name in image_uri, so a copied or moved OUTPUT verifies too);
- no key is held by two rows;
- no image under images/ lacks a row (an orphan: a killed driver rendered it but never committed it);
- with `--provenance`, every image carries the marks its row records (pipeline/store/provenance_check.py);
- and it lists the groups of near-duplicate images (perceptual hashes within `--duplicate-distance` bits), which
  are not problems: nothing is done to them.
Only names fluxbatch writes count as images (images/<kk>/<key>[.<run id>].<png|jpg|webp>: schemas/layout.py);
any other file is not ours and is neither reported nor touched.

`--repair` holds each folder's lease (pipeline/store/lease.py), so it never races a running driver, and deletes
nothing outright: what it takes out of the ledger goes to OUTPUT/_quarantine/<repair id>/, at its path
relative to OUTPUT.
- an unreadable part is moved aside; its keys render again on the next run;
- of rows sharing a key, the last one (last part in name order, last row in it) stays, as the ledger reader
  keeps it; the others are dropped;
- a row whose image is missing or has other bytes is dropped (the key renders again), and the altered image
  is moved aside;
- orphan images are moved aside.
A part that loses rows is copied aside as it was, then rewritten in place without them (`ledger.rewrite_part`,
whole or not at all): a crash leaves the old part or the new one, never a key lost.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage, filesystem
from pipeline.store import compaction, ledger
from pipeline.store.candidate_files import CandidateCheck, check_candidates
from pipeline.store.committed_images import full_paths, image_listing, image_names, move_aside
from pipeline.store.lease import hold
from pipeline.store.provenance_check import check_folder_provenance
from pipeline.store.quality_signals import read_signals
from schemas.errors import FluxbatchError
from schemas.layout import JOB_FILE, QUARANTINE, quarantine_folder
from schemas.quality import DEFAULT_DUPLICATE_DISTANCE

COLUMNS = ["key", "image_uri", "sha256", "bytes"]
# The columns' types as fluxbatch writes them; a part another tool rewrote (large_string, int32) is read as these.
KEPT_SCHEMA = pa.schema([("key", pa.string()), ("image_uri", pa.string()), ("sha256", pa.string()),
                         ("bytes", pa.int64())])
SHOWN = 5  # offenders named per kind of problem; the counts cover all
HASH_THREADS = 16  # images are hashed in parallel: on object storage each read is a round trip
HASH_CHUNK = 10_000  # images hashed per round: their paths are the only Python objects per image verify holds


class NotAnOutputError(FluxbatchError):
    """The folder given to `verify` holds no `_job.json`: it is not a fluxbatch OUTPUT, so nothing is touched."""


@dataclass
class FolderCheck:
    """What verify found in one ledger folder: OUTPUT itself or one of its versions."""

    folder: str
    parts: int = 0
    rows: int = 0
    images: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # part -> why
    duplicates: dict[str, int] = field(default_factory=dict)  # key -> rows holding it
    missing: dict[str, str] = field(default_factory=dict)  # key -> image path expected
    altered: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (image path, how it differs)
    orphans: list[str] = field(default_factory=list)  # image paths no row names
    unmarked: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (image path, the mark it lacks)
    marks_checked: int | None = None  # images whose marks were read back (None: --provenance not asked)
    candidates: CandidateCheck = field(default_factory=CandidateCheck)  # best-of-n candidate files (--keep-candidates)
    # Groups of images whose perceptual hashes are near (pipeline/store/quality_signals.py): reported, not problems.
    near_duplicates: list[list[str]] = field(default_factory=list)
    drop: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # part -> rows repair drops

    @property
    def problems(self) -> int:
        return (len(self.unreadable) + len(self.duplicates) + len(self.missing) + len(self.altered)
                + len(self.orphans) + len(self.unmarked) + self.candidates.problems)


@dataclass
class Verification:
    """The result of `verify_output`: one check per folder, and where repair moved things (if it ran)."""

    output: str
    checks: list[FolderCheck]
    fs: Any
    quarantine: str | None = None
    moved: int = 0  # files repair moved into the quarantine folder

    @property
    def problems(self) -> int:
        return sum(check.problems for check in self.checks)

    @property
    def unmarked(self) -> int:
        """Images lacking a provenance mark: repair cannot add one, so these are problems after it too."""
        return sum(len(check.unmarked) for check in self.checks)

    def report(self) -> str:
        """The short report `fluxbatch verify` prints: counts per problem kind and the first offenders."""
        lines: list[str] = []
        for check in self.checks:
            lines += _folder_report(self.fs, check)
        if not self.problems:
            lines.append(f"{self.output}: clean")
        elif self.quarantine is None and self.problems == self.unmarked:
            pass
        elif self.quarantine is None:
            lines.append(f"{self.problems} problems; `fluxbatch verify {self.output} --repair` moves unreadable parts "
                         f"and orphan or altered images aside into {self.output}/{QUARANTINE}/ and drops duplicate "
                         "rows and rows without their image (those keys render again on the next run)")
        else:
            dropped = sum(len(rows) for c in self.checks for rows in c.drop.values())
            lines.append(f"repaired: {self.moved} files moved aside into {self.fs.uri(self.quarantine)}, {dropped} "
                         "ledger rows dropped; the keys no longer in the ledger render again on the next run")
        # Altered or missing images render again after --repair, marked; the others are committed as written.
        kept = sum(1 for check in self.checks for key in check.unmarked
                   if key not in check.altered and key not in check.missing)
        if kept:
            lines.append(f"{kept} image{'s' if kept > 1 else ''} as written lack{'' if kept > 1 else 's'} provenance "
                         "marks: neither --repair nor a re-run marks a committed image; render those rows into a new "
                         "OUTPUT to have them marked (a picture that could not hold the watermark: PNG and larger "
                         "images hold it better; docs/provenance.md)")
        return "\n".join(lines)


def verify_output(url: str, storage_options: dict[str, Any] | None = None, repair: bool = False,
                  provenance: bool = False, duplicate_distance: int = DEFAULT_DUPLICATE_DISTANCE) -> Verification:
    """Check OUTPUT and each of its versions; with `repair`, put each folder right under its lease; with
    `provenance`, also read each image's marks back (repair leaves those findings as they are). Each folder's
    near-duplicate groups (hashes within `duplicate_distance` bits) are reported; nothing is done to them."""
    result = _verify(url, storage_options, repair, provenance)
    for check in result.checks:
        if not check.unreadable:  # else the ledger cannot be read whole: the parts are the problem to fix first
            check.near_duplicates = read_signals(result.fs, check.folder, duplicate_distance, scores=False).groups
    return result


def _verify(url: str, storage_options: dict[str, Any] | None, repair: bool, provenance: bool) -> Verification:
    fs, root = filesystem(url, storage_options)
    if not fs.exists(f"{root}/{JOB_FILE}"):
        raise NotAnOutputError(f"{fs.uri(root)} is not a fluxbatch OUTPUT (no {JOB_FILE}); nothing checked")
    folders = [root] + [folder for _, folder in ledger.versions(fs, root)]
    result = Verification(output=fs.uri(root), checks=[], fs=fs)
    if not repair:
        result.checks = [_with_candidates(fs, check_folder(fs, folder)) for folder in folders]
        if provenance:
            _check_marks(fs, result.checks)
        return result
    repair_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-repair-" + uuid.uuid4().hex[:6]
    result.quarantine = quarantine_folder(root, repair_id)
    for folder in folders:
        with hold(fs, folder, repair_id):  # no driver commits or writes images here meanwhile
            compaction.recover(fs, folder)  # a killed compaction's dead parts go first: they hold no live row
            check = _with_candidates(fs, check_folder(fs, folder))
            result.moved += repair_folder(fs, root, check, result.quarantine)
        result.checks.append(check)
    if provenance:  # of the images repair left in the ledger
        _check_marks(fs, result.checks)
    return result


def _with_candidates(fs: Storage, check: FolderCheck) -> FolderCheck:
    """`check` with its folder's best-of-n candidate files checked (pipeline/store/candidate_files.py): the rows
    naming a missing or altered one are dropped by repair, like a row whose image is missing."""
    if check.unreadable:
        return check  # the ledger cannot be read whole: the parts are the problem to fix first
    check.candidates = check_candidates(fs, check.folder)
    for part, index in check.candidates.drop:
        check.drop[part].add(index)
    return check


def _check_marks(fs: Storage, checks: list[FolderCheck]) -> None:
    """Each folder's images lacking a mark, with the watermark text its `_job.json` records."""
    for check in checks:
        watermark = ledger.recorded_identity(fs, check.folder).get("provenance", {}).get("watermark")
        check.unmarked, check.marks_checked = check_folder_provenance(fs, check.folder, watermark,
                                                                      set(check.unreadable))


def check_folder(fs: Storage, folder: str) -> FolderCheck:
    """`check_folder_once`; again from a fresh listing when a part vanished while it was read (a compaction
    running beside this verify, which holds no lease, merged it)."""
    return ledger.again_if_parts_vanish(fs, folder, lambda: check_folder_once(fs, folder))


def check_folder_once(fs: Storage, folder: str) -> FolderCheck:
    """Every check on one ledger folder; reads every part twice (its keys, then its rows) and every image once.

    In bounded memory: the first pass keeps every key (about 40 bytes each) to find each key's last row and the
    keys held twice; the second streams the parts, ROWS_AT_ONCE rows at a time, looking each kept row's image up in
    the listing of images/ (an Arrow table, about 50 bytes an image) and hashing the ones there; a mark per
    image says which were named, so what is left unmarked are the orphans. Ten million rows: benchmarks/README.md.
    """
    check = FolderCheck(folder=folder)
    found = ledger.metadata_parts(fs, folder)
    check.parts = len(found)

    def keys_of(part: str) -> pa.Table | ledger.CorruptLedgerError:
        try:
            return ledger.read_part(fs, folder, part, COLUMNS).select(["key"]).cast(pa.schema([("key", pa.string())]))
        except ledger.CorruptLedgerError as error:
            return error

    with ThreadPoolExecutor(ledger.READ_THREADS) as pool:
        keys = []
        for part, table in zip(found, pool.map(keys_of, found)):
            if isinstance(table, ledger.CorruptLedgerError):
                check.unreadable[part] = table.reason
            else:
                keys.append(table.column("key"))
    readable = [part for part in found if part not in check.unreadable]
    counts = np.array([len(column) for column in keys], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    check.rows = int(starts[-1])
    # The last row of a key wins, as in the ledger reader: the last part in name order, the last row in it.
    every = pa.chunked_array([chunk for column in keys for chunk in column.chunks], pa.string())
    del keys
    last = ledger.last_row_indices(every)
    kept = np.ones(check.rows, dtype=bool)
    if last is not None:
        kept[:] = False
        kept[last.to_numpy()] = True
        repeated = every.filter(pa.array(~kept))
        held = pa.table({"key": every.filter(pc.is_in(every, value_set=pc.unique(repeated)))}).group_by(
            "key", use_threads=False).aggregate([("key", "count")])
        check.duplicates = dict(zip(held.column("key").to_pylist(), held.column("key_count").to_pylist()))
        for number, index in _part_rows(np.flatnonzero(~kept), starts):
            check.drop[readable[number]].add(index)
    del every, last

    on_disk = image_listing(fs, folder, int(kept.sum()))
    check.images = on_disk.num_rows
    named = np.zeros(on_disk.num_rows, dtype=bool)
    with ThreadPoolExecutor(ledger.READ_THREADS) as pool:
        for numbers in _batches(counts):
            tables = pool.map(lambda number: ledger.read_part(fs, folder, readable[number], COLUMNS), numbers)
            kept_rows = []
            for number, table in zip(numbers, tables):
                rows = kept[starts[number]:starts[number + 1]]
                if table.num_rows != len(rows):  # rewritten since the first pass: by a run verify ran beside
                    raise FluxbatchError(f"{fs.uri(readable[number])} changed while verify read it (a run is "
                                         "writing this OUTPUT); run verify again once it ends")
                kept_rows.append(table.select(COLUMNS).cast(KEPT_SCHEMA)
                                 .append_column("part", pa.repeat(pa.scalar(number, pa.int32()), table.num_rows))
                                 .append_column("index", pa.array(np.arange(table.num_rows, dtype=np.int64)))
                                 .filter(pa.array(rows)))
            # One lookup per batch: each builds a hash of the whole listing.
            _check_rows(fs, check, readable, pa.concat_tables(kept_rows, promote_options="permissive"), on_disk,
                        named)
    check.orphans = sorted(full_paths(folder, on_disk.column("name").filter(pa.array(~named))))
    return check


ROWS_AT_ONCE = 2_000_000  # rows read and looked up at once in the second pass (at least one part)


def _batches(counts: np.ndarray) -> list[list[int]]:
    """The parts' numbers in groups read and checked together, up to ROWS_AT_ONCE rows a group."""
    groups: list[list[int]] = []
    rows = 0
    for number, count in enumerate(counts.tolist()):
        if not groups or rows + count > ROWS_AT_ONCE:
            groups.append([])
            rows = 0
        groups[-1].append(number)
        rows += count
    return groups


def _part_rows(rows: np.ndarray, starts: np.ndarray) -> list[tuple[int, int]]:
    """Global row numbers as (part number, row in the part)."""
    numbers = np.searchsorted(starts, rows, side="right") - 1
    return list(zip(numbers.tolist(), (rows - starts[numbers]).tolist()))


def _check_rows(fs: Storage, check: FolderCheck, parts: list[str], kept: pa.Table, on_disk: pa.Table,
                named: np.ndarray) -> None:
    """Look the kept rows of one part up in the listing (missing, another size), mark the images they name, and
    hash the ones that are there with their recorded size."""
    kept = kept.append_column("name", image_names(kept))
    found = pc.index_in(kept.column("name"), value_set=on_disk.column("name"))
    at = found.drop_null().to_numpy()
    named[at] = True
    size = on_disk.column("size").take(found)
    kept = kept.append_column("size_on_disk", size)
    missing = kept.filter(pc.is_null(size))
    check.missing.update(zip(missing.column("key").to_pylist(), full_paths(check.folder, missing.column("name"))))
    other = kept.filter(pc.not_equal(size, kept.column("bytes")).fill_null(False))  # a null size: not known
    check.altered.update({key: (path, f"{on} bytes, the ledger says {recorded}") for key, path, on, recorded in zip(
        other.column("key").to_pylist(), full_paths(check.folder, other.column("name")),
        *(other.column(c).to_pylist() for c in ("size_on_disk", "bytes")))})
    _drop(check, parts, missing)
    _drop(check, parts, other)
    # Hashed: every image there whose recorded size matches, or whose row records none (its sha256 still says).
    there = pc.and_(pc.is_valid(size), pc.invert(pc.not_equal(size, kept.column("bytes")).fill_null(False)))
    _check_contents(fs, check, parts, kept.filter(there))


def _check_contents(fs: Storage, check: FolderCheck, parts: list[str], present: pa.Table) -> None:
    """Hash each image that is there with its recorded size (`present`: key, name, sha256, part, index),
    HASH_CHUNK at a time, and mark those whose sha256 differs from their row as altered."""
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for start in range(0, present.num_rows, HASH_CHUNK):
            chunk = present.slice(start, HASH_CHUNK)
            paths = full_paths(check.folder, chunk.column("name"))
            digests = pool.map(lambda p: hashlib.sha256(fs.read_bytes(p)).hexdigest(), paths)
            differs = [digest != sha for digest, sha in zip(digests, chunk.column("sha256").to_pylist())]
            if any(differs):
                bad = chunk.filter(pa.array(differs))
                for key, path in zip(bad.column("key").to_pylist(), full_paths(check.folder, bad.column("name"))):
                    check.altered[key] = (path, "its sha256 differs from the ledger's")
                _drop(check, parts, bad)


def _drop(check: FolderCheck, parts: list[str], rows: pa.Table) -> None:
    """Mark `rows` (with their `part` number in `parts` and `index`) for repair to drop."""
    for part, index in zip(rows.column("part").to_pylist(), rows.column("index").to_pylist()):
        check.drop[parts[part]].add(index)


def repair_folder(fs: Storage, root: str, check: FolderCheck, quarantine: str) -> int:
    """Put one folder right (see the module docstring); the caller holds its lease. Returns the files moved."""
    moved = list(check.unreadable)
    for part in moved:
        move_aside(fs, root, quarantine, part)
    for path in [*check.candidates.orphans, *check.candidates.altered]:
        move_aside(fs, root, quarantine, path)
        moved.append(path)
    for part, rows in sorted(check.drop.items()):
        if not rows:
            continue
        # The part as it was goes aside first (repair deletes nothing outright), then loses those rows in place.
        _copy_aside(fs, root, quarantine, part)
        ledger.rewrite_part(fs, check.folder, part,
                            lambda table, rows=rows: pa.array([index in rows for index in range(table.num_rows)]))
        moved.append(part)
    for path in [path for path, _ in check.altered.values()] + check.orphans:
        move_aside(fs, root, quarantine, path)
        moved.append(path)
    return len(moved)


def _copy_aside(fs: Storage, root: str, quarantine: str, path: str) -> None:
    """Copy `path` to the same path under `quarantine`, keeping the original where it is."""
    target = f"{quarantine}/{path[len(root) + 1:]}"
    if fs.local:
        fs.makedirs(target.rsplit("/", 1)[0])
    fs.copy(path, target)


def _folder_report(fs: Storage, check: FolderCheck) -> list[str]:
    counts = (f"{n} {what}{'' if n == 1 else 's'}" for n, what in
              ((check.parts, "metadata part"), (check.rows, "row"), (check.images, "image")))
    lines = [f"{fs.uri(check.folder)}: {', '.join(counts)}"]
    if check.marks_checked is not None:
        lines.append(f"  provenance: the marks of {check.marks_checked} images read back")
    if check.near_duplicates:
        images = sum(len(group) for group in check.near_duplicates)
        lines.append(f"  near-duplicate groups: {len(check.near_duplicates)} ({images} images; none deleted)")
        lines += [f"    {', '.join(group[:4])}{f' and {len(group) - 4} more' if len(group) > 4 else ''}"
                  for group in check.near_duplicates[:SHOWN]]
        if len(check.near_duplicates) > SHOWN:
            lines.append(f"    ... and {len(check.near_duplicates) - SHOWN} more groups")
    kinds = [
        ("unreadable part", [f"{fs.uri(part)}: {why}" for part, why in check.unreadable.items()]),
        ("duplicate key", [f"{key}: {n} rows" for key, n in check.duplicates.items()]),
        ("missing image", [f"{key}: no {fs.uri(path)}" for key, path in check.missing.items()]),
        ("altered image", [f"{key}: {fs.uri(path)}: {how}" for key, (path, how) in check.altered.items()]),
        ("orphan image", [f"{fs.uri(path)}: no ledger row names it" for path in check.orphans]),
        ("image lacking provenance", [f"{key}: {fs.uri(path)}: {why}" for key, (path, why) in check.unmarked.items()]),
        ("missing candidate image", [f"{key}: no {fs.uri(path)}" for path, key in check.candidates.missing.items()]),
        ("altered candidate image", [f"{key}: {fs.uri(path)}: its sha256 differs from the ledger's"
                                     for path, key in check.candidates.altered.items()]),
        ("orphan candidate image", [f"{fs.uri(path)}: no kept image owns it" for path in check.candidates.orphans]),
    ]
    for kind, offenders in kinds:
        if offenders:
            lines.append(f"  {kind}: {len(offenders)}")
            lines += [f"    {offender}" for offender in offenders[:SHOWN]]
            if len(offenders) > SHOWN:
                lines.append(f"    ... and {len(offenders) - SHOWN} more")
    return lines
