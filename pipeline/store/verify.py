"""`fluxbatch verify OUTPUT [--repair]`: check the ledger against the images, and put right what it finds.

The metadata parts are the ledger (pipeline/store/ledger.py): a run renders only the keys no part holds, so a
damaged ledger either stops every run or silently claims images that are not there. Verify checks, in
OUTPUT and in each OUTPUT/_versions/<n>/:
- every metadata part is a readable Parquet table with the columns key, image_uri, sha256, bytes;
- every row's image exists in this OUTPUT with the recorded byte count and sha256 (the image is looked
  up under OUTPUT/images/<kk>/ by the file name in image_uri, so a copied or moved OUTPUT verifies too);
- no key is held by two rows;
- no image under images/ lacks a row (an orphan: a killed driver rendered it but never committed it).
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
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flux_worker.storage import Storage, filesystem
from pipeline.store import ledger
from pipeline.store.committed_images import list_images, move_aside
from pipeline.store.lease import hold
from schemas.errors import FluxbatchError
from schemas.layout import JOB_FILE, METADATA, QUARANTINE, committed_image_path, quarantine_folder

COLUMNS = ["key", "image_uri", "sha256", "bytes"]
SHOWN = 5  # offenders named per kind of problem; the counts cover all
HASH_THREADS = 16  # images are hashed in parallel: on object storage each read is a round trip


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
    drop: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # part -> rows repair drops

    @property
    def problems(self) -> int:
        return (len(self.unreadable) + len(self.duplicates) + len(self.missing) + len(self.altered)
                + len(self.orphans))


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

    def report(self) -> str:
        """The short report `fluxbatch verify` prints: counts per problem kind and the first offenders."""
        lines: list[str] = []
        for check in self.checks:
            lines += _folder_report(self.fs, check)
        if not self.problems:
            lines.append(f"{self.output}: clean")
        elif self.quarantine is None:
            lines.append(f"{self.problems} problems; `fluxbatch verify {self.output} --repair` moves unreadable parts "
                         f"and orphan or altered images aside into {self.output}/{QUARANTINE}/ and drops duplicate "
                         "rows and rows without their image (those keys render again on the next run)")
        else:
            dropped = sum(len(rows) for c in self.checks for rows in c.drop.values())
            lines.append(f"repaired: {self.moved} files moved aside into {self.fs.uri(self.quarantine)}, {dropped} "
                         "ledger rows dropped; the keys no longer in the ledger render again on the next run")
        return "\n".join(lines)


def verify_output(url: str, storage_options: dict[str, Any] | None = None, repair: bool = False) -> Verification:
    """Check OUTPUT and each of its versions; with `repair`, put each folder right under its lease."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(f"{root}/{JOB_FILE}"):
        raise NotAnOutputError(f"{fs.uri(root)} is not a fluxbatch OUTPUT (no {JOB_FILE}); nothing checked")
    folders = [root] + [folder for _, folder in ledger.versions(fs, root)]
    result = Verification(output=fs.uri(root), checks=[], fs=fs)
    if not repair:
        result.checks = [check_folder(fs, folder) for folder in folders]
        return result
    repair_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-repair-" + uuid.uuid4().hex[:6]
    result.quarantine = quarantine_folder(root, repair_id)
    for folder in folders:
        with hold(fs, folder, repair_id):  # no driver commits or writes images here meanwhile
            check = check_folder(fs, folder)
            result.moved += repair_folder(fs, root, check, result.quarantine)
        result.checks.append(check)
    return result


def check_folder(fs: Storage, folder: str) -> FolderCheck:
    """Every check on one ledger folder; reads every part and every image once."""
    check = FolderCheck(folder=folder)
    columns: dict[str, dict[str, list]] = {}  # part -> column -> values, parts in name order
    for part in ledger.parts(fs, f"{folder}/{METADATA}"):
        check.parts += 1
        try:
            table = ledger.read_part(fs, folder, part, COLUMNS)
        except ledger.CorruptLedgerError as error:
            check.unreadable[part] = error.reason
            continue
        columns[part] = {name: table.column(name).to_pylist() for name in COLUMNS}
        check.rows += table.num_rows

    # The last row of a key wins, as in the ledger reader: the last part in name order, the last row in it.
    last: dict[str, tuple[str, int]] = {}
    count: Counter[str] = Counter()
    for part, values in columns.items():
        for index, key in enumerate(values["key"]):
            last[key] = (part, index)
            count[key] += 1
    check.duplicates = {key: n for key, n in count.items() if n > 1}
    for part, values in columns.items():
        for index, key in enumerate(values["key"]):
            if last[key] != (part, index):
                check.drop[part].add(index)

    on_disk = list_images(fs, folder)
    check.images = len(on_disk)
    named: dict[str, tuple[str, str, int, str, int]] = {}  # image path -> (key, sha256, bytes, part, row)
    for key, (part, index) in last.items():
        values = columns[part]
        named[committed_image_path(folder, key, values["image_uri"][index])] = (
            key, values["sha256"][index], values["bytes"][index], part, index)
    to_hash = []
    for path, (key, _, size, part, index) in named.items():
        if path not in on_disk:
            check.missing[key] = path
            check.drop[part].add(index)
        elif on_disk[path] != size:
            check.altered[key] = (path, f"{on_disk[path]} bytes, the ledger says {size}")
            check.drop[part].add(index)
        else:
            to_hash.append(path)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = pool.map(lambda p: hashlib.sha256(fs.read_bytes(p)).hexdigest(), to_hash)
        for path, digest in zip(to_hash, digests):
            key, sha, _, part, index = named[path]
            if digest != sha:
                check.altered[key] = (path, "its sha256 differs from the ledger's")
                check.drop[part].add(index)
    check.orphans = sorted(set(on_disk) - set(named))
    return check


def repair_folder(fs: Storage, root: str, check: FolderCheck, quarantine: str) -> int:
    """Put one folder right (see the module docstring); the caller holds its lease. Returns the files moved."""
    moved = list(check.unreadable)
    for part in moved:
        move_aside(fs, root, quarantine, part)
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
    lines = [f"{fs.uri(check.folder)}: {check.parts} metadata parts, {check.rows} rows, {check.images} images"]
    kinds = [
        ("unreadable part", [f"{fs.uri(part)}: {why}" for part, why in check.unreadable.items()]),
        ("duplicate key", [f"{key}: {n} rows" for key, n in check.duplicates.items()]),
        ("missing image", [f"{key}: no {fs.uri(path)}" for key, path in check.missing.items()]),
        ("altered image", [f"{key}: {fs.uri(path)}: {how}" for key, (path, how) in check.altered.items()]),
        ("orphan image", [f"{fs.uri(path)}: no ledger row names it" for path in check.orphans]),
    ]
    for kind, offenders in kinds:
        if offenders:
            lines.append(f"  {kind}: {len(offenders)}")
            lines += [f"    {offender}" for offender in offenders[:SHOWN]]
            if len(offenders) > SHOWN:
                lines.append(f"    ... and {len(offenders) - SHOWN} more")
    return lines
