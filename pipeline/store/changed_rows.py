"""Rows edited since their image was committed: found by the planner, refused unless the user asks to re-render.

A key is hash(request id, variant), so a row whose prompt, size, steps, ... was edited under the same id keeps
the key of its committed image. Skipping it as done would leave an image that no longer matches its row, so the
planner compares each planned key's render parameters with the ledger row of that key. By default a run with
changed rows is refused before anything renders (`ChangedRowsError`, naming the rows and the flag). With
`--rerender-changed` they are planned again, each to a path of its own (PLAN_SCHEMA's `revision`): a committed
image is never overwritten. The new ledger row, committed in this run's part, supersedes the old one (the ledger
keeps a key's row of the last part in name order); at the end of the run `committed_images.settle` retires the
old row and then the old image, so each key is once on disk again. A kill at any moment leaves each key a row
whose image is the one it records: the old row and image until the new row commits, the new ones after.

Columnar throughout: the ledger's parts are read in parallel, only the columns compared; the comparison is
an Arrow lookup of the planned keys in the committed ones, then one vector compare per field.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.committed_images import file_names
from schemas.errors import FluxbatchError

# Every column of a ledger row that decides the image's bytes and can differ per row; model, dtype and the job's
# defaults are per job and `_job.json` guards them (ledger.check_job).
RENDER_FIELDS = ("prompt", "width", "height", "steps", "guidance", "seed", "max_sequence_length", "adapters",
                 "output_format", "candidates")
FLAG = "--rerender-changed"
SHOWN = 5  # changed rows named in the refusal; the count says how many more
COMPARED_AT_ONCE = 1_000_000


class ChangedRowsError(FluxbatchError, ValueError):
    """Rows whose render parameters differ from their committed images; re-rendering them replaces those images."""


def read_committed(fs: Storage, root: str) -> pa.Table | None:
    """key, RENDER_FIELDS, image_uri (its file name), bytes and candidate_scores (the files of a best-of-n row,
    candidate_files.keys_missing_candidates) of every committed image: a key's row of the last
    part, in name order (part names start with the run id, a UTC time, so name order is commit order); None when none.

    Only these columns are read (Parquet column projection), about a third of a part's bytes in memory.
    """
    columns = ["key", *RENDER_FIELDS, "candidate", "image_uri", "bytes", "candidate_scores"]
    table = ledger.read_metadata(fs, root, columns, each=_file_names)
    return ledger.latest_row_per_key(table) if table is not None else None


def for_planning(committed: pa.Table | None) -> pa.Table | None:
    """`committed` with only what `compare` reads (key and RENDER_FIELDS), once `stale_keys` has used the image
    columns: for millions of rows, a quarter of its memory back before the plan is made."""
    if committed is None:
        return None
    # A best-of-n image records its own seed, its row's first candidate's + `candidate`; the plan holds the first's.
    kept = committed.column("candidate").fill_null(0).cast(pa.int64())
    planned_seed = pc.subtract(committed.column("seed"), kept)  # wraps, as the renderer's addition does
    committed = committed.set_column(committed.schema.get_field_index("seed"), "seed", planned_seed)
    return committed.select(["key", *RENDER_FIELDS])


def _file_names(part: pa.Table) -> pa.Table:
    """A part with `image_uri` cut to the file name: all that is looked up (committed_images.image_names), and
    half the bytes of a whole URL, for millions of rows."""
    return part.set_column(part.schema.get_field_index("image_uri"), "image_uri", file_names(part.column("image_uri")))


def compare(planned: pa.Table, committed: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """For each planned image: the index of its committed row (-1 when none), and a bit mask of the
    RENDER_FIELDS that differ from it (bit i for field i; 0 when equal or not committed)."""
    found = pc.index_in(planned.column("key"), value_set=committed.column("key"))
    index = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    changed = np.zeros(planned.num_rows, np.int64)
    at = np.flatnonzero(index >= 0)
    if not at.size:
        return index, changed
    # A column at a time, COMPARED_AT_ONCE matches at a time: memory holds one slice of one field of the matches.
    for start in range(0, len(at), COMPARED_AT_ONCE):
        rows = at[start:start + COMPARED_AT_ONCE]
        new_at, old_at = pa.array(rows), pa.array(index[rows])
        for bit, name in enumerate(RENDER_FIELDS):
            differs = {"adapters": _lists_differ, "candidates": _null_is_a_value}.get(name, _values_differ)
            old, new = committed.column(name).take(old_at), planned.column(name).take(new_at)
            changed[rows] |= differs(old.combine_chunks(), new.combine_chunks()) << bit
    return index, changed


def _values_differ(old: pa.Array, new: pa.Array) -> np.ndarray:
    # A null in the ledger is a value it did not record: nothing to compare against.
    return pc.not_equal(old, new.cast(old.type)).fill_null(False).to_numpy(zero_copy_only=False).astype(np.int64)


def _null_is_a_value(old: pa.Array, new: pa.Array) -> np.ndarray:
    """`candidates`: null is one image per image (in every part, before best-of-n too), so null and 4 differ."""
    new = new.cast(old.type)
    differs = pc.not_equal(old, new).fill_null(False).to_numpy(zero_copy_only=False)
    return (differs | (old.is_null().to_numpy(zero_copy_only=False) != new.is_null().to_numpy(zero_copy_only=False))
            ).astype(np.int64)


def _lists_differ(old: pa.Array, new: pa.Array) -> np.ndarray:
    """Adapter lists, element by element (null and [] both mean none), without a Python loop over rows."""
    lengths = [pc.list_value_length(a).fill_null(0).to_numpy(zero_copy_only=False) for a in (old, new)]
    differs = lengths[0] != lengths[1]
    same = np.flatnonzero(~differs & (lengths[1] > 0))
    if same.size:
        old_items, new_items = (pc.list_flatten(a.take(pa.array(same))) for a in (old, new))
        item_differs = np.zeros(len(new_items), bool)
        for child in ("name", "scale"):
            a, b = pc.struct_field(old_items, child), pc.struct_field(new_items, child)
            equal = pc.or_(pc.equal(a, b).fill_null(False), pc.and_(pc.is_null(a), pc.is_null(b)))
            item_differs |= ~equal.to_numpy(zero_copy_only=False)
        rows = pc.list_parent_indices(new.take(pa.array(same))).to_numpy(zero_copy_only=False)
        per_row = np.zeros(same.size, bool)
        np.logical_or.at(per_row, rows, item_differs)
        differs[same] = per_row
    return differs.astype(np.int64)


def refusal(changed: pa.Table, masks: np.ndarray) -> ChangedRowsError:
    """One line: how many rows changed, the first few (file, row, id, fields), and the flag that re-renders them.

    `changed` holds the planned images whose parameters differ (source, row, request_id), `masks` their fields.
    """
    rows: dict[tuple[str, int], tuple[str, int]] = {}  # a row's images share its edit: name the row once
    for source, row, request_id, mask in zip(changed.column("source").to_pylist(), changed.column("row").to_pylist(),
                                             changed.column("request_id").to_pylist(), masks.tolist()):
        rows.setdefault((source, row), (request_id, 0))
        rows[(source, row)] = (request_id, rows[(source, row)][1] | mask)
    ordered = sorted(rows.items())
    shown = "; ".join(
        f"{source} row {row} (id {request_id!r}): {', '.join(f for i, f in enumerate(RENDER_FIELDS) if mask >> i & 1)}"
        for (source, row), (request_id, mask) in ordered[:SHOWN])
    more = f"; and {len(ordered) - SHOWN} more" if len(ordered) > SHOWN else ""
    return ChangedRowsError(
        f"{len(ordered)} row{'s' if len(ordered) != 1 else ''} changed since their images were committed "
        f"({changed.num_rows} images): {shown}{more}. "
        f"Pass {FLAG} to render them again (each new image and ledger row replace the old ones once committed), "
        "or restore those rows")
