"""The renderer encodes and writes images beside rendering, yet returns a batch only once all are written.

These drive one `Renderer` in this process with the tiny offline model, as Ray Data would per batch.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from flux_worker import image_writer
from flux_worker.loading import load_pipeline
from flux_worker.presets import resolve_preset
from flux_worker.renderer import Renderer
from schemas import PLAN_SCHEMA, ModelSpec


def plan_batch(count: int, prompts: list[str] | None = None) -> pa.Table:
    """`count` planned 64x64 images, as the driver hands them to a renderer."""
    prompts = prompts or [f"prompt number {i}" for i in range(count)]
    rows = [
        {"key": hashlib.blake2b(f"k{i}".encode(), digest_size=16).hexdigest(), "request_id": f"r{i}", "variant": 0,
         "prompt": prompts[i % len(prompts)], "width": 64, "height": 64, "steps": 2, "guidance": 3.5,
         "seed": 1000 + i, "max_sequence_length": 32, "adapters": [], "output_format": "png",
         "source": "m.parquet", "row": i}
        for i in range(count)
    ]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model):
    spec = ModelSpec(name=str(tiny_model))
    return load_pipeline(spec)[0], resolve_preset(spec.name)


def make_renderer(tiny_model, tiny_pipeline, output: Path, **options) -> Renderer:
    return Renderer({"name": str(tiny_model)}, str(output), pipeline=tiny_pipeline, **options)


def test_every_returned_row_points_at_a_complete_image(tmp_path, tiny_model, tiny_pipeline):
    renderer = make_renderer(tiny_model, tiny_pipeline, tmp_path / "out")

    result = renderer(plan_batch(5))

    assert result.column("error").null_count == 5
    for row in result.to_pylist():
        data = Path(row["image_uri"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (row["bytes"], row["sha256"])


def test_an_image_is_encoded_while_the_next_one_renders(tmp_path, tiny_model, tiny_pipeline, monkeypatch):
    second_render_started = threading.Event()
    seen_by_first_encode: list[bool] = []
    renderer = make_renderer(tiny_model, tiny_pipeline, tmp_path / "out")
    calls = []
    generate, encode = renderer._generate, image_writer.encode_image

    def counting_generate(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            second_render_started.set()
        return generate(*args, **kwargs)

    def waiting_encode(image, fmt, **quality):
        if not seen_by_first_encode:
            # With writes in line with rendering, the second render could never start while we wait here.
            seen_by_first_encode.append(second_render_started.wait(timeout=60))
        return encode(image, fmt, **quality)

    monkeypatch.setattr(renderer, "_generate", counting_generate)
    monkeypatch.setattr(image_writer, "encode_image", waiting_encode)  # the writer encodes (image_writer.py)

    result = renderer(plan_batch(2))

    assert seen_by_first_encode == [True]
    assert result.column("error").null_count == 2


def test_a_failed_write_is_a_failure_row_and_its_neighbours_still_land(tmp_path, tiny_model, tiny_pipeline,
                                                                       monkeypatch):
    renderer = make_renderer(tiny_model, tiny_pipeline, tmp_path / "out")
    batch = plan_batch(3)
    doomed = batch.column("key")[1].as_py()
    write = renderer.writer.fs.write_bytes

    def flaky_write(path, data):
        if doomed in path:
            raise OSError("disk full (simulated)")
        return write(path, data)

    monkeypatch.setattr(renderer.writer.fs, "write_bytes", flaky_write)

    rows = {r["key"]: r for r in renderer(batch).to_pylist()}

    assert rows[doomed]["error"] == "write: OSError: disk full (simulated)"
    assert [r["error"] for k, r in rows.items() if k != doomed] == [None, None]


def test_two_calls_at_once_render_one_batch_at_a_time_and_the_next_renders_while_the_last_image_is_written(
        tmp_path, tiny_model, tiny_pipeline, monkeypatch):
    """Ray Data runs two calls on each member at once (pipeline/render_stage.py): one renders, the other waits for
    the device; a batch's last writes then overlap the next batch's rendering instead of idling the GPU."""
    renderer = make_renderer(tiny_model, tiny_pipeline, tmp_path / "out")
    first, second = plan_batch(4).slice(0, 2), plan_batch(4).slice(2, 2)
    last_of_first = first.column("key")[1].as_py()
    second_started = threading.Event()
    rendering, most_at_once, lock = [0], [0], threading.Lock()
    generate, write = renderer._generate, renderer.writer.fs.write_bytes

    def counting_generate(row, *args, **kwargs):
        with lock:
            rendering[0] += 1
            most_at_once[0] = max(most_at_once[0], rendering[0])
        if row["key"] in second.column("key").to_pylist():
            second_started.set()
        try:
            return generate(row, *args, **kwargs)
        finally:
            with lock:
                rendering[0] -= 1

    waited: list[bool] = []

    def slow_last_write(path, data):
        if last_of_first in path:  # an upload that takes long: the next batch should render meanwhile
            waited.append(second_started.wait(timeout=60))
        return write(path, data)

    monkeypatch.setattr(renderer, "_generate", counting_generate)
    monkeypatch.setattr(renderer.writer.fs, "write_bytes", slow_last_write)
    results: dict[str, pa.Table] = {}
    calls = [threading.Thread(target=lambda name=name, batch=batch: results.__setitem__(name, renderer(batch)))
             for name, batch in (("first", first), ("second", second))]
    calls[0].start()
    calls[1].start()
    for call in calls:
        call.join(timeout=120)

    assert waited == [True]  # the second batch began rendering while the first's last image was being written
    assert most_at_once[0] == 1  # never two batches on the device at once
    for name, batch in (("first", first), ("second", second)):
        assert results[name].column("key").to_pylist() == batch.column("key").to_pylist()
        assert results[name].column("error").null_count == 2


def test_ray_data_runs_two_calls_on_a_member_at_once(tmp_path, tiny_model, ray_cluster):
    """What makes the overlap above happen in a real pool: the stage asks Ray Data for two calls per member."""
    from pipeline import render
    from tests.conftest import write_manifest
    from tests.counting_renderer import CountingRenderer
    from tests.helpers import assert_images_match_metadata, make_job

    rows = [{"id": f"cup-{i}", "prompt": f"a cup {i}", "width": 64, "height": 64} for i in range(6)]
    out = tmp_path / "out"
    job = make_job(str(write_manifest(tmp_path / "m.parquet", rows)), str(out), str(tiny_model), batch_size=1)

    summary = render(job, progress=False, renderer_class=CountingRenderer)

    assert summary.images_rendered == 6
    assert_images_match_metadata(str(out))
    [record] = tmp_path.glob("out.calls-at-once-*")
    assert record.read_text() == "2"
