"""Batches Ray Data gave up on: their images become failure rows carrying the last error seen.

A renderer process that dies (SIGKILL, OOM killer, node lost) is replaced and its batch re-run, up to
`JobSpec.max_renderer_deaths` times. Past that Ray Data drops the batch (`max_errored_blocks=-1`) and
logs why; the driver then renders each lost image alone, with the same bound, so that one row that kills
its process does not take its neighbours with it. The failures table says Ray's last error, kept by
`DroppedBatchErrors` (pipeline/cluster/ray_private.py: Ray Data has no public hook for dropped batches); the next run
tries those images again like any other failure.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from schemas import FailureRecord


def lost_image_failures(plan: pa.Table, returned: set[str], last_error: str | None,
                        max_renderer_deaths: int) -> list[FailureRecord]:
    """A failure row for every planned image that never came back, neither with its batch nor alone."""
    if len(returned) >= plan.num_rows:
        return []
    now = datetime.now(timezone.utc)
    tries = max_renderer_deaths + 1
    reason = (f"lost: its renderer process died (or raised) on each of {tries} tries with its batch and {tries} "
              f"tries alone; last error: {last_error or 'unknown, see the worker logs'}")
    columns = plan.select(["key", "source", "row", "request_id", "variant"]).to_pylist()
    return [
        FailureRecord(stage="render", source=row["source"], row=row["row"], request_id=row["request_id"],
                      key=row["key"], variant=row["variant"], reason=reason, attempts=2 * tries, at=now)
        for row in columns if row["key"] not in returned
    ]
