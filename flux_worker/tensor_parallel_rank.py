"""What one rank of a tensor-parallel group runs: the process group, the sharded transformer, the renderer.

Every rank holds its shard of the transformer (diffusers' `_tp_plan` of the family's transformer class) and the
scheduler; the encoder rank also holds the text encoders (FLUX.1: CLIP and T5; FLUX.2: Mistral) and broadcasts
each prompt's encodings, the family's dict of tensors (families.py); rank 0 also holds the VAE, and decodes
(the family's `tp_decode`) and writes. The row-wise layers all-reduce, so every rank ends the denoising loop
with the same latents. Which pipeline class and components, from the model table (families.py); where the
text encoders and the VAE sit, from the memory planner's plan (`Placement`). flux_worker/tensor_parallel.py
forms the groups and drives them.

On GPUs the transformer is loaded with diffusers' shard-on-load path, so no rank ever holds all of
it. Diffusers' entry points refuse a CPU mesh, so on CPU (tests, Ray's fake GPUs) the transformer is
loaded whole and sharded one level below them, with the same plan and the same
`torch.distributed.tensor.parallel` styles.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import diffusers
import pyarrow as pa
import torch
import torch.distributed as dist

from flux_worker.cold_start import ColdStart
from flux_worker.embedding_cache import EmbeddingCache
from flux_worker.families import Encoding, Family, family_of
from flux_worker.loading import hub_options, local_preset, torch_dtype
from flux_worker.presets import ModelPreset, model_revision
from flux_worker.renderer import (
    ImageWriter,
    Rendered,
    keeper_for,
    quiet_libraries,
    render_batch,
    render_same_shape,
    run_pipeline,
)
from flux_worker.tensor_parallel import TensorParallelError, check_divisible, unsupported_family
from schemas import ModelSpec, RenderOptions
from schemas.errors import first_line

COLLECTIVE_TIMEOUT = timedelta(seconds=float(os.environ.get("FLUXBATCH_TP_TIMEOUT_SECONDS", "1800")))


@dataclass(frozen=True)
class Placement:
    """Where a group's components live: the encoder rank and whether encoders / VAE sit on GPU or CPU."""

    encoder_rank: int = 0
    encoder_device: str = "gpu"  # "gpu": the encoder rank's GPU; "cpu": that rank's host memory
    vae_device: str = "gpu"  # the VAE is always rank 0's, which decodes and writes


# -- process group and sharding ---------------------------------------------------------------------


def init_group(rank: int, world_size: int, address: str) -> torch.device:
    """Join the group's torch.distributed process group; returns this rank's device."""
    if torch.cuda.is_available():
        # Every rank sees the group's GPUs (see RankWorker.start) and takes the one at its own rank.
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return device


