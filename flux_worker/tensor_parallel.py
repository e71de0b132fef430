"""Tensor-parallel replicas: one Flux pipeline whose transformer is sharded over N GPUs of one node.

    TensorParallelReplica (a Ray Data callable, one per replica)
      ├─ placement group: N bundles {GPU: 1, CPU: c}, STRICT_PACK, so a group never spans nodes
      └─ N RankWorker actors joined in one torch.distributed group (NCCL on GPUs, gloo on CPU)
            every rank: the transformer's shard (diffusers' `_tp_plan`), the scheduler
            encoder rank: the text encoders (FLUX.1: CLIP + T5; FLUX.2: Mistral), encodes each prompt and
                          broadcasts the family's encodings
            rank 0:       the VAE; decodes and writes the images, returns the result table

All ranks get the same batch and run the single-GPU render steps of flux_worker/renderer.py in
lock-step (`RankRenderer` in flux_worker/tensor_parallel_rank.py, which this module imports only inside
the rank actors, so the driver and the group's own actor stay light). The pool's stage for a group is
built beside the single-GPU one, by pipeline/render_stage.py, with the group's shape chosen by
pipeline/replica_shape.py. Where the text encoders and the VAE live (a GPU, another GPU, or CPU) comes from the
memory planner. Which families have
tensor-parallel replicas, and which classes their ranks load, comes from the model table (families.py).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flux_worker.families import FAMILIES, Family
from flux_worker.memory_plan import MAX_GPUS
from schemas import RenderOptions
from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)

GROUP_READY_SECONDS = float(os.environ.get("FLUXBATCH_TP_READY_SECONDS", "600"))


class TensorParallelError(FluxbatchError, RuntimeError):
    """A tensor-parallel group could not be formed or lost lock-step; the message says what to change."""


def unsupported_family(family: Family) -> str:
    """Why a family has no tensor-parallel replicas (its entry names no `tp_decode`), and what to do instead."""
    able = ", ".join(f.name for f in FAMILIES.values() if f.tp_decode)
    return (f"model family {family.name} ({family.pipeline_class}) renders on one GPU per replica; "
            f"tensor-parallel replicas render {able} only: set gpus_per_replica 1")


def check_divisible(config: Any, degree: int) -> None:
    """Raise if `degree` does not divide the transformer's attention heads (each rank takes whole heads)."""
    heads = config["num_attention_heads"] if isinstance(config, dict) else config.num_attention_heads
    if heads % degree:
        raise TensorParallelError(
            f"gpus_per_replica={degree} does not divide the transformer's {heads} attention heads; "
            f"choose one of {[d for d in range(1, heads + 1) if heads % d == 0 and d <= MAX_GPUS]}"
        )


class RankWorker:
    """One rank of a group, run as a Ray actor holding one GPU of the group's placement group."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    def address(self) -> str:
        """host:port for the group's rendezvous; rank 0 is asked."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return f"{host}:{sock.getsockname()[1]}"

    def start(self, rank: int, world_size: int, address: str, group_gpus: list[str], model: dict[str, Any],
              options: RenderOptions, placement: dict[str, Any]) -> None:
        """Join the process group and load this rank's part of the pipeline."""
        import torch

        from flux_worker.cpu_threads import cpu_threads
        from flux_worker.tensor_parallel_rank import Placement, RankRenderer, init_group

        if options.threads:
            torch.set_num_threads(cpu_threads(options.threads))
        if group_gpus:
            # Ray shows each actor only its own GPU; NCCL's peer-to-peer paths need the whole group's,
            # ordered so that rank i uses cuda:i. Set before anything initialises CUDA in this process.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(group_gpus)
        device = init_group(rank, world_size, address)
        self.renderer = RankRenderer(model, options, rank=rank, world_size=world_size, device=device,
                                     placement=Placement(**placement))

    def render(self, batch: pa.Table) -> pa.Table | None:
        """The batch's result rows on rank 0; None on the other ranks, which render in lock-step and write nothing."""
        return self.renderer(batch)

    def holdings(self) -> dict[str, Any]:
        """What this rank holds, on which device (RankRenderer.holdings)."""
        return self.renderer.holdings()


GROUP_NAME_PREFIX = "fluxbatch-tp-"


def form_group(tp_degree: int, cpus_per_rank: int = 1, resources: dict[str, float] | None = None,
               ) -> tuple[Any, list[Any]]:
    """Reserve N bundles of one GPU on one node (STRICT_PACK) and start a RankWorker in each, in rank order.
    `resources`: more for each bundle (a mixed fleet's pin to one card type, flux_worker/fleet_replica.py)."""
    bundles = [{"GPU": 1, "CPU": cpus_per_rank, **(resources or {})}] * tp_degree
    # Named after the driver's job, so the driver can remove groups a dead pool left (pipeline/run.py).
    name = f"{GROUP_NAME_PREFIX}{ray.get_runtime_context().get_job_id()}-{uuid.uuid4().hex[:8]}"
    group = placement_group(bundles, strategy="STRICT_PACK", name=name)
    try:
        ray.get(group.ready(), timeout=GROUP_READY_SECONDS)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise TensorParallelError(
            f"no node could hold a tensor-parallel group of {tp_degree} GPUs and {tp_degree * cpus_per_rank} "
            f"CPUs within {GROUP_READY_SECONDS:.0f}s; a group never spans nodes, so use nodes with at least "
            f"{tp_degree} free GPUs or lower gpus_per_replica"
        ) from None
    actor = ray.remote(RankWorker)
    workers = [
        actor.options(
            num_gpus=1, num_cpus=cpus_per_rank, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote()
        for i in range(tp_degree)
    ]
    gpus = ray.get([w.gpu_ids.remote() for w in workers])
    # Rank i takes the i-th lowest GPU id, so rank i is cuda:i once each sees the group's GPUs.
    order = sorted(range(tp_degree), key=lambda i: _gpu_sort_key(gpus[i]))
    return group, [workers[i] for i in order]


class TensorParallelReplica:
    """A Ray Data callable class: one member of the actor pool, driving a group of `tp_degree` rank actors."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, tp_degree: int,
                 placement: dict[str, Any] | None = None, cpus_per_rank: int = 1,
                 resources: dict[str, float] | None = None):
        if tp_degree < 2:
            raise TensorParallelError(f"a tensor-parallel replica needs 2 or more GPUs, got {tp_degree}")
        self.tp_degree = tp_degree
        self.group, self.ranks = form_group(tp_degree, cpus_per_rank, resources)
        group_gpus = sorted((g for ids in ray.get([r.gpu_ids.remote() for r in self.ranks]) for g in ids),
                            key=_gpu_sort_key)
        address = ray.get(self.ranks[0].address.remote())
        place = dict(placement or {})
        ray.get([worker.start.remote(rank, tp_degree, address, group_gpus, model, options, place)
                 for rank, worker in enumerate(self.ranks)])
        log.info("tensor-parallel group of %d: %s", tp_degree, "; ".join(
            f"rank {rank}: {held}" for rank, held in enumerate(self.holdings())))

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Same batch to every rank; they run in lock-step and rank 0 returns the written rows.
        return ray.get([worker.render.remote(batch) for worker in self.ranks])[0]

    def holdings(self) -> list[dict[str, Any]]:
        """What each rank holds, in rank order: where the plan's placement put the text encoders and the VAE."""
        return ray.get([worker.holdings.remote() for worker in self.ranks])


def _gpu_sort_key(gpu: Any) -> tuple:
    text = str(gpu[0] if isinstance(gpu, list) and gpu else gpu)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)
