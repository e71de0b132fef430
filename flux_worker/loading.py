"""Load a Flux pipeline from a preset, hub id or local folder: safetensors only, adapters by name."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline

from flux_worker.fast_path import apply_fast_path
from flux_worker.presets import ModelPreset, resolve_preset
from schemas import ModelSpec
from schemas.errors import FluxbatchError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UnsafeWeightsError(FluxbatchError, ValueError):
    """Weights in a pickle-based format, which can run code when loaded; fluxbatch refuses them."""


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means bf16 on GPUs and fp32 on CPU (CPU bf16 kernels are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def refuse_pickle(path: str | Path) -> None:
    """Raise if a local model folder or adapter file holds pickle weights without safetensors beside them."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    safe = {p.parent for p in files if p.suffix == ".safetensors"}
    unsafe = [p for p in pickled if p.parent not in safe]
    if unsafe:
        raise UnsafeWeightsError(
            f"{unsafe[0]} is a pickle-format checkpoint; fluxbatch loads safetensors only. "
            "Convert it (e.g. `safetensors.torch.save_file(torch.load(..., weights_only=True), ...)`)"
        )


def load_pipeline(spec: ModelSpec, device: str = "cpu") -> tuple[FluxPipeline, ModelPreset]:
    """Load the pipeline once per actor, on `device`, with the spec's adapters registered but inactive."""
    preset = resolve_preset(spec.name)
    if Path(preset.source).is_dir():
        refuse_pickle(preset.source)
    dtype = torch_dtype(spec.dtype, device)
    pipe = FluxPipeline.from_pretrained(
        preset.source, revision=spec.revision, dtype=dtype, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    for name, adapter_path in spec.adapters.items():
        load_adapter(pipe, name, adapter_path)
    pipe = pipe.to(device)
    apply_fast_path(pipe, spec, device)
    return pipe, preset


def load_adapter(pipe: FluxPipeline, name: str, path: str) -> None:
    """Register one LoRA adapter from a .safetensors file under `name`."""
    file = Path(path).expanduser()
    if file.suffix != ".safetensors":
        raise UnsafeWeightsError(f"adapter {name!r}: {path} is not a .safetensors file; fluxbatch loads no pickles")
    if not file.is_file():
        raise FileNotFoundError(f"adapter {name!r}: no file at {path}")
    pipe.load_lora_weights(
        str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True
    )
