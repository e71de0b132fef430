"""GPU fast path: the full Flux.1-dev and Flux.1-schnell architectures with random weights, per option.

    python benchmarks/bench_gpu.py                          # on a GPU: dev 28 steps, schnell 4, batch 1 and 4
    python benchmarks/bench_gpu.py --device cpu --size tiny --side 64 --steps 1 --batches 1   # smoke test

Speed does not depend on the weights, so no download is needed. For each option of the model spec's
fast path it prints seconds per image, images per hour, peak GPU memory, and the fraction of the GPU's
dense bf16 peak the transformer reached, from its FLOP count (`transformer_flops`, written out in
benchmarks/README.md: about 74.4 TFLOP per step at 1024x1024 with 512 text tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_worker.fast_path import FastPathError, apply_fast_path  # noqa: E402
from schemas import ModelSpec  # noqa: E402

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; sparse figures are twice these).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0}
# name -> model-spec fast-path fields; each row of the table is one of these.
OPTIONS = {
    "eager": {},
    "fuse_qkv": {"fuse_qkv": True},
    "compile": {"compile": True},
    "compile+fuse_qkv": {"compile": True, "fuse_qkv": True},
    "fp8+compile": {"quantize": "fp8", "compile": True},
    "first-block": {"cache": "first-block"},
    "fp8+compile+first-block": {"quantize": "fp8", "compile": True, "cache": "first-block"},
}


@dataclass(frozen=True)
class FluxConfig:
    """The transformer dimensions that decide its FLOPs (Flux.1-dev and -schnell share them)."""

    hidden: int = 3072  # 24 heads x 128
    double_blocks: int = 19
    single_blocks: int = 38
    mlp_ratio: int = 4
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    text_width: int = 4096  # T5-XXL
    pooled_width: int = 768  # CLIP-L


FLUX1 = FluxConfig()


def transformer_flops(config: FluxConfig = FLUX1, image_tokens: int = 4096, text_tokens: int = 512) -> dict[str, float]:
    """FLOPs of one transformer pass (one denoising step, one image): 2 per multiply-add.

    Per token, a double-stream block runs QKV (3d^2), the attention output (d^2) and the MLP (2*4d^2) in each
    stream; a single-stream block runs QKV + MLP-in fused (3d^2 + 4d^2) and the output over both (5d^2).
    Both attend jointly over image + text tokens: QK^T and AV are 2 * 2 * L^2 * d each block.
    """
    d, tokens = config.hidden, image_tokens + text_tokens
    per_token_block = (3 + 1 + 2 * config.mlp_ratio) * d * d  # 12 d^2, the same for both block kinds
    blocks = config.double_blocks + config.single_blocks
    linear = 2 * blocks * per_token_block * tokens
    attention = 2 * blocks * 2 * tokens * tokens * d
    # Embedders and the final layer: image and text projections per token; modulation is per image.
    embed = 2 * (image_tokens * config.in_channels * d + text_tokens * config.text_width * d + image_tokens * d
                 * config.in_channels)
    modulation = 2 * d * (config.double_blocks * 2 * 6 * d + config.single_blocks * 3 * d + 2 * d)
    return {"linear": linear + embed + modulation, "attention": attention,
            "total": linear + embed + modulation + attention}


def build_transformer(device: str, guidance: bool):
    """A fresh Flux.1 transformer with random weights (each fast-path option changes the one it is given)."""
    from flux_worker.model_build import full_transformer

    return full_transformer(device, guidance)


def build_full(device: str, guidance: bool):
    """The full Flux.1 pipeline with random weights, built directly on `device` in bf16 (the same builder as
    `fluxbatch model build --size full`)."""
    from flux_worker.model_build import full_pipeline

    return full_pipeline(device, guidance)


def build_tiny(device: str):
    """The tiny offline model, for a smoke test of this script on CPU."""
    from flux_worker.model_build import build_pipeline

    pipe = build_pipeline("tiny").to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe, side: int, steps: int, batch: int, guidance: float, seq: int, repeats: int, warmups: int,
            device: str) -> tuple[float, float]:
    """Seconds per image (after the warm-up calls) and peak GPU memory in GiB (0 on CPU)."""
    prompt = ["a lighthouse on a cliff at dusk, volumetric light, 35mm photograph"] * batch

    def once() -> None:
        with torch.inference_mode():
            pipe(prompt=prompt, width=side, height=side, num_inference_steps=steps, guidance_scale=guidance,
                 max_sequence_length=seq, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

    for _ in range(warmups):  # compilation, autotuning, allocator
        once()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / (repeats * batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return seconds, peak


def gpu_peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def plan_rows(args: argparse.Namespace) -> list[tuple[str, str, list[int]]]:
    """(model, option, batches) in the order they run: `--rows model:option:batch,...` or the full grid."""
    if not args.rows:
        return [(model, option, args.batches) for model in args.models for option in args.options]
    plan = []
    for row in args.rows:
        model, option, batches = row.split(":")
        if model not in ("dev", "schnell") or option not in OPTIONS:
            raise SystemExit(f"--rows {row!r}: want dev|schnell:OPTION:BATCH[,BATCH], "
                             f"OPTION one of {', '.join(OPTIONS)}")
        plan.append((model, option, [int(batch) for batch in batches.split(",")]))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--models", nargs="+", choices=["dev", "schnell"], default=["dev", "schnell"])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--steps", type=int, help="default: 28 for dev, 4 for schnell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--rows", nargs="+", metavar="MODEL:OPTION:BATCHES",
                        help="run just these, in this order (e.g. dev:eager:1,4), instead of models x options")
    parser.add_argument("--repeats", type=int, default=3, help="timed pipeline calls per row")
    parser.add_argument("--warmups", type=int, default=2, help="untimed calls before them (compilation, autotuning)")
    parser.add_argument("--deadline", type=float, help="start no new row after this many seconds")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    image_tokens = (args.side // 16) ** 2
    flops = transformer_flops(image_tokens=image_tokens, text_tokens=512)
    peak = gpu_peak_tflops(args.device, args.peak_tflops)
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    print(f"bench_gpu on {where}; torch {torch.__version__}; transformer {flops['total'] / 1e12:.1f} TFLOP per step "
          f"at {args.side}x{args.side} ({flops['linear'] / 1e12:.1f} linear, {flops['attention'] / 1e12:.1f} "
          f"attention){'' if args.size == 'full' else ' for the full model; this run uses the tiny one'}")
    print("| model | steps | batch | option | s/image | images/hour | peak GiB | % bf16 peak | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    pipe, loaded = None, None
    for name, option, batches in plan_rows(args):
        steps = args.steps or (28 if name == "dev" else 4)
        guidance, seq = (3.5, 512) if name == "dev" else (0.0, 256)
        seq = seq if args.size == "full" else 32
        torch._dynamo.reset()
        if args.size == "tiny":
            pipe = build_tiny(args.device)
        elif loaded == name:  # one pipeline per model; each option gets a fresh transformer to change
            pipe.transformer = None
            free(args.device)
            pipe.transformer = build_transformer(args.device, guidance=name == "dev")
        else:
            pipe = None
            free(args.device)
            pipe, loaded = build_full(args.device, guidance=name == "dev"), name
        try:
            apply_fast_path(pipe, ModelSpec(**OPTIONS[option]), args.device)
        except FastPathError as error:
            print(f"| {name} | {steps} | - | {option} | refused: {error} | | | | |", flush=True)
            continue
        for batch in batches:
            if args.deadline and time.perf_counter() - began > args.deadline:
                print(f"| {name} | {steps} | {batch} | {option} | not run: past --deadline | | | | |")
                continue
            started = time.perf_counter()
            try:
                seconds, memory = measure(pipe, args.side, steps, batch, guidance, seq, args.repeats, args.warmups,
                                          args.device)
            except Exception as error:  # a benchmark row that breaks is a finding; record it and go on
                print(f"| {name} | {steps} | {batch} | {option} | failed: {type(error).__name__}: "
                      f"{str(error)[:300]} | | | | |", flush=True)
                continue
            warm_up = time.perf_counter() - started - seconds * batch * args.repeats
            # The schnell run attends over 256 text tokens, dev over 512.
            step_flops = transformer_flops(image_tokens=image_tokens, text_tokens=seq)["total"]
            fraction = f"{100 * step_flops * steps / seconds / (peak * 1e12):.0f}%" if peak else "-"
            print(f"| {name} | {steps} | {batch} | {option} | {seconds:.3f} | {3600 / seconds:.0f} | "
                  f"{memory:.1f} | {fraction} | {warm_up:.0f} |", flush=True)
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
