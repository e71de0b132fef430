"""One model over a mixed fleet: a replica shape per card type, from the memory planner (flux_worker/memory_plan.py).

A cluster of H100s and L4s needs TP-1 replicas on the one and TP-2 groups on the other; one degree for the whole
job idles three quarters of the big cards or cannot load on the small ones. For each card type present (Ray's
`accelerator_type:<T>` resources, or a fleet the user describes) this plans the tensor-parallel degree, the
replicas its nodes hold, the batch size and an estimate of its images per second. A type whose cards cannot hold
the model at any degree (up to the GPUs of one of its nodes) is left out with one line.

Card memory comes from `CARDS` (the marketed size, in decimal GB, as `torch.cuda` reports it within a few
percent) unless the user gives it (`--gpu-memory L4=24GB`, `FLUXBATCH_GPU_MEMORY=A100=80GB`). The speed estimate
counts the transformer's FLOPs per image (2 x parameters x tokens per step, plus attention) at `MFU` of the card's
dense bf16 peak, spread over the group's GPUs: a figure to compare pools with, not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flux_worker.memory_plan import GIB, PlanError, image_tokens, model_configs, parse_size, plan_memory

UNTYPED = "GPU"  # the card type of GPUs on a node with no (or several) accelerator_type resources
MFU = 0.45  # share of the dense bf16 peak a Flux transformer step reaches (published H100 bf16 runs: 0.4-0.5)


@dataclass(frozen=True)
class Card:
    memory: int | None  # bytes; None: Ray's name covers several sizes (A100, V100), the user must say
    tflops: float | None  # dense bf16 (fp16 where the card has no bf16) peak, TFLOP/s


# Ray's accelerator type names (ray.util.accelerators) -> the card. Sizes as marketed, decimal.
CARDS: dict[str, Card] = {
    "B200": Card(180 * 10**9, 2250), "H200": Card(141 * 10**9, 989), "H100": Card(80 * 10**9, 989),
    "H20": Card(96 * 10**9, 148), "A100-80G": Card(80 * 10**9, 312), "A100-40G": Card(40 * 10**9, 312),
    "A100": Card(None, 312), "L40S": Card(48 * 10**9, 362), "L4": Card(24 * 10**9, 121),
    "A10G": Card(24 * 10**9, 70), "RTX-PRO-6000": Card(96 * 10**9, None), "V100": Card(None, 125),
    "T4": Card(16 * 10**9, 65), "P4": Card(8 * 10**9, None),
}


@dataclass(frozen=True)
class FleetType:
    """The cards of one type in the cluster (or described): how many, and the most on one node."""

    name: str
    gpus: int
    per_node: list[int]  # GPUs of this type on each node that has them


@dataclass
class PoolPlan:
    """The plan for one card type: its pool's shape, or why it is left out (`degree` None)."""

    card_type: str
    gpus: int
    memory: int | None
    degree: int | None
    replicas: int
    batch_size: int
    seconds_per_image: float | None
    note: str = ""
    share: float | None = None  # a fraction of a card per replica (degree 1), as the user asked

    @property
    def gpus_per_replica(self) -> float:
        return self.share or float(self.degree or 0)

    @property
    def images_per_second(self) -> float | None:
        if not self.seconds_per_image or not self.replicas:
            return None
        return self.replicas / self.seconds_per_image


def fleet_types(nodes: list[dict[str, Any]]) -> dict[str, FleetType]:
    """The card types of Ray's alive nodes (`ray.nodes()` entries): a node's GPUs are of the type of its
    `accelerator_type:<T>` resource; GPUs of a node without one are of type "GPU" (Ray could not tell)."""
    found: dict[str, list[int]] = {}
    for node in nodes:
        resources = node.get("Resources", {})
        gpus = int(resources.get("GPU", 0))
        if not node.get("Alive", True) or not gpus:
            continue
        kinds = [name.split(":", 1)[1] for name in resources if name.startswith("accelerator_type:")]
        found.setdefault(kinds[0] if len(kinds) == 1 else UNTYPED, []).append(gpus)
    return {name: FleetType(name, sum(per), sorted(per, reverse=True)) for name, per in sorted(found.items())}


def described_fleet(text: str) -> dict[str, FleetType]:
    """`H100:16,L4:32/4` as a fleet: TYPE:GPUS[/PER_NODE] (8 per node unless said)."""
    fleet = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, count = part.partition(":")
        total, _, per = count.partition("/")
        try:
            gpus, per_node = int(total), int(per or 8)
        except ValueError:
            raise PlanError(f"--cards {part!r}: write TYPE:GPUS or TYPE:GPUS/PER_NODE, e.g. L4:32/4") from None
        if gpus < 1 or per_node < 1:
            raise PlanError(f"--cards {part!r}: GPUS and PER_NODE are whole numbers of at least 1")
        fleet[name] = FleetType(name, gpus, [per_node] * (gpus // per_node) + ([gpus % per_node] if gpus % per_node
                                                                               else []))
    return fleet