def device_mesh(world_size: int) -> Any:
    """A one-dimensional "tp" mesh over the whole process group."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("tp",))


def shard_transformer(transformer: torch.nn.Module, mesh: Any) -> None:
    """Shard a whole, loaded transformer in place with its class's `_tp_plan` (the CPU path).

    This is diffusers' `apply_tensor_parallel` less its device check: the plan is expanded per block
    and each block gets `parallelize_module` with the styles the plan names.
    """
    from diffusers.hooks.tensor_parallel import _resolve_tp_plan, _styles, resolve_tp_shard_specs
    from torch.distributed.tensor.parallel import parallelize_module

    plan = type(transformer)._tp_plan
    if plan is None:
        raise TensorParallelError(f"{type(transformer).__name__} has no _tp_plan; it cannot be sharded")
    check_divisible(transformer.config, mesh.size())
    resolve_tp_shard_specs(transformer, plan, mesh.size())  # raises on an uneven split before any sharding
    for block, relative_plan in _resolve_tp_plan(transformer, plan):
        parallelize_module(block, mesh, _styles(relative_plan))


def load_transformer(family: Family, source: str, dtype: torch.dtype, mesh: Any, device: torch.device,
                     hub: dict[str, Any] | None = None) -> torch.nn.Module:
    """This rank's shard of the family's transformer: shard-on-load on GPUs, load-then-shard on CPU. `hub`:
    loading.hub_options (revision, token)."""
    transformer_class = getattr(diffusers, family.component_class("transformer"))
    common = {"subfolder": "transformer", **(hub or {}), "dtype": dtype, "use_safetensors": True}
    if device.type == "cuda":
        # Each rank reads only its own slice of every planned weight from the safetensors files.
        return transformer_class.from_pretrained(
            source, parallel_config=diffusers.TensorParallelConfig(mesh=mesh), **common).to(device)
    transformer = transformer_class.from_pretrained(source, **common)
    shard_transformer(transformer, mesh)
    return transformer


def text_components(pipeline_class: type) -> list[str]:
    """The pipeline's components other than the transformer, the VAE and the scheduler: its text encoders and
    tokenizers (and optional parts such as an image encoder), which only the encoder rank loads."""
    names = inspect.signature(pipeline_class.__init__).parameters
    return [n for n in names if n not in ("self", "transformer", "vae", "scheduler", "args", "kwargs")]


def load_rank_pipeline(spec: ModelSpec, rank: int, world_size: int, device: torch.device, placement: Placement,
                       options: RenderOptions | None = None) -> tuple[Any, Any | None, Any | None, ModelPreset]:
    """Load what this rank holds: (denoising pipeline, text-encoding pipeline or None, VAE or None, preset)."""
    if spec.adapters:
        raise TensorParallelError(
            "LoRA adapters are not supported on tensor-parallel replicas (the _tp_plan shards the base Linear "
            "layers only); render adapter rows with gpus_per_replica 1"
        )
    if getattr(spec, "quantize", None):
        raise TensorParallelError(
            f"model.quantize={spec.quantize!r} cannot be combined with a tensor-parallel replica: quantized weights "
            "cannot be split into DTensor shards (diffusers refuses it too); use bf16 shards or one GPU per replica"
        )
    preset = local_preset(spec, options)  # a model URL: fetched once per node, the ranks of a node wait for it
    family = family_of(preset)
    if family.tp_decode is None:
        raise TensorParallelError(unsupported_family(family))
    dtype = torch_dtype(spec.dtype, device.type)
    mesh = device_mesh(world_size)
    hub = hub_options(spec, options)
    transformer = load_transformer(family, preset.source, dtype, mesh, device, hub)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    vae_class = getattr(diffusers, family.component_class("vae"))
    common = {**hub, "dtype": dtype, "use_safetensors": True}
    # Components passed as None are not read at all, so a rank loads only what it holds.
    no_text = dict.fromkeys(text_components(pipeline_class))
    pipe = pipeline_class.from_pretrained(preset.source, transformer=transformer, vae=None, **no_text, **common)
    encoder = vae = None
    if rank == placement.encoder_rank:
        encoder = pipeline_class.from_pretrained(preset.source, transformer=None, vae=None, **common)
        encoder.to(device if placement.encoder_device == "gpu" else "cpu")
    if rank == 0:
        vae = vae_class.from_pretrained(preset.source, subfolder="vae", **common)
        vae.to(device if placement.vae_device == "gpu" else "cpu")
        vae_config = vae.config
    else:
        vae_config = vae_class.load_config(preset.source, subfolder="vae", **hub)
    # Without a VAE the pipeline would guess the latent scale factor; every rank must agree on it.
    _use_vae_scale(pipe, len(vae_config["block_out_channels"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, encoder, vae, preset


def _use_vae_scale(pipe: Any, vae_blocks: int) -> None:
    # As the pipelines' own __init__ sets them from a VAE (FLUX.1 and FLUX.2 alike: 2x2 patches of latents).
    pipe.vae_scale_factor = 2 ** (vae_blocks - 1)
    pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=pipe.vae_scale_factor * 2)


# -- one rank ---------------------------------------------------------------------------------------


class RankRenderer:
    """One rank's part of a group's render, composed of the single-GPU steps (flux_worker/renderer.py): every
    rank runs `render_rows` on the same batch in lock-step; the prompts are encoded on the encoder rank and
    broadcast; rank 0 decodes, writes (`ImageWriter`) and returns the rows, the other ranks return nothing."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, rank: int, world_size: int,
                 device: torch.device, placement: Placement):
        # Rank 0 reports the group's cold start (flux_worker/cold_start.py); threads were set by RankWorker.start.
        self.start, self.run_id = ColdStart(device.type), options.run_id
        quiet_libraries()
        self.rank, self.placement, self.device = rank, placement, device
        self.batch_invariant, self.max_retries = options.batch_invariant, options.max_retries
        spec = ModelSpec.model_validate(model)
        self.pipe, self.encoder, self.vae, preset = load_rank_pipeline(spec, rank, world_size, device, placement,
                                                                        options)
        self.start.model_loaded()
        self.family = family_of(preset)
        self.decode = self.family.tp_decode  # flux_worker/latents.py
        self.embed_dtype = self.pipe.transformer.dtype
        self.cache = EmbeddingCache(options.embedding_cache_bytes)  # filled on the encoder rank only
        self.writer = self.keeper = None
        if rank == 0:  # it holds the images: it scores them and keeps best-of-n rows' best
            self.keeper = keeper_for(options, str(device), spec)
            self.writer = ImageWriter(options, device=device.type, identity={
                "model_id": preset.name, "model_revision": model_revision(preset, spec),
                "dtype": str(self.embed_dtype).removeprefix("torch.")})

    def __call__(self, batch: pa.Table) -> pa.Table | None:
        outcomes = render_batch(batch.to_pylist(), self.render_group, batch_invariant=self.batch_invariant,
                                max_retries=self.max_retries, keeper=self.keeper)
        if self.writer is None:
            for _ in outcomes:  # the same groups, splits and retries as rank 0; nothing to write or report
                pass
            return None
        result = self.writer.results(batch, outcomes)
        self.start.after_batch(result, self.writer.fs, self.writer.root, self.run_id)
        return result

    def holdings(self) -> dict[str, Any]:
        """What this rank holds and on which device: the transformer (with the parameters of its shard), and the
        text encoders and the VAE where the plan put them here."""
        from torch.distributed.tensor import DTensor

        shard = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in self.pipe.transformer.parameters())
        held: dict[str, Any] = {"transformer": str(self.device), "transformer_parameters": shard}
        for owner, names in ((self.encoder, text_components(type(self.pipe))), (self, ["vae"])):
            for name in names:
                module = getattr(owner, name, None) if owner is not None else None
                if isinstance(module, torch.nn.Module):
                    held[name] = str(next(module.parameters()).device)
        return held

    def render_group(self, rows: list[dict[str, Any]]) -> list[Rendered]:
        if any(row["adapters"] for row in rows):
            raise TensorParallelError("LoRA adapters are not supported on tensor-parallel replicas")
        if any(row.get("reference_images") for row in rows):
            # The pipelines encode reference images with the VAE, which only rank 0 holds: refused, never dropped.
            raise TensorParallelError("reference images are not supported on tensor-parallel replicas; render rows "
                                      "with reference_images with gpus_per_replica 1")
        return render_same_shape(rows, self.encode, self.generate)

    def encode(self, prompt: str, max_sequence_length: int) -> Encoding:
        """The prompt's encodings on every rank: encoded on the encoder rank, which alone holds the text
        encoders, and broadcast. The family's dict (FLUX.1: sequence and pooled embeddings; FLUX.2: the sequence
        only) is described first, names and shapes, with the error if the encode failed: so the other ranks
        allocate what comes, and a failed encode raises on every rank instead of leaving the others waiting."""
        source = self.placement.encoder_rank
        found: Encoding = {}
        header: list[Any] = [None, []]  # [error text or None, [(name, shape), ...]]
        if self.rank == source:
            try:
                # A copy of Renderer._encode's body, on the encoder pipeline: keep the two alike.
                found = self.cache.get(prompt, max_sequence_length)
                if found is None:
                    with torch.inference_mode():
                        found = self.family.encode(self.encoder, prompt, max_sequence_length, self.encoder.device)
                    self.cache.put(prompt, max_sequence_length, found)
                header[1] = [(name, tuple(tensor.shape)) for name, tensor in found.items()]
            except Exception as failure:  # noqa: BLE001 - re-raised below, after the others know
                header[0] = first_line(failure, typed=True)
                dist.broadcast_object_list(header, src=source)
                raise
        dist.broadcast_object_list(header, src=source)
        if header[0] is not None:
            raise TensorParallelError(f"the encoder rank failed to encode the prompt: {header[0]}")
        encodings: Encoding = {}
        for name, shape in header[1]:
            if self.rank == source:
                tensor = found[name].to(self.device, self.embed_dtype)
            else:
                tensor = torch.empty(shape, dtype=self.embed_dtype, device=self.device)
            dist.broadcast(tensor, src=source)
            encodings[name] = tensor
        return encodings

    def generate(self, first: dict[str, Any], inputs: dict[str, torch.Tensor],
                 generators: list[torch.Generator]) -> list[Any]:
        """Denoise on every rank (the sharded transformer); decode on rank 0, the others get no images."""
        with self.start.first_call():
            latents = run_pipeline(self.pipe, first, inputs, generators, output_type="latent")
        images: list[Any] = [None] * latents.shape[0]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                images = self.decode(self.pipe, self.vae, latents, first["height"], first["width"])
            except Exception as failure:  # noqa: BLE001 - re-raised below, after the others know
                error = failure
        self._agree(error, "decode")
        return images

    def _agree(self, error: BaseException | None, stage: str) -> None:
        """Keep lock-step: if any rank failed at `stage`, every rank raises (so all split and retry alike)."""
        failed = torch.tensor([0 if error is None else 1], device=self.device)
        dist.all_reduce(failed)
        if error is not None:
            raise error
        if int(failed.item()):
            raise TensorParallelError(f"another rank of the tensor-parallel group failed to {stage}")
