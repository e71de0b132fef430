"""The rows fluxbatch writes: one `IMAGE_RECORD_SCHEMA` row per image, one `FailureRecord` per refused row or image.

The Arrow schemas are the on-disk contract of `metadata/part-*.parquet` and `failures/part-*.parquet`;
extra manifest columns are appended to the metadata after these.
"""

from __future__ import annotations

import json
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

ADAPTERS_TYPE = pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64())]))
# A row's reference images: each URL as the driver read it and the sha256 of its bytes (filled in by
# pipeline/references.py before planning; the image's key covers the hashes, so a changed photo renders anew).
REFERENCES_TYPE = pa.list_(pa.struct([("url", pa.string()), ("sha256", pa.string())]))
# `seed` is int64, not uint64: Spark and several warehouses refuse unsigned 64-bit columns. Every seed fluxbatch
# derives fits (63 bits); a manifest seed s >= 2**63 is stored as s - 2**64, the same 64 bits read as signed:
# `seed % 2**64` gives s back, and torch.Generator.manual_seed takes either form and makes the same noise.
SEED_TYPE = pa.int64()


# The render parameters of one image, in this order: the first columns of a planned image (PLAN_SCHEMA), of its
# metadata row (IMAGE_RECORD_SCHEMA) and of a renderer's result (RESULT_SCHEMA). Written once, so they cannot drift.
RENDER_FIELDS = [
    ("key", pa.string()),
    ("request_id", pa.string()),
    ("variant", pa.int32()),
    ("prompt", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),
    ("seed", SEED_TYPE),
    ("max_sequence_length", pa.int32()),
    ("adapters", ADAPTERS_TYPE),
    ("output_format", pa.string()),
    ("reference_images", REFERENCES_TYPE),  # ledger parts written before it lack it: read as null (none)
    # Best-of-n (schemas/quality.py): the candidates rendered for the image's row, null for one image per image.
    ("candidates", pa.int32()),
]
# Each candidate of a best-of-n row, recorded on every image the row keeps: its seed, its scores, whether it was
# kept (and as which variant), and its image where the job keeps candidates (quality.keep_candidates).
CANDIDATE_TYPE = pa.struct([("candidate", pa.int32()), ("seed", SEED_TYPE), ("clip_score", pa.float64()),
                            ("aesthetic_score", pa.float64()), ("kept_as", pa.int32()), ("image_uri", pa.string()),
                            ("sha256", pa.string())])
# Where a planned image came from: the manifest file and the row's index in it (for its failure rows).
ORIGIN_FIELDS = [("source", pa.string()), ("row", pa.int64())]

# One rendered image (one metadata row) and every parameter that made it.
IMAGE_RECORD_SCHEMA = pa.schema(
    RENDER_FIELDS
    + [
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("dtype", pa.string()),
        ("image_uri", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("render_seconds", pa.float64()),
        ("worker", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        # The marks the image carries (schemas/provenance.py): "xmp+c2pa+watermark", "" for none; null in parts
        # written before fluxbatch marked images.
        ("provenance", pa.string()),
        # Quality signals (schemas/quality.py); null where the job computes none, and in parts written before.
        ("phash", pa.string()),  # 64-bit DCT perceptual hash, 16 hex (flux_worker/perceptual_hash.py)
        ("clip_score", pa.float64()),
        ("aesthetic_score", pa.float64()),
        ("candidate", pa.int32()),  # best-of-n: which of the row's candidates this image is (its seed is `seed`)
        ("candidate_scores", pa.list_(CANDIDATE_TYPE)),
    ]
)

# Columns added to the metadata after its first parts were written: a reader asking for one of a part that lacks it
# gets nulls of its type (pipeline/store/ledger.py read_part), not a "not a fluxbatch part" error.
ADDED_COLUMNS = ("reference_images", "candidates", "provenance", "phash", "clip_score", "aesthetic_score",
                 "candidate", "candidate_scores")


class FailureRecord(BaseModel):
    """Why a row (validation) or an image (render, write) did not make it, with what to fix."""

    stage: str  # "read", "validate", "render" or "write"
    source: str | None = None  # manifest file
    row: int | None = None  # the row's index in that file, from 0: the index pandas shows, `df.iloc[row]`
    request_id: str | None = None
    key: str | None = None
    variant: int | None = None
    field: str | None = None
    reason: str
    attempts: int = 1
    at: datetime


def nullable_integers_for_pandas(schema: pa.Schema, names: tuple[str, ...] | None = None) -> pa.Schema:
    """`schema` with pandas metadata that reads its integer columns (those in `names`, or all) as pandas' nullable
    integers (Int32, Int64).

    Without it `pd.read_parquet` turns an integer column holding a null into float64 (`variant` 3 reads as 3.0);
    pyarrow's `to_pandas` follows the `pandas` schema metadata, and other readers ignore it.
    """
    columns = [{"name": f.name, "field_name": f.name, "pandas_type": str(f.type),
                "numpy_type": str(f.type).capitalize(), "metadata": None}
               for f in schema if pa.types.is_signed_integer(f.type) and (names is None or f.name in names)]
    pandas = {"index_columns": [], "column_indexes": [], "columns": columns}
    return schema.with_metadata({**(schema.metadata or {}), b"pandas": json.dumps(pandas).encode()})


FAILURE_SCHEMA = nullable_integers_for_pandas(pa.schema(
    [
        ("stage", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("request_id", pa.string()),
        ("key", pa.string()),
        ("variant", pa.int32()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("attempts", pa.int32()),
        ("at", pa.timestamp("us", tz="UTC")),
    ]
))


def signed_seeds(table: pa.Table) -> pa.Table:
    """A ledger table with `seed` as SEED_TYPE: parts written before seeds were int64 hold them as uint64."""
    if "seed" not in table.column_names or table.schema.field("seed").type == SEED_TYPE:
        return table
    index = table.column_names.index("seed")
    return table.set_column(index, "seed", pc.cast(table.column("seed"), SEED_TYPE, safe=False))


# A planned image, as the driver hands it to a renderer; extra manifest columns follow these. `revision` is null
# for a key's first image and the run id when the key has a committed image already (its row changed, or its
# image went missing): the new image then gets a path of its own, so a committed image is never overwritten.
# `keeps`: a best-of-n row's num_images (its candidates ranked below it are not kept); null for the others.
PLAN_SCHEMA = pa.schema(RENDER_FIELDS + ORIGIN_FIELDS + [("revision", pa.string()), ("keeps", pa.int32())])

# What a renderer returns per planned image: the record (null on failure), where it came from, and
# the error of its last try (null on success).
RESULT_SCHEMA = pa.schema(
    list(IMAGE_RECORD_SCHEMA) + ORIGIN_FIELDS + [("error", pa.string()), ("attempts", pa.int32())]
)
