"""The committed images on disk: which ledger rows lack their image, and the end-of-run settling of both.

Exit 0 promises that every committed row's image exists with its recorded size (docs/guarantees.md). A run keeps
that promise with two listings of OUTPUT/images (one LIST request per 1,000 images on S3, no request per image):
- at its start, `stale_keys`: a committed key whose image is missing, or whose size differs from its row, is
  planned again like a changed row (a path of its own: PLAN_SCHEMA's `revision`);
- at its end, `settle`, under the lease, once the renderer pool is gone:
  1. each key keeps one row, its latest (a changed or restored key's new row; the older rows are retired by
     `ledger.rewrite_part`, whole or not at all);
  2. an image no kept row names is retired: the image of a retired row, or one a killed run wrote but never
     committed (and the best-of-n candidate files it owns: pipeline/store/candidate_files.py). Both are
     fluxbatch's by their name (schemas/layout.py IMAGE_NAME) in a folder only fluxbatch writes. It is deleted,
     unless a retired row recorded it with another size (someone edited it after fluxbatch wrote it): that one is
     moved aside into OUTPUT/_quarantine/<run id>/;
  3. every kept row's image is looked for again: what is still missing is returned, and the run says so
     (exit 1, `_SUCCESS` with `complete: false`) instead of claiming it.
Images first, rows second, so that a superseded row still tells an image's recorded size when it is retired: a
run killed between the two leaves a key's older row naming an image that is gone; every reader keeps the key's
latest row, whose image is there, and the next run retires the older one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.candidate_files import candidate_files, owners
from schemas.layout import IMAGE_NAME, IMAGES, is_part_of_run, quarantine_folder

log = logging.getLogger(__name__)

COLUMNS = ["key", "image_uri", "bytes"]


PER_PREFIX = 100_000  # from this many images on, images/ is listed one <kk>/ folder at a time, in parallel
LIST_THREADS = 16


def image_listing(fs: Storage, root: str, expected: int = 0) -> pa.Table:
    """The image files fluxbatch wrote under `root`/images as a table: `name` (the path under images/,
    `<kk>/<file>`) and `size`. Files of other names are not fluxbatch's and are left out.

    One listing (on S3, one LIST request per 1,000 objects), turned into Arrow columns at once. From PER_PREFIX
    `expected` images on, one listing per images/<kk>/ folder (256 more requests, read in parallel), so the
    listing's Python objects never hold more than a 256th of the images: ten million in bounded memory."""
    base = f"{root}/{IMAGES}"
    if not fs.exists(base):
        return pa.table({"name": pa.array([], pa.string()), "size": pa.array([], pa.int64())})
    folders = sorted(fs.ls(base)) if expected >= PER_PREFIX else [base]
    cut = len(base) + 1

    def listed(folder: str) -> pa.Table:
        found = fs.find(folder, detail=True)
        paths = [path for path in found if IMAGE_NAME.search(path)]
        return pa.table({"name": pa.array([path[cut:] for path in paths], pa.string()),
                         "size": pa.array([found[path]["size"] for path in paths], pa.int64())})

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        return pa.concat_tables(pool.map(listed, folders))


def image_names(rows: pa.Table) -> pa.ChunkedArray:
    """Where each row's image lies under images/ (`<kk>/<file name>`, as `committed_image_path`), column at a
    time. `image_uri` may be whole URLs or, as `read_committed` keeps them, file names alone."""
    return pc.binary_join_element_wise(pc.utf8_slice_codeunits(rows.column("key"), 0, 2),
                                       file_names(rows.column("image_uri")), "/")


