"""What each pool of a mixed fleet did: images, images per second and busy fraction, per card type.

The fleet's members tag each result table with their card type (flux_worker/fleet_replica.py, POOL_COLUMN); the
driver counts here before the tag is dropped and the rows committed. A pool's busy fraction is the render seconds
of its images over its replicas' time between its first image's start and its last image's end.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.fleet_replica import POOL_COLUMN
from schemas.summary import PoolSummary


class PoolStats:
    def __init__(self, pools: tuple) -> None:
        self.shape = {pool.card_type: pool for pool in pools}
        self.images: dict[str, int] = dict.fromkeys(self.shape, 0)
        self.seconds: dict[str, float] = dict.fromkeys(self.shape, 0.0)
        self.first: dict[str, datetime] = {}
        self.last: dict[str, datetime] = {}

    def join(self, pool: Any) -> None:
        """A pool whose card type joined the cluster during the run (pipeline/fleet_stage.py)."""
        self.shape[pool.card_type] = pool
        self.images.setdefault(pool.card_type, 0)
        self.seconds.setdefault(pool.card_type, 0.0)

    def add(self, batch: pa.Table) -> pa.Table:
        """Count `batch` (a result table with POOL_COLUMN) to its pool; the table without the column."""
        if POOL_COLUMN not in batch.column_names:
            return batch
        done = batch.filter(pc.is_null(batch.column("error")))
        for name in set(batch.column(POOL_COLUMN).to_pylist()):
            rows = done.filter(pc.equal(done.column(POOL_COLUMN), name))
            if not rows.num_rows:
                continue
            self.images[name] = self.images.get(name, 0) + rows.num_rows
            self.seconds[name] = self.seconds.get(name, 0.0) + pc.sum(rows.column("render_seconds")).as_py()
            first, last = pc.min(rows.column("started_at")).as_py(), pc.max(rows.column("finished_at")).as_py()
            self.first[name] = min(self.first.get(name, first), first)
            self.last[name] = max(self.last.get(name, last), last)
        return batch.drop_columns([POOL_COLUMN])

    def summaries(self) -> list[PoolSummary]:
        out = []
        for name, pool in self.shape.items():
            span = (self.last[name] - self.first[name]).total_seconds() if name in self.first else 0.0
            out.append(PoolSummary(
                card_type=name, replicas=pool.replicas, gpus_per_replica=pool.gpus_per_replica,
                images=self.images[name], images_per_second=self.images[name] / span if span else None,
                busy=min(1.0, self.seconds[name] / (pool.replicas * span)) if span else None,
                first_started_at=self.first.get(name), last_finished_at=self.last.get(name)))
        return out


