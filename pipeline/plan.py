"""Plan a run: expand `num_images`, derive keys and seeds, drop keys already done, group by shape.

A key is a hash of (request id, variant), never user text, so it is safe as a file name. A seed is the
row's seed plus the variant index, or derived from the key; the same row renders the same image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.presets import ModelPreset
from pipeline.manifest import Manifest, request_id_of
from schemas import PLAN_SCHEMA, JobSpec, OutputFormat

SEED_MODULUS = 2**64


def image_key(request_id: str, variant: int) -> str:
    """32 hex characters naming one image of one request."""
    return hashlib.blake2b(f"{request_id}\x1f{variant}".encode(), digest_size=16).hexdigest()


def derived_seed(key: str) -> int:
    """A 63-bit seed from the key, for rows that give none (63 bits: friendly to every consumer)."""
    digest = hashlib.blake2b(f"seed\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Plan:
    """The images to render this run, and how many were expected and already done."""

    table: pa.Table
    expected: int
    already_done: int


def plan_images(manifest: Manifest, job: JobSpec, preset: ModelPreset, done_keys: set[str]) -> Plan:
    """Expand every valid row into images, resolve defaults, and keep the ones not in `done_keys`."""
    defaults = job.defaults
    max_seq = job.model.max_sequence_length or preset.max_sequence_length
    rows: list[dict[str, Any]] = []
    expected = 0
    for item in manifest.rows:
        request = item.request
        request_id = request_id_of(request)
        fmt = request.output_format or defaults.output_format or OutputFormat.png
        for variant in range(request.num_images):
            expected += 1
            key = image_key(request_id, variant)
            if key in done_keys:
                continue
            seed = (request.seed + variant) % SEED_MODULUS if request.seed is not None else derived_seed(key)
            rows.append(
                {
                    "key": key,
                    "request_id": request_id,
                    "variant": variant,
                    "prompt": request.prompt,
                    "width": request.width or defaults.width or preset.width,
                    "height": request.height or defaults.height or preset.height,
                    "steps": request.steps or defaults.steps or preset.steps,
                    "guidance": _first(request.guidance, defaults.guidance, preset.guidance),
                    "seed": seed,
                    "max_sequence_length": max_seq,
                    "adapters": [a.model_dump() for a in request.adapters],
                    "output_format": OutputFormat(fmt).value,
                    "source": item.source,
                    "row": item.row,
                    **item.extras,
                }
            )
    schema = pa.schema(list(PLAN_SCHEMA) + manifest.extra_fields)
    table = pa.Table.from_pylist(rows, schema=schema)
    # Same-shape images next to each other, so batches rarely mix shapes; key order makes it stable.
    if table.num_rows:
        order = [(c, "ascending") for c in ("width", "height", "steps", "guidance", "key")]
        table = table.take(pc.sort_indices(table, sort_keys=order))
    return Plan(table=table, expected=expected, already_done=expected - len(rows))


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def split_blocks(table: pa.Table, replicas: int, batch_size: int) -> list[pa.Table]:
    """Cut the plan into blocks: a few batches each, and at least two per replica so none sits idle."""
    if table.num_rows == 0:
        return []
    batches = -(-table.num_rows // batch_size)
    per_block = batch_size * max(1, min(4, batches // (replicas * 2)))
    return [table.slice(start, per_block) for start in range(0, table.num_rows, per_block)]