def file_names(image_uris: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Each image URI's file name (what follows its last '/'), column at a time; a null is ''."""
    return pc.replace_substring_regex(image_uris.fill_null(""), pattern=r"^.*/", replacement="")


def full_paths(root: str, names: pa.ChunkedArray | pa.Array) -> list[str]:
    """The paths of images named as `image_names` does, for the few that are reported or read."""
    return [f"{root}/{IMAGES}/{name}" for name in names.to_pylist()]


def stale_keys(fs: Storage, root: str, committed: pa.Table | None) -> pa.Array:
    """The keys of `committed` (the ledger's latest rows, with image_uri and bytes) whose image is missing or
    has another size than recorded: this run renders them again. A lookup in Arrow, no Python object per row."""
    if committed is None or not committed.num_rows:
        return pa.array([], pa.string())
    on_disk = image_listing(fs, root, committed.num_rows)
    found = pc.index_in(image_names(committed), value_set=on_disk.column("name"))
    size = on_disk.column("size").take(found)
    stale = pc.or_(pc.is_null(found), pc.not_equal(size, committed.column("bytes")).fill_null(False))
    return committed.column("key").filter(stale).combine_chunks()


@dataclass
class Settled:
    """What `settle` did and found in one ledger folder."""

    rows_retired: int = 0
    images_removed: int = 0
    images_moved_aside: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # key -> why its image is not as recorded
    missing_new: set[str] = field(default_factory=set)  # of those, the keys this run committed


def settle(fs: Storage, root: str, run_id: str) -> Settled:
    """One row per key, one named image per row, and what is still missing (see the module docstring).

    The caller holds `root`'s lease and no renderer of this run is alive (none could write an image after the
    listing). Images are looked up by file name under images/<kk>/ (committed_image_path). Columnar: the rows
    and the listing are Arrow tables matched by image name; only the images and rows acted on, usually few,
    become Python objects."""
    settled = Settled()
    rows = ledger.read_metadata(fs, root, COLUMNS, locate=True)
    on_disk = image_listing(fs, root, rows.num_rows if rows is not None else 0)
    if rows is None:
        rows = pa.table({"key": pa.array([], pa.string()), "image_uri": pa.array([], pa.string()),
                         "bytes": pa.array([], pa.int64()), "part": pa.array([], pa.string()),
                         "index": pa.array([], pa.int64())})
    rows = rows.append_column("name", image_names(rows))
    last = ledger.last_row_indices(rows.column("key"))
    kept = rows if last is None else rows.take(last)
    old = None  # the rows a key's latest row supersedes
    if last is not None:
        superseded = np.ones(rows.num_rows, bool)
        superseded[last.to_numpy()] = False
        old = rows.filter(pa.array(superseded))

    # Images first, while the superseded rows still say what size each of their images had.
    unnamed = on_disk.filter(pc.invert(pc.is_in(on_disk.column("name"), value_set=kept.column("name"))))
    if unnamed.num_rows:
        recorded = (old.column("bytes").take(pc.index_in(unnamed.column("name"), value_set=old.column("name")))
                    if old is not None else pa.nulls(unnamed.num_rows, pa.int64()))
        for name, size, was in sorted(zip(unnamed.column("name").to_pylist(), unnamed.column("size").to_pylist(),
                                          recorded.to_pylist())):
            _retire(fs, root, run_id, f"{root}/{IMAGES}/{name}", size, was, settled)
    # Best-of-n candidate files go with the image they belong to (pipeline/store/candidate_files.py).
    files = candidate_files(fs, root)
    if files:
        mine = owners(kept.column("name"))
        for path in sorted(path for path, owner in files.items() if owner not in mine):
            fs.rm_file(path)
            settled.images_removed += 1
    if old is not None:
        by_part: dict[str, set[int]] = {}
        for part, index in zip(old.column("part").to_pylist(), old.column("index").to_pylist()):
            by_part.setdefault(part, set()).add(index)
        for part, indices in sorted(by_part.items()):
            settled.rows_retired += ledger.rewrite_part(
                fs, root, part, lambda table, indices=indices: pa.array([i in indices for i in range(table.num_rows)]))
    found = pc.index_in(kept.column("name"), value_set=on_disk.column("name"))
    size = on_disk.column("size").take(found)
    bad = kept.append_column("size_on_disk", size).filter(
        pc.or_(pc.is_null(found), pc.not_equal(size, kept.column("bytes")).fill_null(False)))
    for key, name, recorded, on, part in zip(*(bad.column(c).to_pylist()
                                               for c in ("key", "name", "bytes", "size_on_disk", "part"))):
        path = f"{root}/{IMAGES}/{name}"
        settled.missing[key] = (f"missing: no {path}" if on is None
                                else f"altered: {path} has {on} bytes, its ledger row says {recorded}")
        if is_part_of_run(part, run_id):
            settled.missing_new.add(key)
    if settled.rows_retired or settled.images_removed:
        log.warning("%s: retired %d superseded ledger rows and %d images no row names", fs.uri(root),
                    settled.rows_retired, settled.images_removed)
    if settled.images_moved_aside:
        log.warning("%s: moved %d images edited since they were written aside into %s", fs.uri(root),
                    len(settled.images_moved_aside), fs.uri(quarantine_folder(root, run_id)))
    return settled


def _retire(fs: Storage, root: str, run_id: str, path: str, size: int, recorded: int | None,
            settled: Settled) -> None:
    """Retire an image no kept row names: delete it when it is the image a retired row recorded (its size) or one
    a run wrote and never committed (no row ever named it); move it aside when a row named it with another size,
    i.e. someone edited it after fluxbatch wrote it."""
    if recorded is not None and recorded != size:
        move_aside(fs, root, quarantine_folder(root, run_id), path)
        settled.images_moved_aside.append(path)
        return
    fs.rm_file(path)
    settled.images_removed += 1


def move_aside(fs: Storage, root: str, quarantine: str, path: str) -> None:
    """Move `path` to the same path under `quarantine` (relative to `root`): fluxbatch deletes nothing it cannot
    prove is its own, unchanged."""
    target = f"{quarantine}/{path[len(root) + 1:]}"
    if fs.local:
        fs.makedirs(target.rsplit("/", 1)[0])
    fs.mv(path, target)
