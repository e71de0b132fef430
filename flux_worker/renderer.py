"""The renderer actor: loads one pipeline, renders batches of planned images, writes the image files.

Ray Data calls `Renderer(...)` once per replica and then `renderer(batch)` per batch. A batch is split
into groups of one shape (size, steps, guidance, adapters); a group that fails is split in halves and
retried (so one bad image or an out-of-memory batch never takes its neighbours down), and a single
image is retried up to `max_retries` times before it is returned as a failure with its last error.

The steps are plain functions and one small writer, which `Renderer` (one device) and each rank of a
tensor-parallel group (flux_worker/tensor_parallel_rank.py) compose:

    render_rows           group by shape, split a failed group, retry a lone image     every rank, in lock-step
      render_group        adapters, then render_same_shape:                            per device / per rank
        encode            the family's encoding of each prompt (families.py), cached
        generate          denoise and decode (run_pipeline)
    ImageWriter.results   encode and write each image while the next renders; rows    one device / rank 0 only
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from itertools import groupby
from typing import Any

import pyarrow as pa
import torch
from diffusers import FluxPipeline

from flux_worker import compile_cache
from flux_worker.best_of import Keeper, expand
from flux_worker.cold_start import ColdStart
from flux_worker.cpu_threads import cpu_threads
from flux_worker.embedding_cache import EmbeddingCache
from flux_worker.families import Encoding, family_of
from flux_worker.image_writer import ImageWriter, Rendered, describe, failure_row
from flux_worker.loading import load_pipeline
from flux_worker.presets import ModelPreset, model_revision
from flux_worker.references import ReferenceReader
from flux_worker.scorers import Scorers
from schemas import ModelSpec, RenderOptions

__all__ = ["ImageWriter", "Rendered", "Renderer", "failure_row", "keeper_for", "render_batch", "render_rows",
           "render_same_shape", "run_pipeline"]
log = logging.getLogger(__name__)


def group_key(row: dict[str, Any]) -> tuple:
    """Rows that can share one transformer call: same size, steps, guidance, sequence length, adapters and
    reference images (a pipeline call takes one set of references for its whole batch)."""
    adapters = tuple((a["name"], a["scale"]) for a in row["adapters"] or ())
    references = tuple((r["url"], r["sha256"]) for r in row.get("reference_images") or ())
    return (row["width"], row["height"], row["steps"], row["guidance"], row["max_sequence_length"], adapters,
            references)


# -- the render steps: a single-GPU Renderer and each rank of a tensor-parallel group compose these ------------


def render_rows(rows: list[dict[str, Any]], render_group: Callable[[list[dict[str, Any]]], list[Rendered]], *,
                batch_invariant: bool, max_retries: int, most: int | None = None,
                ) -> Iterator[Rendered | dict[str, Any]]:
    """Every row rendered by `render_group` (rows of one shape in, images out), as each is done; a row that
    failed comes out as its failure row. A call takes `most` rows at most (a batch's best-of-n candidates must not
    make one call of n times the batch the planner counted). The ranks of a group run this in lock-step: same
    groups, same splits."""
    ordered = sorted(rows, key=group_key)
    if batch_invariant:
        # One image per transformer call: batched matmuls change the last bits of a result, so an image's bytes
        # would depend on its batch-mates. Prompt encodings are still shared (the embedding cache).
        groups = [[row] for row in ordered]
    else:
        groups = [list(group) for _, group in groupby(ordered, key=group_key)]
        if most:
            groups = [group[start:start + most] for group in groups for start in range(0, len(group), most)]
    for group in groups:
        yield from _render_with_retries(group, render_group, max_retries, tries=1)


def _render_with_retries(group: list[dict[str, Any]], render_group: Callable[[list[dict[str, Any]]], list[Rendered]],
                         max_retries: int, tries: int) -> Iterator[Rendered | dict[str, Any]]:
    """Render a group; on error split it, and retry a lone image until its tries run out."""
    try:
        rendered = render_group(group)
    except Exception as error:  # noqa: BLE001 - any failure is reported per row, never raised
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(group) > 1:
            log.warning("batch of %d failed (%s); splitting it", len(group), describe(error))
            half = len(group) // 2
            yield from _render_with_retries(group[:half], render_group, max_retries, tries)
            yield from _render_with_retries(group[half:], render_group, max_retries, tries)
            return
        if tries <= max_retries:
            yield from _render_with_retries(group, render_group, max_retries, tries + 1)
            return
        yield failure_row(group[0], f"render: {describe(error)}", tries)
        return
    for item in rendered:
        item.attempts = tries
        yield item


def render_batch(rows: list[dict[str, Any]], render_group: Callable[[list[dict[str, Any]]], list[Rendered]], *,
                 batch_invariant: bool, max_retries: int, keeper: Keeper | None) -> Iterator[Rendered | dict[str, Any]]:
    """A batch's outcomes: its rows rendered (a best-of-n row's candidates in place of its images, best_of.expand),
    then scored and each best-of-n row's best kept by `keeper`, on the device holding the images (None on the other
    ranks of a tensor-parallel group, which render in lock-step and keep nothing)."""
    outcomes = render_rows(expand(rows), render_group, batch_invariant=batch_invariant, max_retries=max_retries,
                           most=len(rows))
    return keeper.outcomes(outcomes, rows) if keeper is not None else outcomes


def render_same_shape(rows: list[dict[str, Any]], encode: Callable[[str, int], Encoding],
                      generate: Callable[[dict[str, Any], Encoding, list[torch.Generator]], list[Any]],
                      ) -> list[Rendered]:
    """Rows of one shape through one denoising call: each prompt encoded, one CPU generator per image's seed."""
    first = rows[0]
    started_at = datetime.now(timezone.utc)
    start = time.perf_counter()
    encodings = [encode(r["prompt"], r["max_sequence_length"]) for r in rows]
    inputs = {name: torch.cat([e[name] for e in encodings]) for name in encodings[0]}
    # CPU generators: the same seed gives the same noise on any device, one generator per image.
    generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
    with torch.inference_mode():
        images = generate(first, inputs, generators)
    seconds = (time.perf_counter() - start) / len(rows)
    return [Rendered(row, image, seconds, started_at) for row, image in zip(rows, images)]


