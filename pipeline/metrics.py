"""The driver's Ray metrics: rows still pending and failures by reason (names in `flux_worker.metrics`).

The renderer actors count images and render seconds themselves; the driver knows what the actors do
not: how many planned images have not come back yet, and the rows refused before rendering.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flux_worker.metrics import FAILURES, ROWS_PENDING, job_label, ray_is_running
from schemas import FailureRecord


def failure_reason(failure: FailureRecord) -> str:
    """A short, low-cardinality reason: `validate:width`, `render:OutOfMemoryError`, `write:ClientError`.

    Render and write reasons start with `stage: ErrorType: text` (see the renderer); the error type is
    kept and the text, which can hold anything, is dropped.
    """
    if failure.stage in ("render", "write"):
        _, _, rest = failure.reason.partition(":")
        error_type = rest.strip().split(":", 1)[0].strip() or "-"
        return f"{failure.stage}:{error_type[:80]}"
    return f"{failure.stage}:{failure.field or '-'}"


@dataclass
class FailureCounts:
    """Failures counted as they stream past to their parts, instead of kept: memory stays flat however many.

    `rows` counts distinct (source, row) pairs, a file that cannot be read counting as one: the manifest
    reader reports all of one row's failures together, so a pair is new exactly when it differs from the last.
    """

    by_reason: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    total: int = 0
    _last: tuple[str | None, int | None] | None = None

    def add(self, failure: FailureRecord) -> None:
        self.by_reason[failure_reason(failure)] += 1
        self.total += 1
        where = (failure.source, failure.row)
        if where != self._last:
            self.rows += 1
            self._last = where


class DriverMetrics:
    """Rows pending and failures by reason for one run; records nothing when Ray is not connected."""

    def __init__(self, output_uri: str):
        self.job = job_label(output_uri)
        self.enabled = ray_is_running()
        if not self.enabled:
            return
        from ray.util.metrics import Counter, Gauge

        self.pending = Gauge(ROWS_PENDING, description="planned images the driver still waits for",
                             tag_keys=("job",))
        self.failures = Counter(FAILURES, description="failed rows and images, by reason",
                                tag_keys=("reason", "job"))

    def set_pending(self, rows: int) -> None:
        """Planned images not yet back from the renderers."""
        if self.enabled:
            self.pending.set(rows, tags={"job": self.job})

    def count_failures(self, failures: Iterable[FailureRecord]) -> None:
        """Add failures to the counter, one series per reason."""
        self.count_reasons(Counter(failure_reason(f) for f in failures))

    def count_reasons(self, counts: Mapping[str, int]) -> None:
        """Add failures already counted by reason (`FailureCounts.by_reason`) to the counter."""
        if not self.enabled:
            return
        for reason, count in counts.items():
            if count:
                self.failures.inc(count, tags={"reason": reason, "job": self.job})
