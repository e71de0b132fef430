"""Output formats beside the image files: WebDataset tar shards and Hugging Face Parquet.

Every format is one writer class with the same two methods, as in img2dataset: `write(record, image_bytes)`
adds one image and its metadata row, `close()` publishes the shard in one piece and returns its stats.
The renderer actors always write plain image files first (the ledger's guarantees rest on them); the
writers pack those files afterwards (pipeline/store/pack.py), so an interrupted run resumes as usual.

A shard is built in a local temporary file and published whole: renamed into place on local disk, one
upload on an object store. A reader never sees half a shard.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
from collections import Counter
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import Storage
from schemas.layout import TMP_MARK

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# The `datasets` library reads a Parquet file's features from this schema metadata key: with it the
# `image` column loads as an Image feature (decoded to PIL) instead of a plain struct.
HF_FEATURES_KEY = b"huggingface"


class ShardWriter(Protocol):
    def write(self, record: dict[str, Any], image_bytes: bytes) -> None: ...

    def close(self) -> dict[str, Any]: ...


def image_extension(record: dict[str, Any]) -> str:
    """The file extension of a record's image, as the renderer wrote it (`jpeg` is stored as `.jpg`)."""
    return record["image_uri"].rsplit(".", 1)[-1]


def record_json(record: dict[str, Any]) -> dict[str, Any]:
    """A metadata row as plain JSON values (timestamps as ISO 8601 text)."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}


class _Shard:
    """A local temporary file that becomes `dest` in one piece when published, and the counts of what it holds."""

    def __init__(self, fs: Storage, dest: str):
        self.fs, self.dest = fs, dest
        self.count, self.image_bytes = 0, 0
        self.formats: Counter[str] = Counter()
        self.local = fs.local
        if self.local:
            # Beside the destination, so the final rename stays on one filesystem.
            fs.makedirs(dest.rsplit("/", 1)[0])
            self.path = f"{dest}{TMP_MARK}{os.getpid()}-{random.getrandbits(32):08x}"  # swept if killed
        else:
            handle, self.path = tempfile.mkstemp(prefix="fluxbatch-shard-")
            os.close(handle)

    def added(self, ext: str, image_bytes: int) -> None:
        self.count += 1
        self.image_bytes += image_bytes
        self.formats[ext] += 1

    def publish(self) -> dict[str, Any]:
        """Put the shard in place; its stats (pack.py writes them beside it)."""
        size = os.path.getsize(self.path)
        if self.local:
            os.replace(self.path, self.dest)
        else:
            try:
                self.fs.put_file(self.path, self.dest)
            finally:
                os.unlink(self.path)
        return {"count": self.count, "image_bytes": self.image_bytes, "shard_bytes": size,
                "formats": dict(self.formats)}

    def discard(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class WebDatasetWriter:
    """One WebDataset tar: `<key>.<png|jpg|webp>`, `<key>.json` (the metadata row), `<key>.txt` (the prompt)."""

    def __init__(self, fs: Storage, dest: str):
        self._shard = _Shard(fs, dest)
        self._tar = tarfile.open(self._shard.path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, record: dict[str, Any], image_bytes: bytes) -> None:
        key = record["key"]
        # The image's own finish time as every member's mtime: the same records give the same tar bytes.
        mtime = record["finished_at"].timestamp() if record.get("finished_at") else 0
        ext = image_extension(record)
        meta = json.dumps(record_json(record), sort_keys=True).encode()
        for name, data in ((f"{key}.{ext}", image_bytes), (f"{key}.json", meta),
                           (f"{key}.txt", record["prompt"].encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._shard.added(ext, len(image_bytes))

    def close(self) -> dict[str, Any]:
        self._tar.close()
        return self._shard.publish()

    def abort(self) -> None:
        self._tar.close()
        self._shard.discard()


class HFParquetWriter:
    """One Parquet file that `datasets.load_dataset("parquet", ...)` loads with `image` as an Image column."""

    ROWS_PER_GROUP = 64  # a row group of images stays a few MB to a few hundred MB

    def __init__(self, fs: Storage, dest: str, metadata_schema: pa.Schema):
        self._shard = _Shard(fs, dest)
        fields = [pa.field("image", IMAGE_STRUCT)] + list(metadata_schema)
        features = {"info": {"features": {"image": {"_type": "Image"}}}}
        self.schema = pa.schema(fields, metadata={HF_FEATURES_KEY: json.dumps(features).encode()})
        self._writer = pq.ParquetWriter(self._shard.path, self.schema, compression="zstd")
        self._rows: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any], image_bytes: bytes) -> None:
        ext = image_extension(record)
        self._rows.append({**record, "image": {"bytes": image_bytes, "path": f"{record['key']}.{ext}"}})
        self._shard.added(ext, len(image_bytes))
        if len(self._rows) >= self.ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> dict[str, Any]:
        self._flush()
        self._writer.close()
        return self._shard.publish()

    def abort(self) -> None:
        self._writer.close()
        self._shard.discard()
