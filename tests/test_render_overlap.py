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
from schemas import PLAN_SCHEMA, ModelSpec, RenderOptions


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
    return Renderer({"name": str(tiny_model)}, RenderOptions(output_uri=str(output), **options), pipeline=tiny_pipeline)


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
