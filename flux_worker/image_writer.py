"""Writing rendered images: the result row of each (written or failed), and the writer (paths: schemas/layout.py).

Kept apart from the render steps (flux_worker/renderer.py) and free of torch and diffusers, so that what only
writes images imports in a fraction of a second: rank 0 of a tensor-parallel group uses it as the single-GPU
`Renderer` does, and the fleet benchmark's stand-in renderer (benchmarks/bench_fleet.py) writes each image
through this same writer without loading a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flux_worker.encode import encode_image
from flux_worker.metrics import RendererMetrics
from flux_worker.perceptual_hash import phash
from flux_worker.provenance import ImageMarks
from flux_worker.storage import filesystem
from schemas import PLAN_SCHEMA, RESULT_SCHEMA, OutputFormat, RenderOptions
from schemas.errors import first_line
from schemas.layout import candidate_path, image_path
from schemas.quality import SCORES

log = logging.getLogger("flux_worker.renderer")  # the renderer's log lines, as before this module was split off
PLAN_COLUMNS = set(PLAN_SCHEMA.names)


@dataclass
class Rendered:
    row: dict[str, Any]
    image: Any  # PIL image; None on a tensor-parallel rank that does not decode
    seconds: float
    started_at: datetime
    attempts: int = 1
    # Quality signals (flux_worker/best_of.py): the image's scores, and for a best-of-n row's image which candidate
    # it is, every candidate's seed and scores, and the candidates not kept that the job asked to write.
    scores: dict[str, float] = field(default_factory=dict)
    candidate: int | None = None
    candidate_scores: list[dict[str, Any]] | None = None
    extras: list[tuple[int, Any]] = field(default_factory=list)


def failure_row(row: dict[str, Any], reason: str, tries: int) -> dict[str, Any]:
    """The result row of an image that failed: the planned row with its error and tries."""
    log.warning("image %s (row %s of %s) failed after %d tries: %s", row["key"], row["row"],
                row["source"], tries, reason)
    return {**row, "error": reason, "attempts": tries}


class ImageWriter:
    """Encodes and writes rendered images on threads while the next ones render; one result row per image.

    Only a single-GPU Renderer and rank 0 of a tensor-parallel group hold one: they alone write and report."""

    def __init__(self, options: RenderOptions, *, identity: dict[str, str], device: str):
        self.fs, self.root = filesystem(options.output_uri, options.storage_options)
        self.identity = identity  # model_id, model_revision, dtype: the same on every row
        self.quality = {"jpeg_quality": options.jpeg_quality, "webp_quality": options.webp_quality}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.device = device
        self.metrics = RendererMetrics(identity["model_id"], options.output_uri)
        self.counter = options.image_counter
        self.marks = ImageMarks(options.provenance, identity, options.signing)  # schemas/provenance.py
        # Encoding and uploads run here while the next image renders; a batch returns once all are written.
        self._writes = ThreadPoolExecutor(max_workers=options.write_threads, thread_name_prefix="fluxbatch-write")

    def results(self, batch: pa.Table, outcomes: Iterable[Rendered | dict[str, Any]]) -> pa.Table:
        """Write each image as `outcomes` yields it; once all are written (or failed), the batch's result table."""
        pending = [self._writes.submit(self._write_or_fail, o) if isinstance(o, Rendered) else o for o in outcomes]
        results: dict[str, dict[str, Any]] = {}
        for outcome in pending:  # every image is written (or failed) before its row is returned
            done = outcome.result() if isinstance(outcome, Future) else outcome
            results[done["key"]] = done
        out = [results[key] for key in batch.column("key").to_pylist()]
        self.metrics.record_batch(out)
        self.metrics.record_gpu_memory(self.device)
        extras = [f for f in batch.schema if f.name not in PLAN_COLUMNS]
        return pa.Table.from_pylist(out, schema=pa.schema(list(RESULT_SCHEMA) + extras))

    def _write_or_fail(self, item: Rendered) -> dict[str, Any]:
        try:
            return self._write(item)
        except Exception as error:  # noqa: BLE001
            return failure_row(item.row, f"write: {describe(error)}", item.attempts)

    def _write(self, item: Rendered) -> dict[str, Any]:
        row = item.row
        fmt = OutputFormat(row["output_format"])
        path = image_path(self.root, row["key"], fmt.extension, row.get("revision"))
        pixels = self.marks.pixels(item.image)
        data, marks = self._encode(pixels, row, fmt, path)
        candidates = self._write_extras(item, fmt)  # before the image: its row names them once it exists
        self.fs.write_bytes(path, data)
        if self.counter is not None:  # the driver's bar moves per image (pipeline/progress.py); no reply awaited
            self.counter.add.remote(1)
        return {
            **row,
            **self.identity,
            "image_uri": self.fs.uri(path),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "render_seconds": item.seconds,
            "worker": self.worker,
            "started_at": item.started_at,
            "finished_at": datetime.now(timezone.utc),
            "error": None,
            "attempts": item.attempts,
            "provenance": marks,
            "phash": phash(pixels),
            **{score: item.scores.get(score) for score in SCORES},
            "candidate": item.candidate,
            "candidate_scores": candidates,
        }

    def _encode(self, pixels: Any, row: dict[str, Any], fmt: OutputFormat, path: str) -> tuple[bytes, str]:
        """An image's file bytes and the marks they carry: the watermark is in `pixels` already, XMP goes into the
        encoded file, and a C2PA signature over all of it."""
        data = encode_image(pixels, fmt, **self.quality, xmp=self.marks.xmp(row))
        marks = self.marks.recorded(data, row["key"])
        return self.marks.sign(data, fmt, title=path.rsplit("/", 1)[-1]), marks

    def _write_extras(self, item: Rendered, fmt: OutputFormat) -> list[dict[str, Any]] | None:
        """A best-of-n image's record of every candidate, with the file of each candidate not kept that the job
        asked to write (OUTPUT/candidates/, named after this image's key)."""
        if item.candidate_scores is None:
            return None
        written: dict[int, dict[str, Any]] = {}
        for candidate, image in item.extras:
            path = candidate_path(self.root, item.row["key"], candidate, fmt.extension, item.row.get("revision"))
            row = {**item.row, "seed": next(c["seed"] for c in item.candidate_scores if c["candidate"] == candidate)}
            data, _ = self._encode(self.marks.pixels(image), row, fmt, path)
            self.fs.write_bytes(path, data)
            written[candidate] = {"image_uri": self.fs.uri(path), "sha256": hashlib.sha256(data).hexdigest()}
        return [{**c, "image_uri": None, "sha256": None, **written.get(c["candidate"], {})}
                for c in item.candidate_scores]


def describe(error: BaseException) -> str:
    """An error as one line for a failure row or a log line."""
    return first_line(error, typed=True)[:500]
