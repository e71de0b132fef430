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
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from pipeline.store import ledger
from schemas.layout import IMAGE_NAME, IMAGES, METADATA, committed_image_path, is_part_of_run, quarantine_folder

log = logging.getLogger(__name__)

COLUMNS = ["key", "image_uri", "bytes"]


def list_images(fs: Storage, root: str) -> dict[str, int]:
    """The image files fluxbatch wrote under `root`/images, with their sizes: one listing (on S3, one LIST
    request per 1,000 objects). Files of other names are not fluxbatch's and are left out."""
    base = f"{root}/{IMAGES}"
    if not fs.exists(base):
        return {}
    found = fs.find(base, detail=True)
    return {path: info["size"] for path, info in found.items() if IMAGE_NAME.search(path)}


def image_problem(path: str, size: int | None, on_disk: dict[str, int]) -> str | None:
    """Why the image a row names is not there as recorded (None when it is): missing, or another size."""
    if path not in on_disk:
        return f"missing: no {path}"
    if size is not None and on_disk[path] != size:
        return f"altered: {path} has {on_disk[path]} bytes, its ledger row says {size}"
    return None


def stale_keys(fs: Storage, root: str, committed: pa.Table | None) -> pa.Array:
    """The keys of `committed` (the ledger's latest rows, with image_uri and bytes) whose image is missing or
    has another size than recorded: this run renders them again."""
    if committed is None or not committed.num_rows:
        return pa.array([], pa.string())
    on_disk = list_images(fs, root)
    keys = committed.column("key").to_pylist()
    stale = [key for key, uri, size in zip(keys, committed.column("image_uri").to_pylist(),
                                           committed.column("bytes").to_pylist())
             if image_problem(committed_image_path(root, key, uri), size, on_disk)]
    return pa.array(stale, pa.string())


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
    tables = []
    for part in ledger.parts(fs, f"{root}/{METADATA}"):
        table = ledger.read_part(fs, root, part, COLUMNS)
        tables.append(table.append_column("part", pa.repeat(pa.scalar(part), table.num_rows))
                      .append_column("index", pa.array(range(table.num_rows), pa.int64())))
    rows = pa.concat_tables(tables, promote_options="permissive") if tables else None
    kept = ledger.latest_row_per_key(rows) if rows is not None else None
    named: dict[str, tuple[str, int, str]] = {}  # image path -> (key, bytes, part) of the kept row naming it
    columns = [*COLUMNS, "part"]
    for key, uri, size, part in (zip(*(kept.column(c).to_pylist() for c in columns)) if kept is not None else ()):
        named[committed_image_path(root, key, uri)] = (key, size, part)

    old = None  # the rows a key's latest row supersedes
    retired: dict[str, int] = {}  # image path -> bytes its superseded row recorded
    if kept is not None and kept.num_rows < rows.num_rows:
        kept_at = pc.binary_join_element_wise(kept.column("part"), pc.cast(kept.column("index"), pa.string()), "#")
        every = pc.binary_join_element_wise(rows.column("part"), pc.cast(rows.column("index"), pa.string()), "#")
        old = rows.filter(pc.invert(pc.is_in(every, value_set=kept_at)))
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
        for part in sorted(set(old.column("part").to_pylist())):
            indices = set(old.filter(pc.equal(old.column("part"), part)).column("index").to_pylist())
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
