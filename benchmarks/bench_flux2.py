"""FLUX.2 on one GPU: [klein]-4B seconds per image (bf16, eager and compiled) and [dev]'s peak memory against the
memory planner's prediction. Random weights at the published configs (flux_worker/families.py, the configs the
planner counts), so no download is needed; speed and memory do not depend on the weights.

    python benchmarks/bench_flux2.py klein                # klein-4B, 1024x1024, 4 steps: eager, then compile
    python benchmarks/bench_flux2.py dev-memory           # FLUX.2-dev on this card: peak vs `fluxbatch plan`
    python benchmarks/bench_flux2.py klein --device cpu --size tiny --side 64      # smoke test of the script
    python benchmarks/bench_flux2.py dev-memory --device cpu --size tiny --side 64

`dev-memory` places the text encoder where the planner places it for this card's memory: on the GPU (e.g. a
141 GB H200, where Mistral's 44.7 GiB fit beside the 60 GiB transformer) or on the host, in which case the
encoder is not built at all and random embeddings of its output's shape stand in for it (only the GPU's peak
is measured, and an offloaded encoder adds nothing to it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_worker.families import FAMILIES  # noqa: E402
from flux_worker.fast_path import compile_blocks  # noqa: E402
from flux_worker.memory_plan import GIB, _build, plan_memory  # noqa: E402
from flux_worker.model_build import (  # noqa: E402
    MISTRAL_TEMPLATE,
    QWEN3_TEMPLATE,
    _byte_tokenizer,
    build_flux2,
    build_flux2_klein,
    built_on,
)

PROMPT = "a lighthouse on a cliff at dusk, volumetric light, 35mm photograph"


def full_pipeline(model: str, device: str, with_encoder: bool = True):
    """The preset's pipeline at its published configs, random weights, built on `device` in bf16; the tokenizer
    is the offline byte tokenizer (one token per character; prompts are padded to the text length anyway)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = next(f for f in FAMILIES.values() if model in f.configs)
    configs = family.configs[model]
    klein = family.name == "flux.2-klein"
    if klein:
        tokenizer = _byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                    QWEN3_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    else:
        tokenizer = _byte_tokenizer(["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                     "[/SYSTEM_PROMPT]"], MISTRAL_TEMPLATE, bos="<s>", eos="</s>", pad="<pad>")
    with built_on(device):
        parts = {name: _build(configs[name]) for name in ("transformer", "vae")}
        text_encoder = _build(configs["text_encoder"]) if with_encoder else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    extra = {"is_distilled": True} if klein else {}
    pipe = getattr(diffusers, family.pipeline_class)(text_encoder=text_encoder, tokenizer=tokenizer,
                                                     scheduler=scheduler, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(model: str, device: str):
    pipe = (build_flux2_klein if "klein" in model else build_flux2)("tiny").to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_image(pipe, side: int, steps: int, guidance: float, text: int, repeats: int, warmups: int,
                      device: str) -> float:
    """Whole pipeline calls (encode, denoise, decode to PIL), after `warmups` untimed ones."""
    def once() -> None:
        with torch.inference_mode():
            pipe(prompt=[PROMPT], width=side, height=side, num_inference_steps=steps, guidance_scale=guidance,
                 max_sequence_length=text, generator=torch.Generator("cpu").manual_seed(0))

    for _ in range(warmups):
        once()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def klein(args: argparse.Namespace) -> None:
    model, preset = "flux.2-klein-4b", FAMILIES["flux.2-klein"].presets[0]
    steps = args.steps or preset.steps
    text = preset.max_sequence_length if args.size == "full" else 64
    print("| model | side | steps | option | s/image | warm-up s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    pipe = full_pipeline(model, args.device) if args.size == "full" else tiny_pipeline(model, args.device)
    for option in ("eager", "compile"):
        if option == "compile":
            torch._dynamo.reset()
            compile_blocks(pipe.transformer)  # what model.compile does in a renderer (flux_worker/fast_path.py)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        seconds = seconds_per_image(pipe, args.side, steps, preset.guidance, text, args.repeats, args.warmups,
                                    args.device)
        warm_up = time.perf_counter() - started - seconds * args.repeats
        peak = torch.cuda.max_memory_allocated() / GIB if args.device.startswith("cuda") else 0.0
        dtype = str(pipe.transformer.dtype).removeprefix("torch.")
        print(f"| {model} ({args.size}) | {args.side} | {steps} | {option} {dtype} | {seconds:.3f} | {warm_up:.0f} | "
              f"{peak:.1f} |", flush=True)


def dev_memory(args: argparse.Namespace) -> None:
    model = "flux.2-dev"
    if args.device.startswith("cuda"):
        card = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    else:
        card = 1024 * GIB  # CPU smoke test: the planner's figures for a card with room for everything
    plan = plan_memory(model, card, width=args.side)
    print(plan.describe())
    if not plan.fits or plan.tp_degree != 1:
        print(f"this card cannot hold {model} on one GPU (the plan needs {plan.tp_degree} per replica); "
              "run the tensor-parallel group instead: fluxbatch render ... --gpus-per-replica "
              f"{plan.tp_degree}")
        return
    on_gpu = plan.where["text_encoder"].startswith("GPU")
    steps = args.steps or 2  # the peak is reached within one step; more steps only take longer
    text = FAMILIES["flux.2"].presets[0].max_sequence_length if args.size == "full" else 64
    if args.size == "full":
        pipe = full_pipeline(model, args.device, with_encoder=on_gpu)
    else:
        pipe = tiny_pipeline(model, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        if on_gpu or args.size != "full":
            embeds, _ = pipe.encode_prompt(prompt=[PROMPT], device=args.device, max_sequence_length=text)
        else:  # the planner offloads the encoder: its output's shape, on the GPU, as the group's encoder rank sends it
            width = pipe.transformer.config.joint_attention_dim
            embeds = torch.randn((1, text, width), dtype=torch.bfloat16, device=args.device)
        pipe(prompt_embeds=embeds, width=args.side, height=args.side, num_inference_steps=steps,
             max_sequence_length=text, generator=torch.Generator("cpu").manual_seed(0))
    synchronize(args.device)
    if not args.device.startswith("cuda"):
        print("CPU smoke test: no GPU peak to compare")
        return
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    predicted = plan.peak_per_gpu[0]
    print("| model | card | text encoder | predicted peak GiB (incl. 1 GiB reserve) | max allocated GiB | "
          "max reserved GiB | predicted / (allocated + reserve) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {model} | {card / GIB:.1f} GiB | {plan.where['text_encoder']} | {predicted / GIB:.1f} | "
          f"{allocated / GIB:.1f} | {reserved / GIB:.1f} | {predicted / (allocated + plan.reserve):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["klein", "dev-memory"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--steps", type=int, help="default: the preset's (4 for klein); 2 for dev-memory")
    parser.add_argument("--repeats", type=int, default=3, help="timed pipeline calls per option")
    parser.add_argument("--warmups", type=int, default=2, help="untimed calls before them (compilation, autotuning)")
    args = parser.parse_args(argv)
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    print(f"bench_flux2 {args.what} on {where}; torch {torch.__version__}", flush=True)
    began = time.perf_counter()
    (klein if args.what == "klein" else dev_memory)(args)
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
