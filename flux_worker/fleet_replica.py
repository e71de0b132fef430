"""A pool over a mixed fleet: one Ray Data actor pool whose members each render on one card type, in its shape.

Ray Data runs one actor shape per map stage by default. A mixed fleet needs several (TP-1 on 80 GB cards, TP-2
groups on 24 GB ones), all drawing from one stream of batches, so that a faster pool takes more and the pools
finish together: no static split. The stage therefore gives each member its own remote arguments as Ray Data
starts it (`slot_args`, Ray Data's `ray_remote_args_fn`): the GPUs and CPUs of one replica of a card type, and a
sliver of that type's `accelerator_type:<T>` resource, which pins the member to those nodes. The member reads the
type back from what Ray assigned it and builds that type's replica in its own process: a `Renderer` on its GPU
(or the stand-in, in tests and benchmarks), or, for a tensor-parallel degree, a `TensorParallelReplica` whose
group's bundles ask for the same type. Ray Data hands each batch to whichever member is free; a member that dies
is restarted with the same arguments (the same type) and its batch re-run, as in a single-type pool.

`ray_remote_args_fn` is deprecated in Ray 2.60 and removed in 2.64 (pyproject pins 2.60): before that upgrade this
becomes one map stage per card type over a shared queue.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from schemas import RenderOptions

POOL_COLUMN = "pool"  # added to each result table: the card type that rendered it (the driver strips it)
TYPE_SHARE = 0.001  # how much of a node's `accelerator_type:<T>` resource a member asks for: a pin, not a count
TYPE_PREFIX = "accelerator_type:"


def pin(card_type: str) -> dict[str, float]:
    return {f"{TYPE_PREFIX}{card_type}": TYPE_SHARE}


def slot_args(slots: list[dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Ray Data's `ray_remote_args_fn` for a fleet's pool: each call (a member starting) the next slot's resources,
    round the slots (in the order render_stage.fleet_slots interleaves them). A tensor-parallel member holds no GPU
    itself (its group's rank actors do; slot["holds"] False), only the pin."""
    order = itertools.cycle(slots)

    def next_member() -> dict[str, Any]:
        slot = next(order)
        return {"num_gpus": slot["gpus"] if slot["holds"] else 0, "num_cpus": slot["cpus"] if slot["holds"] else 0,
                "resources": pin(slot["card_type"])}

    return next_member


class FleetReplica:
    """A Ray Data callable class: a member of a mixed fleet's pool, rendering in the shape of the card type Ray
    placed it on. `pools`: card type -> its slot (degree, GPUs, placement, CPUs per rank)."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, pools: dict[str, dict[str, Any]],
                 renderer: Any = None):
        assigned = ray.get_runtime_context().get_assigned_resources()
        self.card_type = next(name[len(TYPE_PREFIX):] for name in assigned if name.startswith(TYPE_PREFIX))
        slot = pools[self.card_type]
        if slot["degree"] > 1 and renderer is None:
            from flux_worker.tensor_parallel import TensorParallelReplica

            self.replica = TensorParallelReplica(model, options, tp_degree=slot["degree"],
                                                 placement=slot["placement"], cpus_per_rank=slot["cpus_per_rank"],
                                                 resources=pin(self.card_type))
        else:
            if renderer is None:
                from flux_worker.renderer import Renderer as renderer
            self.replica = renderer(model, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = self.replica(batch)
        return table.append_column(POOL_COLUMN, pa.array([self.card_type] * table.num_rows, pa.string()))
