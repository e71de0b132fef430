"""The GPU fast path: the model-spec options that make a loaded pipeline render faster.

Each option trades something (warm-up time, last-bit equality, a little quality) for speed; their
measured effect and quality notes are in benchmarks/README.md. They are applied once per actor, after
the pipeline is on its device, in an order that keeps them composable: fuse Q/K/V first (so fp8 sees
the fused linear), then quantize, then the block cache (hooks on the blocks), then compile (which
traces the blocks as they finally are).
"""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline

from schemas import ModelSpec
from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)

# torchao's float8 kernels need hardware fp8 matmuls: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_CAPABILITY = (8, 9)


class FastPathError(FluxbatchError, ValueError):
    """A fast-path option cannot run here (wrong device, missing package); the message says what to change."""


def apply_fast_path(pipe: FluxPipeline, spec: ModelSpec, device: str) -> list[str]:
    """Apply the spec's speed options to a loaded pipeline, in place; returns the names of those applied."""
    applied: list[str] = []
    if spec.fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
        applied.append("fuse_qkv")
    if spec.quantize == "fp8":
        quantize_fp8(pipe.transformer, device)
        applied.append("fp8")
    if spec.cache == "first-block":
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=spec.cache_threshold))
        applied.append("first-block-cache")
    if spec.compile:
        compile_blocks(pipe.transformer)
        applied.append("compile")
    if applied:
        log.info("fast path on %s: %s", device, ", ".join(applied))
    return applied


def fp8_supported(device: str) -> bool:
    """Whether `device` has hardware fp8 matmuls (compute capability 8.9 or newer)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= FP8_MIN_CAPABILITY


def quantize_fp8(transformer: torch.nn.Module, device: str) -> None:
    """Swap the transformer's linear weights for float8 with per-row scales; activations are quantized per call."""
    if not fp8_supported(device):
        raise FastPathError(
            f"model.quantize='fp8' needs a GPU with fp8 matmuls (compute capability 8.9+: L4, L40S, H100, H200); "
            f"this replica renders on {device}. Drop model.quantize or give the job GPUs that have fp8"
        )
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as error:
        raise FastPathError(
            "model.quantize='fp8' needs torchao: `pip install fluxbatch[gpu]` (torchao 0.18 for torch 2.13)"
        ) from error
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_layer)


def _fp8_layer(module: torch.nn.Module, name: str) -> bool:
    # fp8 matmuls want both dimensions in multiples of 16; the few small embedding layers stay as they are.
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Regional compilation: compile each repeated transformer block once (all blocks share the code), so
    warm-up takes seconds per block type instead of minutes for the whole network."""
    # Blocks of one type differ only in weights; one graph per type is reused by all of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
