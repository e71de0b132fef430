"""A pool over a mixed fleet: one Ray Data actor pool whose members each drive a replica on one card type.

Ray Data runs one actor shape per map stage. A mixed fleet needs several (TP-1 on 80 GB cards, TP-2 groups on
24 GB ones), all drawing from one stream of batches so that a faster pool takes more and the pools finish
together. So the stage's members hold nothing themselves, as a tensor-parallel member already does: each takes a
slot (a card type and its replica shape) from `PoolSlots` when it starts, and builds its replica pinned to that
type's nodes (Ray's `accelerator_type:<T>` resource). Ray Data hands each batch to whichever member is free: no
static split. A member whose replica dies exits too, so Ray restarts it (same actor, same slot: a new replica of
the same type) and re-runs its batch, as a single-type pool does; exactly-once stays with the driver's ledger.

    FleetReplica (pool member, ~0 CPU)
      ├─ one GPU or a fraction: a PoolRenderer actor (the Renderer) with that type's resource
      └─ a tensor-parallel degree: a TensorParallelReplica whose group's bundles ask for that type
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa
import ray

from schemas import RenderOptions

log = logging.getLogger(__name__)

POOL_COLUMN = "pool"  # added to each result table: the card type that rendered it (the driver strips it)
INNER_PREFIX = "PoolRenderer"  # the class name of each member's replica actor; owned by the member, it dies with it
TYPE_SHARE = 0.001  # how much of a node's `accelerator_type:<T>` resource a replica asks for: a pin, not a count


@ray.remote(num_cpus=0)
class PoolSlots:
    """The pools' replica slots, handed out once each: a restarted member (same actor id) gets its slot back."""

    def __init__(self, slots: list[dict[str, Any]]):
        self.free = list(slots)
        self.held: dict[str, dict[str, Any]] = {}

    def take(self, member: str) -> dict[str, Any]:
        if member not in self.held:
            if not self.free:
                raise RuntimeError("more pool members than slots")
            self.held[member] = self.free.pop(0)
        return self.held[member]


def pin(card_type: str) -> dict[str, float]:
    return {f"accelerator_type:{card_type}": TYPE_SHARE}


class FleetReplica:
    """A Ray Data callable class: one member of a mixed fleet's pool, driving one replica on its slot's card type."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, slots: Any, renderer: Any = None):
        slot = ray.get(slots.take.remote(ray.get_runtime_context().get_actor_id()))
        self.card_type = slot["card_type"]
        self.group = None
        if slot["degree"] > 1 and renderer is None:
            from flux_worker.tensor_parallel import TensorParallelReplica

            self.group = TensorParallelReplica(model, options, tp_degree=slot["degree"], placement=slot["placement"],
                                               cpus_per_rank=slot["cpus_per_rank"], resources=pin(self.card_type))
            return
        if renderer is None:
            from flux_worker.renderer import Renderer as renderer
        inner = ray.remote(type(INNER_PREFIX, (renderer,), {"__module__": renderer.__module__}))
        self.replica = inner.options(num_gpus=slot["gpus"], num_cpus=slot["cpus"], resources=pin(self.card_type),
                                     max_restarts=0).remote(model, options)
        ray.get(self.replica.__ray_ready__.remote())
        log.info("pool member on %s: %g GPU(s)", self.card_type, slot["gpus"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.group is not None:
            table = self.group(batch)
        else:
            try:
                table = ray.get(self.replica.__call__.remote(batch))
            except ray.exceptions.RayActorError:
                # Its replica's process died (an OOM kill, a lost node): this member goes too, so Ray restarts it
                # on its slot and re-runs the batch, as it does for a member of a single-type pool.
                log.error("the %s replica of this pool member died; restarting the member", self.card_type)
                os._exit(1)
        return table.append_column(POOL_COLUMN, pa.array([self.card_type] * table.num_rows, pa.string()))
