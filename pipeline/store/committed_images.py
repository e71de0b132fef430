"""The committed images on disk: which ledger rows lack their image, and the end-of-run settling of both.

Exit 0 promises that every committed row's image exists with its recorded size (docs/guarantees.md). A run keeps
that promise with two listings of OUTPUT/images (one LIST request per 1,000 images on S3, no request per image):
- at its start, `stale_keys`: a committed key whose image is missing, or whose size differs from its row, is
  planned again like a changed row (a path of its own: PLAN_SCHEMA's `revision`);
- at its end, `settle`, under the lease, once the renderer pool is gone:
  1. each key keeps one row, its latest (a changed or restored key's new row; the older rows are retired by
     `ledger.rewrite_part`, whole or not at all);
  2. an image no kept row names is retired: the image of a retired row, or one a killed run wrote but never
     committed. Both are fluxbatch's by their name (schemas/layout.py IMAGE_NAME) in a folder only
     fluxbatch writes. It is deleted, unless a retired row recorded it with another size (someone edited it
     after fluxbatch wrote it): that one is moved aside into OUTPUT/_quarantine/<run id>/;
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
from schemas.layout import IMAGE_NAME, IMAGES, committed_image_path, is_part_of_run, quarantine_folder

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


def list_images(fs: Storage, root: str) -> dict[str, int]:
    """`image_listing` as a mapping of each image's full path to its size."""
    table = image_listing(fs, root)
    return {f"{root}/{IMAGES}/{name}": size
            for name, size in zip(table.column("name").to_pylist(), table.column("size").to_pylist())}


def image_problem(path: str, size: int | None, on_disk: dict[str, int]) -> str | None:
    """Why the image a row names is not there as recorded (None when it is): missing, or another size."""
    if path not in on_disk:
        return f"missing: no {path}"
    if size is not None and on_disk[path] != size:
        return f"altered: {path} has {on_disk[path]} bytes, its ledger row says {size}"
    return None


def image_names(rows: pa.Table) -> pa.ChunkedArray:
    """Where each row's image lies under images/ (`<kk>/<file name>`, as `committed_image_path`), column at a
    time. `image_uri` may be whole URLs or, as `read_committed` keeps them, file names alone."""
    names = pc.replace_substring_regex(rows.column("image_uri").fill_null(""), pattern=r"^.*/", replacement="")
    return pc.binary_join_element_wise(pc.utf8_slice_codeunits(rows.column("key"), 0, 2), names, "/")


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
    listing). Images are looked up by file name under images/<kk>/ (committed_image_path)."""
    settled = Settled()
    rows = ledger.read_metadata(fs, root, COLUMNS, locate=True)
    last = ledger.last_row_indices(rows.column("key")) if rows is not None else None
    kept = rows if last is None else rows.take(last)
    named: dict[str, tuple[str, int, str]] = {}  # image path -> (key, bytes, part) of the kept row naming it
    columns = [*COLUMNS, "part"]
    for key, uri, size, part in (zip(*(kept.column(c).to_pylist() for c in columns)) if kept is not None else ()):
        named[committed_image_path(root, key, uri)] = (key, size, part)

    old = None  # the rows a key's latest row supersedes
    retired: dict[str, int] = {}  # image path -> bytes its superseded row recorded
    if last is not None:
        superseded = np.ones(rows.num_rows, bool)
        superseded[last.to_numpy()] = False
        old = rows.filter(pa.array(superseded))
        for key, uri, size in zip(*(old.column(c).to_pylist() for c in COLUMNS)):
            retired[committed_image_path(root, key, uri)] = size

    # Images first, while the superseded rows still say what size each of their images had.
    on_disk = list_images(fs, root)
    for path, size in sorted(on_disk.items()):
        if path not in named:
            _retire(fs, root, run_id, path, size, retired.get(path), settled)
    for path in settled.images_moved_aside:
        on_disk.pop(path, None)
    if old is not None:
        by_part: dict[str, set[int]] = {}
        for part, index in zip(old.column("part").to_pylist(), old.column("index").to_pylist()):
            by_part.setdefault(part, set()).add(index)
        for part, indices in sorted(by_part.items()):
            settled.rows_retired += ledger.rewrite_part(
                fs, root, part, lambda table, indices=indices: pa.array([i in indices for i in range(table.num_rows)]))
    for path, (key, size, part) in named.items():
        problem = image_problem(path, size, on_disk)
        if problem:
            settled.missing[key] = problem
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