def memory_table(text: str | None) -> dict[str, int]:
    """`L4=24GB,A100=80GB` -> bytes per type; a bare size (`24GiB`) stands for every type (key "*")."""
    table: dict[str, int] = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, sep, size = part.rpartition("=")
        table[name if sep else "*"] = parse_size(size)
    return table


def transformer_flops(configs: dict[str, dict[str, Any]], text_tokens: int, width: int, height: int) -> float:
    """FLOPs of one transformer step for one image: 2 per weight per token, plus attention's two matmuls."""
    from flux_worker.memory_plan import count_component

    config = configs["transformer"]
    tokens = image_tokens(configs["vae"], width, height) + text_tokens
    params = count_component("transformer", config).params
    layers = config.get("num_layers", 0) + config.get("num_single_layers", 0)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return 2 * params * tokens + 4 * layers * tokens * tokens * hidden


def plan_fleet(model: str, fleet: dict[str, FleetType], *, memory: dict[str, int] | None = None,
               degrees: dict[str, float | str] | None = None, dtype: str = "bf16", width: int = 1024,
               height: int | None = None, steps: int = 28, batch_size: int = 1,
               scorers: tuple[int, int] = (0, 0)) -> list[PoolPlan]:
    """A PoolPlan per card type of `fleet` that `degrees` names (all of them when `degrees` is None): the degree
    asked (a number) or the planner's (`auto`), the replicas its nodes hold, and the estimated seconds per image."""
    memory, height = memory or {}, height or width
    configs, text_tokens = model_configs(model)
    flops = transformer_flops(configs, text_tokens, width, height) * steps * batch_size
    pools = []
    for name, cards in fleet.items():
        if degrees is not None and name not in degrees:
            continue
        asked = (degrees or {}).get(name, "auto")
        size = memory.get(name) or memory.get("*") or (CARDS[name].memory if name in CARDS else None)
        pool = PoolPlan(name, cards.gpus, size, None, 0, batch_size, None)
        if asked != "auto" and (size is None or float(asked) < 1):
            # The user's number: taken as it is where the planner cannot check it (a fraction of a card, a card
            # of unknown memory), as a plain number for the whole job is.
            share = float(asked)
            pool.degree, pool.share = (1, share) if share < 1 else (int(share), None)
            pool.replicas = (sum(per * int(1 / share + 1e-9) for per in cards.per_node) if share < 1
                             else sum(per // int(share) for per in cards.per_node))
            pool.note = "" if size else "memory not known here: not checked"
            pools.append(pool)
            continue
        if size is None:
            pool.note = (f"the memory of one {name} card is not known here: give it (--gpu-memory {name}=80GB, or "
                         f"FLUXBATCH_GPU_MEMORY={name}=80GB)")
            pools.append(pool)
            continue
        tp = None if asked == "auto" else int(float(asked))
        plan = plan_memory(model, size, dtype=dtype, width=width, height=height, batch_size=batch_size,
                           max_gpus=max(cards.per_node), tp_degree=tp, scorers=scorers)
        if not plan.fits:
            pool.note = f"left out: {plan.note}"
            pools.append(pool)
            continue
        pool.degree = plan.tp_degree
        pool.replicas = sum(per // plan.tp_degree for per in cards.per_node)
        tflops = CARDS[name].tflops if name in CARDS else None
        if tflops:
            pool.seconds_per_image = flops / (tflops * 1e12 * MFU * plan.tp_degree) / batch_size
        pools.append(pool)
    return pools


def fleet_table(pools: list[PoolPlan]) -> str:
    """The plan as `fluxbatch plan --cards` (or `--ray-address`) prints it."""
    lines = ["| card type | GPUs | memory | GPUs per replica | replicas | batch | s/image (est.) | images/s (est.) | "
             "note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pool in pools:
        memory = f"{pool.memory / GIB:.1f} GiB" if pool.memory else "?"
        seconds = f"{pool.seconds_per_image:.2f}" if pool.seconds_per_image else "-"
        rate = f"{pool.images_per_second:.2f}" if pool.images_per_second else "-"
        degree = pool.degree if pool.degree else "does not fit" if pool.memory else "?"
        lines.append(f"| {pool.card_type} | {pool.gpus} | {memory} | {degree} | {pool.replicas} | {pool.batch_size} "
                     f"| {seconds} | {rate} | {pool.note} |")
    total = sum(p.images_per_second or 0 for p in pools)
    if total:
        lines.append(f"\nall pools together: {total:.2f} images/s (estimated)")
    return "\n".join(lines)
