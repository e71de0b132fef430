"""The shape of one replica, decided in the driver from the job and the cluster: how many GPUs (`auto` asks the
memory planner about the cluster's cards), the CPUs of each rank, and a tensor-parallel group's own arguments.

The group itself (its placement group and rank actors) is flux_worker/tensor_parallel.py, which runs in the pool's
actors; this module runs before any of them starts, so a job the groups cannot serve is refused in one line.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from flux_worker.families import family_of
from flux_worker.fleet_plan import UNTYPED, PoolPlan, fleet_types, memory_table, plan_fleet
from flux_worker.memory_plan import PlanError, model_configs, placement_of, plan_memory
from flux_worker.presets import resolve_preset
from flux_worker.scorer_memory import scorer_bytes
from flux_worker.tensor_parallel import TensorParallelError, check_divisible, unsupported_family
from schemas import JobSpec

log = logging.getLogger(__name__)


def check_family(job: JobSpec) -> None:
    """Refuse a tensor-parallel replica of a family that has none, before anything is written or started."""
    family = family_of(resolve_preset(job.model.name, job.storage_options))
    if family.tp_decode is None:
        raise TensorParallelError(f"gpus_per_replica {job.gpus_per_replica}: {unsupported_family(family)}")



def gpu_memory() -> int | None:
    """Memory of one of the cluster's GPUs: FLUXBATCH_GPU_MEMORY if set (a size, or `TYPE=SIZE,...` of which this
    cluster's one card type is taken), else asked of a GPU worker."""
    if os.environ.get("FLUXBATCH_GPU_MEMORY"):
        table = memory_table(os.environ["FLUXBATCH_GPU_MEMORY"])
        if "*" in table:
            return table["*"]
        types = list(fleet_types(ray.nodes()))
        if len(types) == 1 and types[0] in table:
            return table[types[0]]
    if not any(name.startswith("accelerator_type:") for name in ray.cluster_resources()):
        return None  # Ray detected no real GPU model (e.g. GPUs declared by hand): nothing to ask

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> int | None:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None

    try:
        return ray.get(probe.remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        return None


def planner_dtype(job: JobSpec) -> str:
    """The weights' dtype the memory planner counts for `job`: fp8 when quantized, bf16 for `auto` (GPUs)."""
    return "fp8" if job.model.quantize == "fp8" else "bf16" if job.model.dtype == "auto" else job.model.dtype


def memory_plan_for(job: JobSpec, degree: int | None, memory: int | None = None):
    """The memory plan for `job` on this cluster's cards (or cards of `memory` bytes), or None when the cards' memory
    is unknown."""
    preset = resolve_preset(job.model.name, job.storage_options)
    model = job.model.name  # the planner looks it up in the model table: a preset, its hub id, or a folder
    memory = memory or gpu_memory()
    if memory is None:
        return None
    return plan_memory(model, memory, dtype=planner_dtype(job), width=job.defaults.width or preset.width,
                       height=job.defaults.height or preset.height,
                       batch_size=1 if job.batch_invariant else job.batch_size, tp_degree=degree,
                       scorers=scorer_bytes(job.quality, job.storage_options))


def resolve_gpus_per_replica(job: JobSpec) -> float:
    """The job's GPUs per replica; `auto` asks the memory planner about the cluster's cards (0 without GPUs)."""
    if isinstance(job.gpus_per_replica, dict):
        return job.most_gpus_per_replica()  # the fleet's pools decide (fleet_pools); the largest, for checks
    if job.gpus_per_replica != "auto":
        if float(job.gpus_per_replica) > 1:
            check_family(job)
        return float(job.gpus_per_replica)
    if not ray.cluster_resources().get("GPU"):
        return 0.0
    try:
        plan = memory_plan_for(job, None)
    except PlanError as error:
        raise TensorParallelError(f"gpus_per_replica auto: {error}; give a number instead") from None
    if plan is None:
        raise TensorParallelError(
            "gpus_per_replica auto: could not read the GPUs' memory (no CUDA on the GPU workers); "
            "set FLUXBATCH_GPU_MEMORY=24GiB or give a number")
    if not plan.fits:
        raise TensorParallelError(f"gpus_per_replica auto: {plan.note}")
    log.info("memory planner: %d GPU(s) per replica\n%s", plan.tp_degree, plan.describe())
    return float(plan.tp_degree)


def fleet_pools(job: JobSpec, say: Any = log.warning, can_grow: bool = False) -> list[PoolPlan] | None:
    """The pools of a mixed fleet (flux_worker/fleet_plan.py), one per card type that holds the model; None when the
    job has one shape (a number, or `auto` on a cluster of one card type: `resolve_gpus_per_replica`).

    Card types come from Ray's `accelerator_type:<T>` resources of the alive nodes; a card's memory from the
    planner's table or FLUXBATCH_GPU_MEMORY (`L4=24GB,A100=80GB`). Each type left out is one line (`say`); none
    left is an error, before anything is written. On a cluster that `can_grow`, a type the mapping names that no
    node has yet joins the run when its nodes join the cluster (pipeline/fleet_stage.py)."""
    mapping = job.gpus_per_replica if isinstance(job.gpus_per_replica, dict) else None
    if mapping is None and job.gpus_per_replica != "auto":
        return None
    fleet = fleet_types(ray.nodes())
    if mapping is None and len(fleet) < 2:
        return None
    preset = resolve_preset(job.model.name, job.storage_options)
    try:
        pools = plan_fleet(job.model.name, fleet, memory=memory_table(os.environ.get("FLUXBATCH_GPU_MEMORY")),
                           degrees=mapping, dtype=planner_dtype(job), width=job.defaults.width or preset.width,
                           height=job.defaults.height or preset.height, steps=job.defaults.steps or preset.steps,
                           batch_size=1 if job.batch_invariant else job.batch_size,
                           scorers=scorer_bytes(job.quality, job.storage_options))
    except PlanError as error:
        raise TensorParallelError(f"gpus_per_replica: {error}") from None
    for name in sorted(set(mapping or {}) - set(fleet)):
        say(f"gpus_per_replica: card type {name}: no node of the cluster has one ({', '.join(fleet) or 'no GPUs'}); "
            + ("it joins the run if one joins the cluster" if can_grow else "left out"))
    for pool in pools:
        if pool.card_type == UNTYPED:
            say(f"gpus_per_replica: {pool.gpus} GPU(s) of nodes without one accelerator_type resource are left out: "
                "a pool is pinned to its card type")
            pool.degree = None
        elif not pool.degree:
            say(f"gpus_per_replica: card type {pool.card_type}: {pool.note}")
        elif not pool.replicas:
            say(f"gpus_per_replica: card type {pool.card_type}: no node has {pool.degree} of its GPUs; left out")
    usable = [pool for pool in pools if pool.degree and pool.replicas]
    if not usable:
        raise TensorParallelError(f"gpus_per_replica {_typed(job.gpus_per_replica)}: no card type of the cluster "
                                  f"({', '.join(fleet) or 'no GPUs'}) can hold a replica; see `fluxbatch plan "
                                  "--ray-address auto`")
    if any(pool.degree > 1 for pool in usable):
        check_family(job)
    return usable


def joined_pools(job: JobSpec, known: set[str]) -> list[PoolPlan]:
    """The pools of card types that are not in `known` (the pools running, and the types already looked at): card
    types whose nodes joined the cluster after the run planned its pools (an autoscaled node group). `known`
    gains every type looked at, so a type left out is planned once, not at every look."""
    fresh = set(fleet_types(ray.nodes())) - known
    if not fresh:
        return []
    try:
        pools = fleet_pools(job, say=lambda line: log.info("a joined card type: %s", line)) or []
    except TensorParallelError:
        pools = []
    known |= fresh
    return [pool for pool in pools if pool.card_type in fresh]


def _typed(value: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def cpus_per_rank(job: JobSpec, degree: int) -> int:
    """CPU cores each rank actor of a TP-`degree` group reserves: the replica's cores shared out, at least 1."""
    return max(1, (job.cpus_per_replica or degree) // degree)


def group_options(job: JobSpec, degree: int, memory: int | None = None) -> dict[str, Any]:
    """`TensorParallelReplica`'s own constructor arguments for a TP-`degree` group of `job` on the cluster's cards
    (or cards of `memory` bytes: one pool of a mixed fleet); the model and the `RenderOptions` it shares with
    `Renderer` come from pipeline/render_stage.py."""
    placement: dict[str, Any] = {"encoder_rank": degree - 1}
    try:
        configs, _ = model_configs(job.model.name)
        check_divisible(configs["transformer"], degree)  # fail here, not in N actors
        plan = memory_plan_for(job, degree, memory)
    except PlanError:
        plan = None  # a hub id the planner has no configs for: the default placement
    if plan is not None and plan.fits:
        placement = placement_of(plan)
    return {"tp_degree": degree, "placement": placement, "cpus_per_rank": cpus_per_rank(job, degree)}
