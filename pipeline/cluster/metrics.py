"""The driver's Ray metrics: rows still pending and failures by reason (names in `flux_worker.metrics`).

The renderer actors count images and render seconds themselves; the driver knows what the actors do
not: how many planned images have not come back yet, and the rows refused before rendering.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flux_worker.metrics import FAILURES, IMAGES, ROWS_PENDING, job_label, ray_is_running
from schemas import FailureRecord

log = logging.getLogger(__name__)
# How long the end of a run on its own local cluster waits for the endpoint to serve the last values: Ray
# exports every few seconds (its metrics report interval), so a few of those.
EXPORT_WAIT_SECONDS = float(os.environ.get("FLUXBATCH_METRICS_EXPORT_SECONDS", "30"))


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
        self.planned: int | None = None  # the first pending value: the images this run sent to renderers
        self.pending = self.failed = 0
        if not self.enabled:
            return
        from ray.util.metrics import Counter, Gauge

        self.pending_gauge = Gauge(ROWS_PENDING, description="planned images the driver still waits for",
                                   tag_keys=("job",))
        self.failures = Counter(FAILURES, description="failed rows and images, by reason",
                                tag_keys=("reason", "job"))

    def set_pending(self, rows: int) -> None:
        """Planned images not yet back from the renderers."""
        if self.planned is None:
            self.planned = rows
        self.pending = rows
        if self.enabled:
            self.pending_gauge.set(rows, tags={"job": self.job})

    def count_failures(self, failures: Iterable[FailureRecord]) -> None:
        """Add failures to the counter, one series per reason."""
        self.count_reasons(Counter(failure_reason(f) for f in failures))

    def count_reasons(self, counts: Mapping[str, int]) -> None:
        """Add failures already counted by reason (`FailureCounts.by_reason`) to the counter."""
        if not self.enabled:
            return
        for reason, count in counts.items():
            if count:
                self.failed += count
                self.failures.inc(count, tags={"reason": reason, "job": self.job})

    def wait_until_exported(self, endpoint: str | None, seconds: float = EXPORT_WAIT_SECONDS) -> bool:
        """Wait until the node's Prometheus `endpoint` serves this run's last values; False if it did not in time.

        Ray exports metrics every few seconds, so values set just before a local cluster stops would never be
        scraped. Waited for: the driver's last rows-pending value, its failure count, and at least one image
        counted by the renderers for every image that came back (a batch re-run after a lost renderer counts
        twice there, hence "at least").
        """
        if not self.enabled or not endpoint or self.planned is None:
            return True
        pending = f"ray_{ROWS_PENDING}"
        at_least = {f"ray_{FAILURES}_total": float(self.failed),
                    f"ray_{IMAGES}_total": float(self.planned - self.pending)}
        deadline = time.monotonic() + seconds
        while True:
            try:
                found = scrape(endpoint, self.job)
            except OSError:
                found = {}
            if found.get(pending) == self.pending and all(found.get(k, 0.0) >= v for k, v in at_least.items()):
                return True
            if time.monotonic() > deadline:
                log.warning("the metrics endpoint %s did not show this run's last values within %.0fs",
                            endpoint, seconds)
                return False
            time.sleep(0.5)


def scrape(endpoint: str, job: str) -> dict[str, float]:
    """Each fluxbatch metric of `job` on a Prometheus endpoint, summed over its other labels (worker, reason...)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_fluxbatch_") and sample.labels.get("job") == job:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
