"""Retries are bounded: an out-of-memory batch is split before any image fails, a failing image is tried
`max_retries + 1` times, and a row that kills its renderer process is given up after
`max_renderer_deaths + 1` tries. Each gives up with the last error in the failures table."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pytest
import torch

from flux_worker.renderer import Renderer
from pipeline import render
from pipeline.plan import image_key
from schemas import PLAN_SCHEMA, RenderOptions
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, make_job


class OutOfMemoryAbove:
    """Wraps a pipeline; a call on more than `limit` images raises the GPU out-of-memory error (simulated)."""

    def __init__(self, pipe: Any, limit: int):
        self._pipe, self.limit, self.calls = pipe, limit, []

    def __call__(self, **kwargs: Any) -> Any:
        size = len(kwargs["generator"])
        self.calls.append(size)
        if size > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB (simulated)")
        return self._pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


def planned(count: int) -> pa.Table:
    rows = [{"key": image_key(f"r{i}", 0), "request_id": f"r{i}", "variant": 0, "prompt": f"a cup {i}", "width": 64,
             "height": 64, "steps": 2, "guidance": 0.0, "seed": i, "max_sequence_length": 32, "adapters": [],
             "output_format": "png", "source": "m.parquet", "row": i} for i in range(count)]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


@pytest.fixture(scope="module")
def batched_renderer(tiny_model, tmp_path_factory):
    """A renderer that batches same-shape images through the transformer, as on a GPU."""
    out = tmp_path_factory.mktemp("oom") / "out"
    renderer = Renderer({"name": str(tiny_model)},
                        RenderOptions(output_uri=str(out), batch_invariant=False, max_retries=2))
    real = renderer.pipe
    yield renderer
    renderer.pipe = real


def test_simulated_gpu_out_of_memory_splits_the_batch_and_every_image_renders(batched_renderer):
    batched_renderer.pipe = OutOfMemoryAbove(batched_renderer.pipe, limit=2)

    result = batched_renderer(planned(8)).to_pylist()

    assert [r["error"] for r in result] == [None] * 8
    assert [r["attempts"] for r in result] == [1] * 8  # splitting spends no image's tries
    assert batched_renderer.pipe.calls == [8, 4, 2, 2, 4, 2, 2]


def test_simulated_gpu_out_of_memory_on_one_image_fails_it_after_max_retries_with_the_error(batched_renderer):
    batched_renderer.pipe = OutOfMemoryAbove(batched_renderer.pipe, limit=0)

    result = batched_renderer(planned(2)).to_pylist()

    for row in result:
        assert row["attempts"] == 3  # max_retries=2: three tries
        assert row["error"] == "render: OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB (simulated)"
    assert batched_renderer.pipe.calls == [2, 1, 1, 1, 1, 1, 1]


@pytest.mark.slow
def test_row_that_kills_its_renderer_every_time_is_given_up_after_max_renderer_deaths(
        tmp_path, tiny_model, ray_cluster):
    from tests.poison_renderer import PoisonRenderer

    rows = [{"id": f"ok-{i}", "prompt": f"a cup {i}", "width": 64, "height": 64} for i in range(5)]
    rows.insert(2, {"id": "bad", "prompt": "poison", "width": 64, "height": 64})
    out = tmp_path / "out"
    job = make_job(str(write_manifest(tmp_path / "m.parquet", rows)), str(out), str(tiny_model), batch_size=1,
                   max_renderer_deaths=1)

    summary = render(job, progress=False, renderer_class=PoisonRenderer)

    assert (summary.images_rendered, summary.images_failed) == (5, 1)
    [failure] = failures(str(out)).to_pylist()
    assert (failure["row"], failure["key"], failure["stage"], failure["attempts"]) == (2, image_key("bad", 0),
                                                                                      "render", 4)
    assert re.fullmatch(r"lost: its renderer process died \(or raised\) on each of 2 tries with its batch and 2 "
                        r"tries alone; last error: \w+Error: .+", failure["reason"]), failure["reason"]
    assert_images_match_metadata(str(out))
