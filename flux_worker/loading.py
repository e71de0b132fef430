"""Load a Flux pipeline from a preset, hub id or local folder: safetensors only, adapters by name.

The diffusers class comes from the model table (flux_worker/families.py): the preset's family names it."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers import FluxPipeline

from flux_worker.families import family_of
from flux_worker.fast_path import apply_fast_path
from flux_worker.presets import ModelPreset, resolve_preset
from flux_worker.weights import PICKLE_SUFFIXES, UnsafeWeightsError, check_adapter, check_model_folder, refuse_pickle
from schemas import ModelSpec

__all__ = ["PICKLE_SUFFIXES", "UnsafeWeightsError", "load_adapter", "load_pipeline", "refuse_pickle", "torch_dtype"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means bf16 on GPUs and fp32 on CPU (CPU bf16 kernels are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def load_pipeline(spec: ModelSpec, device: str = "cpu") -> tuple[FluxPipeline, ModelPreset]:
    """Load the pipeline once per actor, on `device`, with the spec's adapters registered but inactive."""
    preset = resolve_preset(spec.name)
    if Path(preset.source).is_dir():
        check_model_folder(preset.source)  # the driver's pre-flight checks, again where the files are read
    dtype = torch_dtype(spec.dtype, device)
    # Every family's pipeline loads LoRA adapters (FluxLoraLoaderMixin, Flux2LoraLoaderMixin).
    pipeline_class = getattr(diffusers, family_of(preset).pipeline_class)
    pipe = pipeline_class.from_pretrained(preset.source, revision=spec.revision, dtype=dtype, use_safetensors=True,
                                          **straight_to(device))
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
