"""Pack a run's finished images into the job's layout: WebDataset tar shards or Hugging Face Parquet files.

    OUTPUT/webdataset/00000.tar ...   or   OUTPUT/hf/00000.parquet ...
    OUTPUT/<folder>/.stats/00000.json     one per shard: count, bytes, formats, digest of its keys
    OUTPUT/<folder>/.stats.json           the shards' stats summed

A layout folder holds only its shards as far as readers look: the stats are dot-files, which the `datasets`
builder and the Hub's viewer skip (an `_stats` folder made `load_dataset(folder)` read the JSON, not the
Parquet), as pyarrow, pandas and Spark do.

The images packed are those of the current manifest that the ledger holds, in ledger order (metadata parts
by name, which starts with the run's UTC time, so in commit order) and `shard_size` to a shard. The ledger
only grows, so on a re-run the full shards hold the same images: a shard whose stats show the same digest
is left alone, and only the shards that gained images are written again. A WebDataset shard holds images of
one format only (formats in order of first appearance): Ray Data's `read_webdataset` makes a column per
member suffix, and its default decoder fails on a block where `.png` and `.jpg` columns are each partly empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage, filesystem
from pipeline.store import ledger
from pipeline.store.writers import HFParquetWriter, ShardWriter, WebDatasetWriter
from schemas import JobSpec
from schemas.errors import FluxbatchError
from schemas.layout import LAYOUTS, METADATA, STATS, committed_image_path

log = logging.getLogger(__name__)

READ_THREADS = 8  # image reads overlap; on object stores each is a round trip


class CorruptImageError(FluxbatchError, RuntimeError):
    """An image file no longer matches the sha256 its metadata row recorded (`fluxbatch verify --repair` mends it)."""


@dataclass
class PackResult:
    """What packing did: shards in the layout, how many were written and how many were already current."""

    layout: str
    folder: str
    shards: int
    written: int
    unchanged: int
    images: int


def shard_name(index: int, suffix: str) -> str:
    return f"{index:05d}{suffix}"


def pack_images(job: JobSpec, keys: set[str]) -> PackResult:
    """Write the layout `job.output.layout` names from the images in OUTPUT's ledger whose key is in `keys`."""
    layout = job.output.layout
    if layout not in LAYOUTS:
        raise ValueError(f"output.layout {layout!r} has nothing to pack; packed layouts: {', '.join(LAYOUTS)}")
    folder_name, suffix = LAYOUTS[layout]
    fs, root = filesystem(job.output.uri, job.output.storage_options)
    folder = f"{root}/{folder_name}"
    table = _ledger_records(fs, root, keys)
    shards = _shards(layout, table, job.output.shard_size)
    count = len(shards)
    written = unchanged = 0
    stats: list[dict[str, Any]] = []
    for index, records in enumerate(shards):
        digest = _digest(layout, records, table.schema)
        name = shard_name(index, suffix)
        previous = _read_stats(fs, f"{folder}/{STATS}/{index:05d}.json")
        if previous and previous.get("digest") == digest and fs.exists(f"{folder}/{name}"):
            stats.append(previous)
            unchanged += 1
            continue
        shard_stats = _write_shard(fs, root, layout, f"{folder}/{name}", records, table.schema)
        shard_stats = {"shard": name, **shard_stats, "digest": digest,
                       "written_at": datetime.now(timezone.utc).isoformat()}
        fs.write_bytes(f"{folder}/{STATS}/{index:05d}.json", _json(shard_stats))
        stats.append(shard_stats)
        written += 1
    _remove_stale_shards(fs, folder, suffix, count)
    total = {
        "layout": layout,
        "shard_size": job.output.shard_size,
        "shards": count,
        "images": sum(s["count"] for s in stats),
        "image_bytes": sum(s["image_bytes"] for s in stats),
        "shard_bytes": sum(s["shard_bytes"] for s in stats),
        "formats": _sum_counts(s["formats"] for s in stats),
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    fs.write_bytes(f"{folder}/{STATS}.json", _json(total))
    log.info("packed %d images into %d %s shards (%d written, %d unchanged)", total["images"], count, layout,
             written, unchanged)
    return PackResult(layout=layout, folder=folder, shards=count, written=written, unchanged=unchanged,
                      images=total["images"])


def _ledger_records(fs: Storage, root: str, keys: set[str]) -> pa.Table:
    """The ledger's rows for `keys`, in commit order, each key once (the ledger reader keeps a key's latest row)."""
    table = ledger.read_table(fs, root, METADATA)
    if table is None:
        return pa.table({"key": pa.array([], pa.string())})
    return table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string())))


def _shards(layout: str, table: pa.Table, size: int) -> list[pa.Table]:
    """The records of each shard, `size` to a shard; for WebDataset, one image format per shard."""
    groups = [table]
    if layout == "webdataset" and table.num_rows:
        formats = table.column("output_format")
        groups = [table.filter(pc.equal(formats, fmt)) for fmt in dict.fromkeys(formats.to_pylist())]
    return [group.slice(start, size) for group in groups for start in range(0, group.num_rows, size)]


def _digest(layout: str, records: pa.Table, schema: pa.Schema) -> str:
    """Names a shard's content: its layout, its columns (a shard packed before a column was added to the ledger is
    packed again, so every shard of a data set has the same columns) and each image's key and sha256, in order."""
    digest = hashlib.sha256(layout.encode())
    digest.update(str(schema.remove_metadata()).encode())
    for key, sha in zip(records.column("key").to_pylist(), records.column("sha256").to_pylist()):
        digest.update(f"\x1f{key}:{sha}".encode())
    return digest.hexdigest()


def _write_shard(fs: Storage, root: str, layout: str, dest: str, records: pa.Table,
                 schema: pa.Schema) -> dict[str, Any]:
    writer: ShardWriter = WebDatasetWriter(fs, dest) if layout == "webdataset" else HFParquetWriter(fs, dest, schema)
    rows = records.to_pylist()
    try:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for record, data in zip(rows, pool.map(lambda r: _read_image(fs, root, r), rows)):
                writer.write(record, data)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _read_image(fs: Storage, root: str, record: dict[str, Any]) -> bytes:
    """The image of a ledger row, where this OUTPUT holds it (a copied or moved OUTPUT's rows name the old URL)."""
    data = fs.read_bytes(committed_image_path(root, record["key"], record["image_uri"]))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CorruptImageError(
            f"image {record['image_uri']} (key {record['key']}) does not match the sha256 in its metadata row; "
            "run `fluxbatch verify OUTPUT --repair` (it moves the image aside and drops its row), then run again to "
            "render it again"
        )
    return data


def _read_stats(fs: Storage, path: str) -> dict[str, Any] | None:
    if not fs.exists(path):
        return None
    return json.loads(fs.read_bytes(path))


def _remove_stale_shards(fs: Storage, folder: str, suffix: str, count: int) -> None:
    """Shards past the new count (the manifest shrank, or shard_size grew) would be read as data: drop them."""
    if not fs.exists(folder):
        return
    for path in fs.ls(folder):
        name = path.rsplit("/", 1)[-1]
        stem = name.removesuffix(suffix)
        if name.endswith(suffix) and stem.isdigit() and int(stem) >= count:
            fs.rm_file(path)
            stats = f"{folder}/{STATS}/{stem}.json"
            if fs.exists(stats):
                fs.rm_file(stats)


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for item in counts:
        for name, value in item.items():
            total[name] = total.get(name, 0) + value
    return total


def _json(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
