"""Load a Flux pipeline from a preset, hub id, local folder or model URL: safetensors only, adapters by name.

The diffusers class comes from the model table (flux_worker/families.py): the preset's family names it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FluxPipeline

from flux_worker.families import family_of
from flux_worker.fast_path import apply_fast_path
from flux_worker.model_cache import fetch_model
from flux_worker.model_folder import is_model_url
from flux_worker.presets import ModelPreset, resolve_preset
from flux_worker.weights import PICKLE_SUFFIXES, UnsafeWeightsError, check_adapter, check_model_folder, refuse_pickle
from schemas import ModelSpec, RenderOptions

__all__ = ["PICKLE_SUFFIXES", "UnsafeWeightsError", "load_adapter", "load_pipeline", "refuse_pickle", "torch_dtype"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means bf16 on GPUs and fp32 on CPU (CPU bf16 kernels are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def local_preset(spec: ModelSpec, options: RenderOptions | None = None) -> ModelPreset:
    """The model's preset, its `source` a local folder or hub id that `from_pretrained` reads: a model URL is
    fetched into this node's cache first (flux_worker/model_cache.py; the other renderers of the node wait for
    that copy) and keeps its URL as its name. A folder is checked as the driver checked it, where it is read."""
    if not is_model_url(spec.name):
        preset = resolve_preset(spec.name)
    else:
        folder, _ = fetch_model(spec.name, options.model_storage_options if options else {}, spec.cache_dir)
        preset = resolve_preset(str(folder))
        preset = replace(preset, name=spec.name) if preset.name == str(folder) else preset
    if Path(preset.source).is_dir():
        check_model_folder(preset.source)
    return preset


def hub_options(spec: ModelSpec, options: RenderOptions | None) -> dict[str, Any]:
    """`from_pretrained`'s revision, and the driver's hub token where it has one (never from the environment of a
    worker of another node, which has none)."""
    token = options.hub_token if options else None
    return {"revision": spec.revision, **({"token": token} if token else {})}


def load_pipeline(spec: ModelSpec, device: str = "cpu", options: RenderOptions | None = None,
                  ) -> tuple[FluxPipeline, ModelPreset]:
    """Load the pipeline once per actor, on `device`, with the spec's adapters registered but inactive."""
    preset = local_preset(spec, options)
    dtype = torch_dtype(spec.dtype, device)
    # Every family's pipeline loads LoRA adapters (FluxLoraLoaderMixin, Flux2LoraLoaderMixin).
    pipeline_class = getattr(diffusers, family_of(preset).pipeline_class)
    pipe = pipeline_class.from_pretrained(preset.source, dtype=dtype, use_safetensors=True,
                                          **hub_options(spec, options), **straight_to(device))
    pipe.set_progress_bar_config(disable=True)
    for name, adapter_path in spec.adapters.items():
        load_adapter(pipe, name, adapter_path)
    pipe = pipe.to(device)
    apply_fast_path(pipe, spec, device)
    return pipe, preset


def straight_to(device: str) -> dict[str, str]:
    """`from_pretrained` options that read the safetensors files straight into GPU memory.

    On a GPU, diffusers' `device_map` (a device name, not a split) makes each component on the meta device and
    copies every tensor from the memory-mapped file to the GPU as it is read, after one large allocation per
    component: no whole fp32/bf16 copy in host memory first, and no module-by-module `.to()` afterwards. Sharded
    checkpoints (FLUX.1's transformer and T5) are also read a shard per thread when the worker's environment has
    HF_ENABLE_PARALLEL_LOADING (pipeline/run.py sets it for renderers). On CPU the plain path is that already."""
    return {"device_map": "cuda"} if device.startswith("cuda") else {}


def load_adapter(pipe: FluxPipeline, name: str, path: str) -> None:
    """Register one LoRA adapter from a .safetensors file under `name`."""
    file = check_adapter(name, path)
    pipe.load_lora_weights(
        str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True
    )
