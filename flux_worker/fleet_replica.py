"""A member of one pool of a mixed fleet: an actor rendering, in its card type's shape, the batches it is given.

A mixed fleet needs a replica shape per card type (TP-1 on 80 GB cards, TP-2 groups on 24 GB ones), all drawing
from one stream of batches. pipeline/fleet_stage.py starts each pool's members as actors of their own, each asking
for one replica of its type (one GPU, or a fraction) plus a sliver of Ray's `accelerator_type:<T>` resource, which
pins it to that type's nodes, and hands each batch to whichever member is free. A member builds its type's
replica in its own process: a `Renderer` on its GPU (or the stand-in, in tests and benchmarks), or, for a
tensor-parallel degree, a `TensorParallelReplica` whose group's bundles ask for the same type. A member whose
process dies is restarted by Ray with the same resources, so on its own card type. (A job of one shape whose
blocks must each stay one batch, best-of-n's, runs as a pool of no card type: fleet_stage.one_pool_stage.)
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from schemas import RenderOptions

POOL_COLUMN = "pool"  # added to each result table: the card type that rendered it (the driver strips it)
TYPE_SHARE = 0.001  # how much of a node's `accelerator_type:<T>` resource a member asks for: a pin, not a count
TYPE_PREFIX = "accelerator_type:"


def pin(card_type: str) -> dict[str, float]:
    return {f"{TYPE_PREFIX}{card_type}": TYPE_SHARE}


class FleetMember:
    """One replica of a pool driven by pipeline/fleet_stage.py: `member(model=, options=, **member_kwargs)` built in
    this actor's process (a `Renderer`, a `TensorParallelReplica` or a stand-in), and the card type it renders on
    (empty for a pool of no particular type), which tags each result table."""

    def __init__(self, model: dict[str, Any], options: RenderOptions, *, card_type: str, member: type,
                 member_kwargs: dict[str, Any]):
        self.card_type = card_type
        self.replica = member(model=model, options=options, **member_kwargs)

    def ready(self) -> int:
        """Answers once the replica is built (or rebuilt, after its process died): the process's id."""
        return os.getpid()

    def render(self, batch: pa.Table) -> pa.Table:
        table = self.replica(batch)
        if not self.card_type:
            return table
        return table.append_column(POOL_COLUMN, pa.array([self.card_type] * table.num_rows, pa.string()))