def run_pipeline(pipe: Any, first: dict[str, Any], inputs: Encoding, generators: list[torch.Generator],
                 output_type: str = "pil") -> Any:
    """The pipeline call for one same-shape batch: images, or latents with `output_type="latent"`."""
    return pipe(
        **inputs,  # the family's prompt encodings (families.py: encode_flux1, encode_flux2)
        width=first["width"],
        height=first["height"],
        num_inference_steps=first["steps"],
        guidance_scale=first["guidance"],
        max_sequence_length=first["max_sequence_length"],
        generator=generators,
        output_type=output_type,
    ).images


class Renderer:
    """A Ray Data callable class holding one loaded Flux pipeline."""

    def __init__(self, model: dict[str, Any], options: RenderOptions,
                 pipeline: tuple[FluxPipeline, ModelPreset] | None = None):
        # `pipeline`: a loaded pipeline and its preset, handed in by tests that share one between renderers.
        self.start = ColdStart("cuda" if torch.cuda.is_available() else "cpu")
        self.run_id = options.run_id
        quiet_libraries()
        if options.threads:
            torch.set_num_threads(cpu_threads(options.threads))  # Ray sets OMP_NUM_THREADS=num_cpus; match it
        self.spec = ModelSpec.model_validate(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe, self.preset = pipeline or load_pipeline(self.spec, self.device, options)
        self.keeper = keeper_for(options, self.device, self.spec)
        self.start.model_loaded()
        # model.compile: each new shape's first call loads (or saves) the shared compile cache's blob.
        self.compile_cache = compile_cache.for_model(self.spec, self.pipe.transformer, self.device,
                                                     options.compile_cache_options)
        self.model_id = self.preset.name
        self.family = family_of(self.preset)
        self.revision = model_revision(self.preset, self.spec)
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")
        self.batch_invariant = options.batch_invariant
        self.max_retries = options.max_retries
        self.cache = EmbeddingCache(options.embedding_cache_bytes)
        self.writer = ImageWriter(options, device=self.device, identity={
            "model_id": self.model_id, "model_revision": self.revision, "dtype": self.dtype})
        self._active_adapters: tuple = ()
        self.references = ReferenceReader(options.reference_storage_options, self.family.pipeline_class)

    def __call__(self, batch: pa.Table) -> pa.Table:
        outcomes = render_batch(batch.to_pylist(), self.render_group, batch_invariant=self.batch_invariant,
                                max_retries=self.max_retries, keeper=self.keeper)
        result = self.writer.results(batch, outcomes)
        self.start.after_batch(result, self.writer.fs, self.writer.root, self.run_id, self.compile_cache)
        return result

    # -- the steps, on this one device -------------------------------------------------------------

    def render_group(self, rows: list[dict[str, Any]]) -> list[Rendered]:
        """Rows of one shape: their adapters on, prompts encoded, denoised and decoded by the pipeline."""
        self._use_adapters(rows[0]["adapters"] or ())
        return render_same_shape(rows, self._encode, self._generate)

    def _generate(self, first: dict[str, Any], inputs: Encoding, generators: list[torch.Generator]) -> list[Any]:
        """Denoise and decode one same-shape batch; the actor's first call is its warm-up (compile, if on)."""
        shape = call_shape(first, generators)
        with self.start.first_call(), compile_cache.around_first_call(self.compile_cache, shape):
            # A batch's rows share their reference images (group_key): read once, cached for the next batches.
            return run_pipeline(self.pipe, first, {**inputs, **self.references.inputs(first)}, generators)

    def _encode(self, prompt: str, max_sequence_length: int) -> Encoding:
        """The pipeline's inputs for one prompt, as its family encodes them (families.py); cached per actor."""
        found = self.cache.get(prompt, max_sequence_length)
        if found is None:
            with torch.inference_mode():
                found = self.family.encode(self.pipe, prompt, max_sequence_length, self.device)
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


def keeper_for(options: RenderOptions, device: str, spec: ModelSpec) -> Keeper:
    """The scorers the job names, loaded once for this actor on `device` (fetched into the node's model cache when
    named by URL, like the model), in the Keeper that scores each image and keeps best-of-n rows' best."""
    scorers = Scorers(options.quality, device, options, spec.cache_dir) if options.quality.scores else None
    return Keeper(options.quality, scorers)


def call_shape(first: dict[str, Any], generators: list[torch.Generator]) -> tuple[int, int, int, int]:
    """What a compiled transformer specialises on (dynamic=False): batch, height, width and text length."""
    return (len(generators), first["height"], first["width"], first["max_sequence_length"])


def quiet_libraries() -> None:
    """Worker logs reach the driver's terminal: keep library progress bars and notices out of them."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
