"""Plan a run: expand `num_images`, derive keys and seeds, drop keys already done, group by shape.

A done key whose row changed since its image was committed is refused or planned again (changed_rows.py).

A key is a hash of (request id, variant), never user text, so it is safe as a file name. A seed is the
row's seed plus the variant index, or derived from the key; the same row renders the same image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.presets import ModelPreset
from pipeline.manifest import Manifest
from pipeline.store.changed_rows import compare, refusal
from schemas import PLAN_SCHEMA, JobSpec, OutputFormat
from schemas.errors import FluxbatchError


def image_key(request_id: str, variant: int, reference_sha256: list[str] | tuple[str, ...] = ()) -> str:
    """32 hex characters naming one image of one request; with reference images, of their contents too (so a
    replaced photo is a new image, and resume skips only images of unchanged ones)."""
    return hashlib.blake2b(f"{request_id}\x1f{variant}{_references_suffix(reference_sha256)}".encode(),
                           digest_size=16).hexdigest()


def _references_suffix(reference_sha256: list[str] | tuple[str, ...]) -> str:
    # Nothing without references: the keys of rows without them stay what they were before references existed.
    return "".join(f"\x1f{sha}" for sha in reference_sha256)


def reference_suffixes(requests: pa.Table) -> list[str] | None:
    """Each request's key suffix for its references' sha256 (pipeline/references.py filled them in); None when no
    request has references (the common case: nothing per row to do)."""
    column = requests.column("reference_images")
    if not pc.sum(pc.list_value_length(column).fill_null(0)).as_py():
        return None
    return [_references_suffix([ref["sha256"] for ref in refs or ()]) for refs in column.to_pylist()]


def expected_keys(manifest: Manifest) -> set[str]:
    """The keys of every image the manifest asks for; only these are packed, whatever else OUTPUT holds."""
    requests = manifest.requests  # columns, so a manifest of millions of rows builds no model per row
    return {image_key(request_id, variant, [ref["sha256"] for ref in references or ()])
            for request_id, count, references in zip(requests.column("request_id").to_pylist(),
                                                     requests.column("num_images").to_pylist(),
                                                     requests.column("reference_images").to_pylist())
            for variant in range(count)}


KEY_CHUNK = 262_144  # keys hashed per round: only one round's Python strings are alive at a time


def image_keys(request_ids: pa.ChunkedArray, variants: np.ndarray, rows: np.ndarray,
               suffixes: list[str] | None) -> pa.ChunkedArray:
    """`image_key` of every image (its request id, variant and row's reference suffix), KEY_CHUNK at a time:
    hashing is most of the planner's time for millions of images, and its Python strings most of its memory."""
    blake2b = hashlib.blake2b
    chunks = []
    for start in range(0, len(variants), KEY_CHUNK):
        ids = request_ids.slice(start, KEY_CHUNK).to_pylist()
        numbers = variants[start:start + KEY_CHUNK].tolist()
        if suffixes is None:
            hexes = [blake2b(f"{r}\x1f{v}".encode(), digest_size=16).hexdigest() for r, v in zip(ids, numbers)]
        else:
            hexes = [blake2b(f"{r}\x1f{v}{suffixes[i]}".encode(), digest_size=16).hexdigest()
                     for r, v, i in zip(ids, numbers, rows[start:start + KEY_CHUNK].tolist())]
        chunks.append(pa.array(hexes, pa.string()))
    return pa.chunked_array(chunks, pa.string())


def derived_seed(key: str) -> int:
    """A 63-bit seed from the key, for rows that give none (63 bits: friendly to every consumer)."""
    digest = hashlib.blake2b(f"seed\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Plan:
    """The images to render this run, how many were expected and already done, and how many of those planned
    have a committed image already: `changed` (their row was edited) and `restored` (their image went missing)."""

    table: pa.Table
    expected: int
    already_done: int
    changed: int = 0
    restored: int = 0


class MixedFormatsError(FluxbatchError, ValueError):
    """A WebDataset layout of images in several formats: readers take one shard's columns for all of them."""


def plan_images(manifest: Manifest, job: JobSpec, preset: ModelPreset, committed: pa.Table | None,
                rerender_changed: bool = False, stale: pa.Array | None = None, run_id: str | None = None) -> Plan:
    """Expand every valid row into images, resolve defaults, and keep the ones the ledger does not hold.

    `committed` is the ledger's rows (changed_rows.read_committed; None when empty). A committed key whose
    render parameters differ from its row now is refused (ChangedRowsError, before anything renders), or
    planned again with `rerender_changed`. A committed key in `stale` (its image is missing or altered:
    committed_images.stale_keys) is planned again. Either renders to a path of its own: `revision` is `run_id`.
    Column at a time (a million rows plan in seconds); only keys and missing seeds are hashed per image.
    """
    defaults = job.defaults
    requests = manifest.requests
    counts = requests.column("num_images").to_numpy(zero_copy_only=False).astype(np.int64)
    expected = int(counts.sum())
    starts = np.cumsum(counts) - counts
    variants = np.arange(expected, dtype=np.int64) - np.repeat(starts, counts)
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    # One image per row (the common case) needs no copy of the manifest's columns.
    images = requests if expected == len(counts) else requests.take(pa.array(rows))
    keys = image_keys(images.column("request_id"), variants, rows, reference_suffixes(requests))
    candidates = best_of(images.column("candidates"), defaults.candidates)
    best = candidates.is_valid().to_numpy(zero_copy_only=False)
    # A best-of-n image's seed is its row's first candidate's (the renderer adds the candidate's index), as variant
    # 0's: its key, its seed. An image per image: variant v's.
    seeded_as = np.where(best, 0, variants)
    seed_keys = keys if not best.any() else image_keys(images.column("request_id"), seeded_as, rows,
                                                       reference_suffixes(requests))
    seed = images.column("seed")
    given = seed.is_valid().to_numpy(zero_copy_only=False)
    # uint64 addition wraps, which is the modulo 2**64 a row's seed + variant is taken by.
    seeds = np.where(given, seed.fill_null(0).to_numpy(zero_copy_only=False) + seeded_as.astype(np.uint64), 0)
    unseeded = np.flatnonzero(~given)
    for i, key in zip(unseeded.tolist(), seed_keys.take(pa.array(unseeded)).to_pylist()):
        seeds[i] = derived_seed(key)  # a done key's too: a row whose seed was removed changed
    fmt = (defaults.output_format or OutputFormat.png).value
    guidance = _first(defaults.guidance, preset.guidance)
    columns = {
        "key": keys,
        "request_id": images.column("request_id"),
        "variant": pa.array(variants, pa.int32()),
        "prompt": images.column("prompt"),
        "width": images.column("width").fill_null(defaults.width or preset.width),
        "height": images.column("height").fill_null(defaults.height or preset.height),
        "steps": images.column("steps").fill_null(defaults.steps or preset.steps),
        "guidance": images.column("guidance").fill_null(float(guidance)),
        "seed": pa.array(seeds.view(np.int64), pa.int64()),  # the same 64 bits, signed (schemas/records.py SEED_TYPE)
        "max_sequence_length": pa.repeat(pa.scalar(job.model.max_sequence_length or preset.max_sequence_length,
                                                   pa.int32()), len(keys)),
        "adapters": images.column("adapters"),
        "output_format": images.column("output_format").fill_null(fmt),
        "reference_images": images.column("reference_images"),
        "candidates": candidates,
        "source": images.column("source"),
        "row": images.column("row"),
        "revision": pa.nulls(len(keys), pa.string()),
        "keeps": pc.if_else(pa.array(best), images.column("num_images"), pa.scalar(None, pa.int64())).cast(pa.int32()),
    }
    columns.update({f.name: images.column(f.name) for f in manifest.extra_fields})
    schema = pa.schema(list(PLAN_SCHEMA) + manifest.extra_fields)
    # `source` stays dictionary-encoded until the rows left are taken: decoded for those only.
    building = schema.set(schema.get_field_index("source"), pa.field("source", columns["source"].type))
    table = pa.table([columns[f.name].cast(f.type) for f in building], schema=building)
    # A best-of-n row's images next to each other (the renderer renders its candidates once per batch): sorted by
    # the row's first key, then variant; an image per image by its own key, as before.
    group = pa.chunked_array([pa.array(np.where(best, seed_keys.to_numpy(zero_copy_only=False),
                                                keys.to_numpy(zero_copy_only=False)), pa.string())]) \
        if best.any() else None
    del images, columns, keys, seed_keys
    if job.output.layout == "webdataset":
        _refuse_mixed_formats(table)
    changed = restored = 0
    if committed is not None:
        index, fields = compare(table, committed)
        differs = fields != 0
        if differs.any() and not rerender_changed:
            raise refusal(table.filter(pa.array(differs)), fields[differs])
        stale = stale if stale is not None else pa.array([], pa.string())
        lost = (index >= 0) & pc.is_in(table.column("key"), value_set=stale).to_numpy(zero_copy_only=False)
        again = differs | lost
        changed, restored = int(differs.sum()), int((lost & ~differs).sum())
        if again.any():
            revision = pa.array(np.where(again, run_id, None), pa.string())
            table = table.set_column(table.schema.get_field_index("revision"), "revision", revision)
        selected = np.flatnonzero((index < 0) | again)
    else:
        selected = np.arange(table.num_rows)
    # Same-shape images next to each other, so batches rarely mix shapes; key order makes it stable. One take of
    # the rows left, in that order: a filtered copy and then a sorted one would hold the plan three times.
    if len(selected):
        shape = ("width", "height", "steps", "guidance", "key")
        sorting = table.select(shape)
        if group is not None:
            sorting = sorting.append_column("group", group).append_column("variant", table.column("variant"))
            shape = ("width", "height", "steps", "guidance", "group", "variant")
        order = pc.sort_indices(sorting.take(pa.array(selected)), sort_keys=[(c, "ascending") for c in shape])
        table = table.take(pa.array(selected[order.to_numpy()]))
    else:
        table = table.slice(0, 0)
    table = table.cast(schema)
    return Plan(table=table, expected=expected, already_done=expected - table.num_rows, changed=changed,
                restored=restored)


def split_best_of(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """The plan as blocks of about `batch_size` images, each one batch (the render stage takes whole blocks), cut
    only between best-of-n rows: a row's images in one batch render its candidates once (flux_worker/best_of.py),
    where two batches would render them twice. The planner put a row's images next to each other."""
    if table.num_rows == 0:
        return []
    keeps = table.column("keeps").is_valid().to_numpy(zero_copy_only=False)
    ids = table.column("request_id").to_numpy(zero_copy_only=False)
    seeds = table.column("seed").to_numpy(zero_copy_only=False)
    # Row i goes on the row before it: both best-of-n images of one row (same request, same first seed).
    same = np.zeros(table.num_rows, bool)
    same[1:] = keeps[1:] & keeps[:-1] & (ids[1:] == ids[:-1]) & (seeds[1:] == seeds[:-1])
    starts, at = [0], 0
    while True:
        at = starts[-1] + batch_size
        while at < table.num_rows and same[at]:
            at += 1
        if at >= table.num_rows:
            break
        starts.append(at)
    return [table.slice(start, end - start) for start, end in zip(starts, [*starts[1:], table.num_rows])]


def has_best_of(table: pa.Table) -> bool:
    """Whether the plan holds a best-of-n row's images."""
    return table.column("keeps").null_count < table.num_rows


def _refuse_mixed_formats(table: pa.Table) -> None:
    """One format per WebDataset OUTPUT: `datasets.load_dataset` takes the first shard's columns for every shard
    (the images of other formats load as None) and Ray Data's `read_webdataset` cannot cast a column that is
    png in one row and absent in the next."""
    formats = pc.unique(table.column("output_format")).to_pylist()
    if len(formats) < 2:
        return
    first = table.column("output_format")[0].as_py()
    other = table.filter(pc.not_equal(table.column("output_format"), first)).slice(0, 1).to_pylist()[0]
    raise MixedFormatsError(
        f"--layout webdataset holds images of one format, and this manifest asks for {', '.join(sorted(formats))} "
        f"(the first image is {first}; {other['source']} row {other['row']} asks for {other['output_format']}): "
        "give every row the same output_format (or none, for the --format default), or use --layout hf-parquet, "
        "which holds any mix")


def best_of(column: pa.ChunkedArray, default: int | None) -> pa.ChunkedArray:
    """Each image's candidates (its row's, else the job's default): null for one candidate, an image per image."""
    if default is not None:
        column = column.fill_null(default)
    return pc.if_else(pc.greater(column, 1), column, pa.scalar(None, column.type)).cast(pa.int32())


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def split_blocks(table: pa.Table, replicas: int, batch_size: int, most: int = 4) -> list[pa.Table]:
    """Cut the plan into blocks of whole batches: a few batches each (`most` at most), at least two blocks per
    replica, and the last two rounds (two batches per replica) one batch per block.

    Ray Data hands blocks to pool members ahead of time, so blocks of several batches at the end leave the
    members that finished first idle while the others work through theirs (benchmarks/README.md, fleet). A mixed
    fleet's pools differ in speed throughout, so there every block is one batch (`most=1`)."""
    if table.num_rows == 0:
        return []
    batches = -(-table.num_rows // batch_size)
    per_block = max(1, min(most, batches // (replicas * 2)))
    head_rows = (batches - min(batches, replicas * 2)) * batch_size
    starts = [*range(0, head_rows, per_block * batch_size), *range(head_rows, table.num_rows, batch_size)]
    return [table.slice(start, end - start) for start, end in zip(starts, [*starts[1:], table.num_rows])]
