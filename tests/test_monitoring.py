"""Ray metrics of a run, scraped from the local node's Prometheus endpoint, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flux_worker.metrics import METRIC_NAMES, job_label
from pipeline import render
from tests.conftest import write_manifest
from tests.helpers import make_job

# The metrics the driver and each renderer export; the model does not matter.
pytestmark = pytest.mark.usefixtures("stand_in_renderer")

DASHBOARD = Path(__file__).parents[1] / "dashboards" / "fluxbatch.json"


@pytest.fixture(scope="module")
def metrics_endpoint(ray_cluster) -> str:
    """The local node's Prometheus endpoint, where Ray exports every metric with a `ray_` prefix."""
    port = next(node["MetricsExportPort"] for node in ray_cluster.nodes() if node["Alive"])
    return f"http://127.0.0.1:{port}/metrics"


def scrape(endpoint: str, job: str) -> dict[tuple[str, tuple], float]:
    """Sum of each fluxbatch sample of one job over Ray's own labels (worker, node, session)."""
    text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
    totals: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("ray_fluxbatch_") or sample.labels.get("job") != job:
                continue
            ours = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("status", "reason", "model", "le")))
            key = (sample.name, ours)
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def wait_for(endpoint: str, job: str, wanted: dict[tuple[str, tuple], float], seconds: float = 90) -> dict:
    """Scrape until every wanted sample has its value; Ray reports metrics every few seconds."""
    deadline = time.monotonic() + seconds
    while True:
        found = scrape(endpoint, job)
        if all(found.get(key) == value for key, value in wanted.items()) or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.mark.slow
def test_prometheus_endpoint_counts_images_render_seconds_failures_and_pending(tmp_path, tiny_model,
                                                                              metrics_endpoint):
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "num_images": 2},
        {"id": "dog", "prompt": "a blue dog", "width": 64, "height": 64},
        {"id": "owl", "prompt": "an owl", "width": 64, "height": 64},
        {"id": "bad", "prompt": "a bad size", "width": 65, "height": 64},
    ])
    out = str(tmp_path / "out")
    summary = render(make_job(str(manifest), out, str(tiny_model), replicas=2, batch_size=2), progress=False)
    assert summary.images_rendered == 4

    model = (("model", summary.model_id),)
    wanted = {
        ("ray_fluxbatch_images_total", model + (("status", "rendered"),)): 4.0,
        ("ray_fluxbatch_render_seconds_count", model): 4.0,
        ("ray_fluxbatch_failures_total", (("reason", "validate:width"),)): 1.0,
        ("ray_fluxbatch_rows_pending", ()): 0.0,
    }
    found = wait_for(metrics_endpoint, job_label(out), wanted)
    assert {key: found.get(key) for key in wanted} == wanted
    assert ("ray_fluxbatch_images_total", model + (("status", "failed"),)) not in found
    # Every image falls in some histogram bucket: the +Inf bucket holds all four.
    assert found[("ray_fluxbatch_render_seconds_bucket", (("le", "+Inf"),) + model)] == 4.0


def test_grafana_dashboard_queries_only_metrics_fluxbatch_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    exported = {f"ray_{name}" for name in METRIC_NAMES}
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"ray_fluxbatch_\w+", e)}
    assert used == exported, f"unknown: {used - exported}, never shown: {exported - used}"
    assert all("$job" in e for e in exprs), "every panel must follow the dashboard's job selector"
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job"}
