"""`fluxbatch plan`: what the memory planner (flux_worker/memory_plan.py) says about a model on cards of a size.

The planner itself is read by both sides (the driver's `gpus_per_replica: auto`, the renderers' placement); this is
only its command line.
"""

from __future__ import annotations

import argparse
import json
import sys

from flux_worker.memory_plan import KNOWN_MODELS, WEIGHT_BYTES, PlanError, markdown_table, parse_size, plan_memory
from pipeline.cluster.ray_session import RayUnreachableError


def plan_main(argv: list[str]) -> int:
    """`fluxbatch plan`: print the TP degree, placement and predicted peak per GPU; 1 if it cannot fit."""
    parser = plan_parser()
    args = parser.parse_args(argv)
    try:
        if args.cards or args.ray_address:
            return _plan_fleet(args)
        if args.table:
            print(markdown_table(args.model.split(","), [s for s in args.table.split(",") if s], dtype=args.dtype,
                                 resolution=args.resolution, batch_size=args.batch_size,
                                 reserve=parse_size(args.reserve)))
            return 0
        if not args.gpu_memory:
            parser.error("--gpu-memory is required (or give --table SIZES)")
        plan = plan_memory(args.model, parse_size(args.gpu_memory), dtype=args.dtype, width=args.resolution,
                           batch_size=args.batch_size, reserve=parse_size(args.reserve), scorers=_scorers(args))
    except (PlanError, RayUnreachableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": plan.model, "tp_degree": plan.tp_degree, "where": plan.where,
                          "peak_per_gpu": plan.peak_per_gpu, "cpu_bytes": plan.cpu_bytes, "note": plan.note,
                          "offload_seconds": plan.offload_seconds, "scorer_bytes": plan.scorer_bytes}))
    else:
        print(plan.describe())
    return 0 if plan.fits else 1


def _plan_fleet(args: argparse.Namespace) -> int:
    """Per card type (flux_worker/fleet_plan.py): 0 when some type holds the model, 1 when none does."""
    from flux_worker.fleet_plan import described_fleet, fleet_table, fleet_types, memory_table, plan_fleet

    if args.cards:
        fleet = described_fleet(args.cards)
    else:
        import ray

        from pipeline.cluster.ray_session import init_joining

        init_joining(args.ray_address, log_to_driver=False, logging_level="ERROR")  # a typo: one line
        fleet = fleet_types(ray.nodes())
        ray.shutdown()
        if not fleet:
            print(f"error: the Ray cluster at {args.ray_address} has no GPUs", file=sys.stderr)
            return 2
    pools = plan_fleet(args.model, fleet, memory=memory_table(args.gpu_memory), dtype=args.dtype,
                       width=args.resolution, steps=args.steps, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{**vars(pool), "images_per_second": pool.images_per_second} for pool in pools]))
    else:
        print(f"model {args.model}: {args.dtype}, {args.resolution}x{args.resolution}, {args.steps} steps, "
              f"batch {args.batch_size}")
        print(fleet_table(pools))
    return 0 if any(pool.degree for pool in pools) else 1

def _scorers(args: argparse.Namespace) -> tuple[int, int]:
    """The weights and activations of the scorers `--clip` and `--aesthetic` name (flux_worker/scorer_memory.py)."""
    if not args.clip:
        if args.aesthetic:
            raise PlanError("--aesthetic scores CLIP image embeddings: name the CLIP model too (--clip)")
        return 0, 0
    from flux_worker.scorer_memory import scorer_bytes
    from schemas.quality import QualitySpec

    try:
        return scorer_bytes(QualitySpec(clip=args.clip, aesthetic=args.aesthetic))
    except (OSError, ValueError) as error:
        raise PlanError(f"--clip {args.clip}: cannot count its weights: {error}") from None


def plan_parser() -> argparse.ArgumentParser:
    """`fluxbatch plan`'s own flags (tests/test_docs.py parses the docs' `plan` lines with it)."""
    parser = argparse.ArgumentParser(prog="fluxbatch plan", description=plan_main.__doc__)
    parser.add_argument("--model", default="flux.1-dev", help="a known model (" + ", ".join(KNOWN_MODELS)
                        + ") or a local diffusers folder")
    parser.add_argument("--gpu-memory", help="memory of one card: 24GiB, 80GB, ... (required without --table)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(WEIGHT_BYTES))
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="images per transformer call")
    parser.add_argument("--reserve", default="1GiB", help="per-GPU allowance for CUDA context and workspaces")
    parser.add_argument("--clip", metavar="MODEL", help="count a CLIP scorer on GPU 0 too (a preset such as "
                        "clip-vit-large-patch14, or a folder)")
    parser.add_argument("--aesthetic", metavar="PATH", help="and the aesthetic predictor at PATH")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--table", metavar="SIZES", help="a Markdown table over card sizes, e.g. 8GB,24GB,80GB; "
                        "--model may then list several models, comma-separated")
    fleet = parser.add_mutually_exclusive_group()
    fleet.add_argument("--cards", metavar="FLEET", help="plan per card type for a fleet described as "
                       "TYPE:GPUS[/PER_NODE],... (Ray's type names: H100:16,L4:32/4); --gpu-memory may then give "
                       "TYPE=SIZE,... for types whose memory is not known")
    fleet.add_argument("--ray-address", metavar="ADDRESS", help="plan per card type for the live Ray cluster at "
                       "ADDRESS (auto: the one on this machine)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps per image, for the speed estimate")
    return parser
