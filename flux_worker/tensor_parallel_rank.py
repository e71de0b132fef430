"""What one rank of a tensor-parallel group runs: the process group, the sharded transformer, the renderer.

Every rank holds its shard of the transformer (diffusers' `_tp_plan`) and the scheduler; the encoder
rank also holds CLIP and T5 and broadcasts each prompt's embeddings; rank 0 also holds the VAE, and
decodes and writes. The row-wise layers all-reduce, so every rank ends the denoising loop with the
same latents. flux_worker/tensor_parallel.py forms the groups and drives them.

On GPUs the transformer is loaded with diffusers' shard-on-load path, so no rank ever holds all of
it. Diffusers' entry points refuse a CPU mesh, so on CPU (tests, Ray's fake GPUs) the transformer is
loaded whole and sharded one level below them, with the same plan and the same
`torch.distributed.tensor.parallel` styles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

from flux_worker.loading import refuse_pickle, torch_dtype
from flux_worker.presets import ModelPreset, resolve_preset
from flux_worker.renderer import Renderer
from flux_worker.tensor_parallel import TensorParallelError, check_divisible
from schemas import ModelSpec

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


def load_transformer(source: str, dtype: torch.dtype, mesh: Any, device: torch.device) -> FluxTransformer2DModel:
    """This rank's shard of the transformer: shard-on-load on GPUs, load-then-shard on CPU."""
    if device.type == "cuda":
        from diffusers import TensorParallelConfig

        # Each rank reads only its own slice of every planned weight from the safetensors files.
        return FluxTransformer2DModel.from_pretrained(
            source, subfolder="transformer", dtype=dtype, use_safetensors=True,
            parallel_config=TensorParallelConfig(mesh=mesh),
        ).to(device)
    transformer = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", dtype=dtype,
                                                         use_safetensors=True)
    shard_transformer(transformer, mesh)
    return transformer


def load_rank_pipeline(spec: ModelSpec, rank: int, world_size: int, device: torch.device, placement: Placement,
                       ) -> tuple[FluxPipeline, FluxPipeline | None, AutoencoderKL | None, ModelPreset]:
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
    preset = resolve_preset(spec.name)
    if Path(preset.source).is_dir():
        refuse_pickle(preset.source)
    dtype = torch_dtype(spec.dtype, device.type)
    mesh = device_mesh(world_size)
    transformer = load_transformer(preset.source, dtype, mesh, device)
    common = {"revision": spec.revision, "dtype": dtype, "use_safetensors": True}
    # Components passed as None are not read at all, so a rank loads only what it holds.
    pipe = FluxPipeline.from_pretrained(preset.source, transformer=transformer, vae=None, text_encoder=None,
                                        text_encoder_2=None, tokenizer=None, tokenizer_2=None, **common)
    encoder = vae = None
    if rank == placement.encoder_rank:
        encoder = FluxPipeline.from_pretrained(preset.source, transformer=None, vae=None, **common)
        encoder.to(device if placement.encoder_device == "gpu" else "cpu")
    if rank == 0:
        vae = AutoencoderKL.from_pretrained(preset.source, subfolder="vae", **common)
        vae.to(device if placement.vae_device == "gpu" else "cpu")
        vae_config = vae.config
    else:
        vae_config = AutoencoderKL.load_config(preset.source, subfolder="vae", revision=spec.revision)
    # Without a VAE the pipeline would guess the latent scale factor; every rank must agree on it.
    _use_vae_scale(pipe, len(vae_config["block_out_channels"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, encoder, vae, preset


def _use_vae_scale(pipe: FluxPipeline, vae_blocks: int) -> None:
    from diffusers.image_processor import VaeImageProcessor

    pipe.vae_scale_factor = 2 ** (vae_blocks - 1)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)


# -- one rank ---------------------------------------------------------------------------------------


class RankRenderer(Renderer):
    """`Renderer` on one rank: prompts are encoded on the encoder rank and broadcast, rank 0 decodes and writes."""

    def __init__(self, model: dict[str, Any], output_uri: str, storage_options: dict[str, Any] | None = None, *,
                 rank: int, world_size: int, device: torch.device, placement: Placement, **kwargs: Any):
        self.rank, self.world_size, self.placement = rank, world_size, placement
        spec = ModelSpec.model_validate(model)
        pipe, self.encoder, self.vae, preset = load_rank_pipeline(spec, rank, world_size, device, placement)
        super().__init__(model, output_uri, storage_options, pipeline=(pipe, preset), **kwargs)
        self.device = device.type
        self.rank_device = device
        config = pipe.transformer.config
        self.text_shape = (config.joint_attention_dim, config.pooled_projection_dim)
        self.embed_dtype = pipe.transformer.dtype
        if self.encoder is not None:
            self.encoder_device = self.encoder.text_encoder_2.device
        if rank != 0:
            self.metrics.enabled = False  # rank 0 counts the group's images

    def _encode(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Only the encoder rank holds the text encoders; the others receive its result. A status flag
        # goes first, so a failed encode raises on every rank instead of leaving the others waiting.
        embeds = torch.empty((1, max_sequence_length, self.text_shape[0]), dtype=self.embed_dtype,
                             device=self.rank_device)
        pooled = torch.empty((1, self.text_shape[1]), dtype=self.embed_dtype, device=self.rank_device)
        error: BaseException | None = None
        if self.rank == self.placement.encoder_rank:
            try:
                found = self.cache.get(prompt, max_sequence_length)
                if found is None:
                    with torch.inference_mode():
                        found = self.encoder.encode_prompt(prompt=[prompt], prompt_2=None, device=self.encoder_device,
                                                           max_sequence_length=max_sequence_length)[:2]
                    self.cache.put(prompt, max_sequence_length, found)
                embeds.copy_(found[0])
                pooled.copy_(found[1])
            except Exception as failure:  # noqa: BLE001 - re-raised below, after the others know
                error = failure
        self._agree(error, "encode")
        dist.broadcast(embeds, src=self.placement.encoder_rank)
        dist.broadcast(pooled, src=self.placement.encoder_rank)
        return embeds, pooled

    def _generate(self, first: dict[str, Any], embeds: torch.Tensor, pooled: torch.Tensor,
                  generators: list[torch.Generator]) -> list[Any]:
        latents = self._run_pipeline(first, embeds, pooled, generators, output_type="latent")
        images: list[Any] = [None] * latents.shape[0]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                images = self._decode(latents, first["height"], first["width"])
            except Exception as failure:  # noqa: BLE001 - re-raised below, after the others know
                error = failure
        self._agree(error, "decode")
        return images

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> list[Any]:
        # FluxPipeline's own decode step, run where the planner put the VAE.
        pipe, vae = self.pipe, self.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")

    def _agree(self, error: BaseException | None, stage: str) -> None:
        """Keep lock-step: if any rank failed at `stage`, every rank raises (so all split and retry alike)."""
        failed = torch.tensor([0 if error is None else 1], device=self.rank_device)
        dist.all_reduce(failed)
        if error is not None:
            raise error
        if int(failed.item()):
            raise TensorParallelError(f"another rank of the tensor-parallel group failed to {stage}")

    def _write(self, item: Any, tries: int) -> dict[str, Any]:
        if self.rank == 0:
            return super()._write(item, tries)
        return {**item.row, "error": None, "attempts": tries}  # rank 0's table is the one returned

    def _use_adapters(self, adapters: Any) -> None:
        if adapters:
            raise TensorParallelError("LoRA adapters are not supported on tensor-parallel replicas")
