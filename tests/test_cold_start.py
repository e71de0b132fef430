"""Every run says where its actors' cold start went (summary.json, report.html), and with model.compile on, a
second render reads the compiled code the first one left in the shared compile cache instead of building it.

Two renders with compile on (the tiny model; compiling costs ~40 s of one actor on 2 cores), each into its own
OUTPUT, over one compile-cache folder; every test below reads them.
"""

from __future__ import annotations

import json

import pytest

from pipeline import render
from schemas import JobSpec, RunSummary
from tests.conftest import write_manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

ROWS = [{"id": "lamp", "prompt": "a brass lamp", "width": 64, "height": 64, "steps": 2, "num_images": 2}]
STAGES = ("process_start", "model_load", "warmup")


@pytest.fixture(scope="module")
def two_renders(tmp_path_factory, tiny_model):
    """(first OUTPUT, second OUTPUT, the compile-cache folder), rendered one after the other."""
    folder = tmp_path_factory.mktemp("cold-start")
    manifest = write_manifest(folder / "m.parquet", ROWS)
    blobs = folder / "compile-cache"
    model = {"name": str(tiny_model), "compile": True, "compile_cache": str(blobs)}
    outputs = folder / "first", folder / "second"
    for out in outputs:
        render(JobSpec.model_validate({"manifest": str(manifest), "output": {"uri": str(out)}, "model": model}),
               progress=False)
    return *outputs, blobs


def written_summary(out) -> RunSummary:
    return RunSummary.model_validate_json((out / "summary.json").read_text())


def test_summary_json_gives_each_actors_cold_start_in_seconds_by_stage(two_renders):
    first, _, _ = two_renders
    summary = written_summary(first)
    (actor,) = summary.actors  # one replica, one record
    assert actor.device == "cpu" and actor.compile
    stages = [getattr(actor, name) for name in STAGES]
    assert all(seconds >= 0 for seconds in stages) and actor.first_image is not None
    assert sum(stages) <= actor.first_image  # first image counts from the process's start, past every stage
    assert actor.started_at <= summary.finished_at
    # the run's own record holds the same, and the actor's record stays in the run's folder
    record = json.loads((first / "runs" / summary.run_id / "summary.json").read_text())
    assert record["actors"][0]["worker"] == actor.worker
    assert len(list((first / "runs" / summary.run_id / "actors").glob("*.json"))) == 1


def test_first_render_compiles_and_saves_the_cache_second_render_loads_it(two_renders):
    first, second, blobs = two_renders
    (cold,) = written_summary(first).actors
    (warm,) = written_summary(second).actors
    assert (cold.compile_cache_hit, cold.compile_cache_saved) == (False, 1)
    assert cold.inductor_cache_misses + cold.inductor_cache_hits > 0  # it compiled (or read inductor's own cache)
    assert (warm.compile_cache_hit, warm.compile_cache_loaded, warm.compile_cache_saved) == (True, 1, 0)
    assert warm.inductor_cache_misses == 0 and warm.inductor_cache_hits > 0  # every graph read back, none built
    assert len(list(blobs.glob("*.bin"))) == 1  # one shape, one blob, shared


def test_report_html_shows_the_cold_start_table(two_renders):
    _, second, _ = two_renders
    (actor,) = written_summary(second).actors
    report = (second / "report.html").read_text()
    assert "cold start" in report and "compile / warm-up" in report
    assert actor.worker in report and ">hit<" in report
