"""The run report: summary.json (counts, throughput, seconds per stage, failures by reason) and report.html."""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from PIL import Image

from flux_worker.storage import Storage
from pipeline import render
from pipeline.store.report import render_report
from schemas import FAILURE_SCHEMA, RunSummary
from tests.conftest import write_manifest
from tests.helpers import make_job

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter

THUMBNAIL = re.compile(r"<img src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)' alt='([0-9a-f]+)'>")
ROWS = [
    {"id": "lamp", "prompt": "a brass lamp & <b>bold</b> shade", "width": 64, "height": 64, "num_images": 2},
    {"id": "mug", "prompt": "a speckled mug", "width": 96, "height": 64},
    {"id": "bad", "prompt": "a chair", "width": 65, "height": 64},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, ray_cluster, stand_in_renderer) -> tuple[Path, RunSummary]:
    """One real render on the local Ray cluster: three images and one refused row."""
    folder = tmp_path_factory.mktemp("report")
    manifest = write_manifest(folder / "m.parquet", ROWS)
    out = folder / "out"
    return out, render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)


@pytest.mark.slow
def test_summary_json_has_counts_throughput_seconds_per_stage_and_failures_by_reason(run):
    out, summary = run
    written = json.loads((out / "summary.json").read_text())
    assert {k: written[k] for k in ("manifest_rows", "invalid_rows", "images_expected", "images_rendered",
                                    "images_failed", "images_total_done")} == {
        "manifest_rows": 3, "invalid_rows": 1, "images_expected": 3, "images_rendered": 3, "images_failed": 0,
        "images_total_done": 3}
    assert written["images_per_second"] > 0
    assert {"read", "plan", "render", "total"} <= set(written["seconds"])
    assert written["seconds"]["total"] >= written["seconds"]["render"]
    assert written["failures_by_reason"] == {"validate:width": 1}
    assert written["run_id"] == summary.run_id


@pytest.mark.slow
def test_report_html_is_a_contact_sheet_of_every_image_with_its_prompt_and_the_failures_table(run):
    out, _ = run
    document = (out / "report.html").read_text()
    metadata = {p.stem: p for p in (out / "images").rglob("*.png")}
    thumbnails = THUMBNAIL.findall(document)
    assert sorted(key for _, key in thumbnails) == sorted(metadata)
    for data, _ in thumbnails:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "JPEG" and max(image.size) <= 192
    # Prompts are shown, and escaped: a prompt cannot inject markup into the report.
    assert document.count("a brass lamp &amp; &lt;b&gt;bold&lt;/b&gt; shade") == 2
    assert "<b>bold</b>" not in document
    assert "a speckled mug" in document
    assert "width must be a multiple of 16, got 65" in document
    assert "<h2>failures <span class='note'>1 row(s)</span></h2>" in document
    # Readable offline: nothing is fetched from anywhere.
    assert not re.search(r"(src|href)=['\"](https?:)?//", document)


@pytest.mark.slow
def test_report_headline_agrees_with_the_exit_code_and_it_plots_the_run_and_links_each_thumbnail(run):
    out, summary = run
    document = (out / "report.html").read_text()
    assert summary.succeeded is False  # the refused row: exit 1
    assert "<p class='outcome bad'><b>exit 1: 1 rows were refused (fix them in the manifest)</b></p>" in document
    assert "complete" not in re.sub(r"<[^>]+>", " ", document).split("counts")[0]  # no contrary word on top
    for plot in ("images per second over the run", "busy and idle time per actor", "failures by reason"):
        assert f"aria-label='{plot}'" in document, plot
    links = re.findall(r"<a href='([^']+)'><img src='data:image/jpeg;base64,[^']+' alt='([0-9a-f]+)'>", document)
    assert len(links) == 3 and all((out / href).is_file() and Path(href).stem == key for href, key in links)
    order = [request for request in re.findall(r"<span class='note'>(\w+) #\d", document)]
    assert sorted(order) == ["lamp", "lamp", "mug"] and order == sorted(order, key=order.index)  # side by side


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_its_plots_and_headline(run, tmp_path):
    """A browser's reading, not ours: Chromium's DOM of the file holds the plots and the headline. Chromium is an
    apt package (`apt install chromium`); without it this test is skipped and says so."""
    import shutil
    import subprocess

    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    if browser is None:
        pytest.skip("chromium is not installed here (apt install chromium): the report was not opened in a browser")
    out, _ = run
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("<svg") >= 3 and "busy and idle time per actor" in done.stdout
    assert "exit 1: 1 rows were refused" in done.stdout


@pytest.mark.slow
def test_report_reads_its_thumbnails_from_s3(tmp_path, tiny_model, ray_cluster, s3_env, bucket):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:2])
    out = f"s3://{bucket}/run"
    render(make_job(str(manifest), out, str(tiny_model)), progress=False)
    document = fsspec.filesystem("s3").cat_file(f"{bucket}/run/report.html").decode()
    assert len(THUMBNAIL.findall(document)) == 3
    assert "no preview" not in document


def test_report_says_how_many_failures_it_leaves_out_and_marks_unreadable_images():
    summary = RunSummary(output="memory://out", run_id="r1", model_id="m", started_at=datetime.now(timezone.utc),
                         images_expected=1, failures_by_reason={"render:RuntimeError": 30})
    now = datetime.now(timezone.utc)
    failures = pa.Table.from_pylist(
        [{"stage": "render", "row": i, "reason": f"render: RuntimeError: boom {i}", "attempts": 4, "at": now}
         for i in range(30)], schema=FAILURE_SCHEMA)
    images = [{"key": "ab12", "request_id": "x", "variant": 0, "prompt": "gone", "width": 64, "height": 64,
               "seed": 1, "image_uri": "memory://out/images/ab/ab12.png", "render_seconds": 0.5}]
    document = render_report(summary, images, failures, Storage(fsspec.filesystem("memory")), "/out",
                             failure_rows=10)
    assert "30 row(s), first 10 shown" in document
    assert "boom 9" in document and "boom 10" not in document
    assert "<div class='missing'>no preview</div>" in document
    assert "<p class='outcome bad'><b>exit 1: 1 of 1 images are not in OUTPUT (a re-run renders what failed)</b></p>" \
        in document
