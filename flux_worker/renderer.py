"""The renderer actor: loads one pipeline, renders batches of planned images, writes the image files.

Ray Data calls `Renderer(...)` once per replica and then `renderer(batch)` per batch. A batch is split
into groups of one shape (size, steps, guidance, adapters); a group that fails is split in halves and
retried (so one bad image or an out-of-memory batch never takes its neighbours down), and a single
image is retried up to `max_retries` times before it is returned as a failure with its last error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby
from typing import Any

import pyarrow as pa
import torch
from diffusers import FluxPipeline

from flux_worker.embedding_cache import EmbeddingCache
from flux_worker.encode import encode_image
from flux_worker.loading import load_pipeline
from flux_worker.metrics import RendererMetrics
from flux_worker.presets import ModelPreset, model_revision
from flux_worker.storage import filesystem, uri, write_bytes
from schemas import PLAN_SCHEMA, RESULT_SCHEMA, ModelSpec, OutputFormat

log = logging.getLogger(__name__)
PLAN_COLUMNS = set(PLAN_SCHEMA.names)


def image_path(root: str, key: str, fmt: OutputFormat) -> str:
    """OUTPUT/images/<kk>/<key>.<ext>: keys are hex digests, so no row can name a path."""
    return f"{root}/images/{key[:2]}/{key}.{fmt.extension}"


def group_key(row: dict[str, Any]) -> tuple:
    """Rows that can share one transformer call: same size, steps, guidance, sequence length, adapters."""
    adapters = tuple((a["name"], a["scale"]) for a in row["adapters"] or ())
    return (row["width"], row["height"], row["steps"], row["guidance"], row["max_sequence_length"], adapters)


@dataclass
class Rendered:
    row: dict[str, Any]
    image: Any  # PIL image
    seconds: float
    started_at: datetime


class Renderer:
    """A Ray Data callable class holding one loaded Flux pipeline."""

    def __init__(
        self,
        model: dict[str, Any],
        output_uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        batch_invariant: bool = True,
        threads: int | None = None,
        max_retries: int = 3,
        jpeg_quality: int = 95,
        webp_quality: int = 95,
        embedding_cache_bytes: int = 256 * 2**20,
        write_threads: int = 4,
        pipeline: tuple[FluxPipeline, ModelPreset] | None = None,
    ):
        _quiet_libraries()
        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=num_cpus; match it explicitly
        self.spec = ModelSpec.model_validate(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # A tensor-parallel rank hands in its own, already sharded pipeline (flux_worker/tensor_parallel.py).
        self.pipe, self.preset = pipeline or load_pipeline(self.spec, self.device)
        self.model_id = self.preset.name
        self.revision = model_revision(self.preset, self.spec)
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")
        self.fs, self.root = filesystem(output_uri, storage_options)
        self.batch_invariant = batch_invariant
        self.max_retries = max_retries
        self.quality = {"jpeg_quality": jpeg_quality, "webp_quality": webp_quality}
        self.cache = EmbeddingCache(embedding_cache_bytes)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # Encoding and uploads run here while the next image renders; a batch returns once all are written.
        self._writes = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="fluxbatch-write")
        self.metrics = RendererMetrics(self.model_id, output_uri)
        self._active_adapters: tuple = ()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        extras = [f for f in batch.schema if f.name not in PLAN_COLUMNS]
        ordered = sorted(rows, key=group_key)
        if self.batch_invariant:  # one image per call anyway: each is its own group, so its write starts at once
            groups = [[row] for row in ordered]
        else:
            groups = [list(group) for _, group in groupby(ordered, key=group_key)]
        pending: list[dict[str, Any] | Future] = []
        for group in groups:
            pending.extend(self._render_group(group, tries=1))
        results: dict[str, dict[str, Any]] = {}
        for outcome in pending:  # every image is written (or failed) before its row is returned
            done = outcome.result() if isinstance(outcome, Future) else outcome
            results[done["key"]] = done
        out = [results[row["key"]] for row in rows]
        self.metrics.record_batch(out)
        self.metrics.record_gpu_memory(self.device)
        schema = pa.schema(list(RESULT_SCHEMA) + extras)
        return pa.Table.from_pylist(out, schema=schema)

    # -- one group ---------------------------------------------------------------------------------

    def _render_group(self, group: list[dict[str, Any]], tries: int) -> Iterator[dict[str, Any] | Future]:
        """Render a group and queue its writes; on error split it, and retry a lone image until its tries run out."""
        try:
            rendered = self._render(group)
        except Exception as error:  # noqa: BLE001 - any failure is reported per row, never raised
            if self.device == "cuda":
                torch.cuda.empty_cache()
            if len(group) > 1:
                log.warning("batch of %d failed (%s); splitting it", len(group), _describe(error))
                half = len(group) // 2
                yield from self._render_group(group[:half], tries)
                yield from self._render_group(group[half:], tries)
                return
            if tries <= self.max_retries:
                yield from self._render_group(group, tries + 1)
                return
            yield self._failure(group[0], f"render: {_describe(error)}", tries)
            return
        for item in rendered:
            yield self._writes.submit(self._write_or_fail, item, tries)

    def _render(self, group: list[dict[str, Any]]) -> list[Rendered]:
        first = group[0]
        self._use_adapters(first["adapters"] or ())
        if self.batch_invariant:
            # One image per transformer call: batched matmuls change the last bits of a result, so an
            # image's bytes would depend on its batch-mates. Prompt encodings are still shared.
            return [self._call_pipeline([row])[0] for row in group]
        return self._call_pipeline(group)

    def _call_pipeline(self, rows: list[dict[str, Any]]) -> list[Rendered]:
        first = rows[0]
        started_at = datetime.now(timezone.utc)
        start = time.perf_counter()
        embeds, pooled = zip(*(self._encode(r["prompt"], r["max_sequence_length"]) for r in rows))
        # CPU generators: the same seed gives the same noise on any device, one generator per image.
        generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
        with torch.inference_mode():
            images = self._generate(first, torch.cat(embeds), torch.cat(pooled), generators)
        seconds = (time.perf_counter() - start) / len(rows)
        return [Rendered(row, image, seconds, started_at) for row, image in zip(rows, images)]

    def _generate(self, first: dict[str, Any], embeds: torch.Tensor, pooled: torch.Tensor,
                  generators: list[torch.Generator]) -> list[Any]:
        """Denoise and decode one same-shape batch; a tensor-parallel rank overrides this."""
        return self._run_pipeline(first, embeds, pooled, generators)

    def _run_pipeline(self, first: dict[str, Any], embeds: torch.Tensor, pooled: torch.Tensor,
                      generators: list[torch.Generator], output_type: str = "pil") -> Any:
        """The pipeline call for one same-shape batch: images, or latents with `output_type="latent"`."""
        return self.pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            width=first["width"],
            height=first["height"],
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance"],
            max_sequence_length=first["max_sequence_length"],
            generator=generators,
            output_type=output_type,
        ).images

    def _encode(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.cache.get(prompt, max_sequence_length)
        if found is None:
            with torch.inference_mode():
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=[prompt], prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
                )
            found = (embeds, pooled)
            self.cache.put(prompt, max_sequence_length, found)
        return found

    def _use_adapters(self, adapters: Any) -> None:
        wanted = tuple((a["name"], float(a["scale"])) for a in adapters)
        if wanted == self._active_adapters:
            return
        unknown = [name for name, _ in wanted if name not in self.spec.adapters]
        if unknown:
            raise KeyError(f"adapter {unknown[0]!r} is not declared in the job's model.adapters")
        if wanted:
            self.pipe.set_adapters([n for n, _ in wanted], adapter_weights=[s for _, s in wanted])
        elif self.spec.adapters:
            self.pipe.disable_lora()
        self._active_adapters = wanted

    # -- results -----------------------------------------------------------------------------------

    def _write_or_fail(self, item: Rendered, tries: int) -> dict[str, Any]:
        try:
            return self._write(item, tries)
        except Exception as error:  # noqa: BLE001
            return self._failure(item.row, f"write: {_describe(error)}", tries)

    def _write(self, item: Rendered, tries: int) -> dict[str, Any]:
        row = item.row
        fmt = OutputFormat(row["output_format"])
        data = encode_image(item.image, fmt, **self.quality)
        path = image_path(self.root, row["key"], fmt)
        write_bytes(self.fs, path, data)
        return {
            **row,
            "model_id": self.model_id,
            "model_revision": self.revision,
            "dtype": self.dtype,
            "image_uri": uri(self.fs, path),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "render_seconds": item.seconds,
            "worker": self.worker,
            "started_at": item.started_at,
            "finished_at": datetime.now(timezone.utc),
            "error": None,
            "attempts": tries,
        }

    def _failure(self, row: dict[str, Any], reason: str, tries: int) -> dict[str, Any]:
        log.warning("image %s (row %s of %s) failed after %d tries: %s", row["key"], row["row"],
                    row["source"], tries, reason)
        return {**row, "error": reason, "attempts": tries}


def _quiet_libraries() -> None:
    """Worker logs reach the driver's terminal: keep library progress bars and notices out of them."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__
