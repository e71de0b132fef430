"""A member of one pool of a mixed fleet: an actor rendering, in its card type's shape, the batches it is given.

A mixed fleet needs a replica shape per card type (TP-1 on 80 GB cards, TP-2 groups on 24 GB ones), all drawing
from one stream of batches. pipeline/fleet_stage.py starts each pool's members as actors of their own, each asking
for one replica of its type (one GPU, or a fraction) plus a sliver of Ray's `accelerator_type:<T>` resource, which
pins it to that type's nodes, and hands each batch to whichever member is free. A member builds its type's
replica in its own process: a `Renderer` on its GPU (or the stand-in, in tests and benchmarks), or, for a
tensor-parallel degree, a `TensorParallelReplica` whose group's bundles ask for the same type. A member whose
process dies is restarted by Ray with the same resources, so on its own card type.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas import RenderOptions

POOL_COLUMN = "pool"  # added to each result table: the card type that rendered it (the driver strips it)
TYPE_SHARE = 0.001  # how much of a node's `accelerator_type:<T>` resource a member asks for: a pin, not a count
TYPE_PREFIX = "accelerator_type:"


def pin(card_type: str) -> dict[str, float]:
    return {f"{TYPE_PREFIX}{card_type}": TYPE_SHARE}


class FleetMember:
    """One replica of a fleet's pool. `degree`, `placement`, `cpus_per_rank`: the card type's tensor-parallel
    group, if any; `renderer`: a stand-in for `Renderer` (tests and benchmarks)."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, card_type: str, degree: int = 1,
                 placement: dict[str, Any] | None = None, cpus_per_rank: int = 1, renderer: Any = None):
        self.card_type = card_type
        if degree > 1 and renderer is None:
            from flux_worker.tensor_parallel import TensorParallelReplica

            self.replica = TensorParallelReplica(model, options, tp_degree=degree, placement=placement,
                                                 cpus_per_rank=cpus_per_rank, resources=pin(card_type))
        else:
            if renderer is None:
                from flux_worker.renderer import Renderer as renderer
            self.replica = renderer(model, options)

    def ready(self) -> str:
        """Answers once the replica is built (or rebuilt, after its process died)."""
        return self.card_type

    def render(self, batch: pa.Table) -> pa.Table:
        table = self.replica(batch)
        return table.append_column(POOL_COLUMN, pa.array([self.card_type] * table.num_rows, pa.string()))
