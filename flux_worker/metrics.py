"""Ray metrics of fluxbatch: their names, and what a renderer actor records after each batch.

Ray exports every `ray.util.metrics` metric on each node's Prometheus endpoint (its metrics export port)
with a `ray_` prefix, which is also what the Ray dashboard's Metrics tab and the Grafana dashboard in
`dashboards/fluxbatch.json` read. Counters get a `_total` suffix there.

    fluxbatch_images{status,model,job}          counter    images finished by renderers (rendered | failed)
    fluxbatch_render_seconds{model,job}         histogram  render seconds per image
    fluxbatch_gpu_memory_bytes{kind,model,job}  gauge      CUDA memory of a renderer (allocated | reserved)
    fluxbatch_rows_pending{job}                 gauge      planned images the driver still waits for
    fluxbatch_failures{reason,job}              counter    failed rows and images by `stage:cause`

The `job` tag is the run's OUTPUT URI: it names a job across re-runs and never carries user text.
"""

from __future__ import annotations

from typing import Any

IMAGES = "fluxbatch_images"
RENDER_SECONDS = "fluxbatch_render_seconds"
GPU_MEMORY_BYTES = "fluxbatch_gpu_memory_bytes"
ROWS_PENDING = "fluxbatch_rows_pending"
FAILURES = "fluxbatch_failures"
METRIC_NAMES = (IMAGES, RENDER_SECONDS, GPU_MEMORY_BYTES, ROWS_PENDING, FAILURES)

# From a tiny test model's milliseconds to a 12B model's minutes on a slow card.
RENDER_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300]


def job_label(output_uri: str) -> str:
    """The `job` tag of every fluxbatch metric: the OUTPUT URI, the same on the driver and on every actor."""
    return output_uri.rstrip("/")


def ray_is_running() -> bool:
    """Metrics can only be recorded inside a Ray worker or a connected driver; elsewhere they are skipped."""
    import ray

    return ray.is_initialized()


class RendererMetrics:
    """What one renderer actor reports: images by status, render seconds, and its GPU memory."""

    def __init__(self, model: str, output_uri: str):
        self.enabled = ray_is_running()
        if not self.enabled:  # a Renderer built outside Ray (a unit test, a TP rank's own process)
            self.tags = {"model": model, "job": job_label(output_uri), "pool": ""}
            return
        import ray
        from ray.util.metrics import Counter, Gauge, Histogram

        # `pool`: the card type of a mixed fleet's member (the accelerator_type it was pinned to), else empty.
        try:
            assigned = ray.get_runtime_context().get_assigned_resources()
        except AssertionError:  # not a worker: a Renderer built in the driver's own process (tests) holds nothing
            assigned = {}
        pinned = [name.split(":", 1)[1] for name in assigned if name.startswith("accelerator_type:")]
        self.tags = {"model": model, "job": job_label(output_uri), "pool": pinned[0] if pinned else ""}
        self.images = Counter(IMAGES, description="images finished by renderers, by status",
                              tag_keys=("status", "model", "job", "pool"))
        self.seconds = Histogram(RENDER_SECONDS, description="render seconds per image",
                                 boundaries=RENDER_SECONDS_BOUNDARIES, tag_keys=("model", "job", "pool"))
        self.gpu_memory = Gauge(GPU_MEMORY_BYTES, description="CUDA memory of a renderer actor, in bytes",
                                tag_keys=("kind", "model", "job", "pool"))

    def record_batch(self, results: list[dict[str, Any]]) -> None:
        """Count a batch's images by status and observe the render seconds of those that were rendered."""
        if not self.enabled:
            return
        rendered = [r for r in results if r.get("error") is None]
        failed = len(results) - len(rendered)
        if rendered:
            self.images.inc(len(rendered), tags={**self.tags, "status": "rendered"})
        if failed:
            self.images.inc(failed, tags={**self.tags, "status": "failed"})
        for row in rendered:
            self.seconds.observe(float(row["render_seconds"]), tags=self.tags)

    def record_gpu_memory(self, device: str) -> None:
        """Set the CUDA memory gauges after a batch; on CPU there is nothing to report."""
        if not self.enabled or device != "cuda":
            return
        import torch

        self.gpu_memory.set(torch.cuda.memory_allocated(), tags={**self.tags, "kind": "allocated"})
        self.gpu_memory.set(torch.cuda.memory_reserved(), tags={**self.tags, "kind": "reserved"})
