"""A renderer that holds no model, for tests of the driver (lease, ledger, resume, refusals, layouts) and for the
fleet benchmark (benchmarks/bench_fleet.py).

It takes `Renderer`'s constructor arguments and writes each image through the real `ImageWriter`, so paths,
ledger rows and sha256 are the real ones; the picture is noise drawn from the render parameters, so an edited
row renders other bytes and the same row the same bytes. It imports no torch: a replica starts in about
a second instead of the five to nine a real pipeline takes (img2dataset keeps a dummy writer for the same reason).
Reached through `pipeline.render(..., renderer_class=stand_in())`, or for a whole test module through the
`stand_in_renderer` fixture (tests/conftest.py), which also covers `fluxbatch` commands run in-process.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flux_worker.image_writer import ImageWriter, Rendered
from schemas import RenderOptions


class StandInRenderer:
    """Renders noise drawn from (prompt, seed, size, steps, guidance, reference images); one image per planned row,
    taking `seconds_per_image` (0: at once; a test that must act while a run is under way sets a few tenths)."""

    seconds_per_image = 0.0

    def __init__(self, model: dict[str, Any], options: RenderOptions):
        from flux_worker.cold_start import ColdStart
        from flux_worker.presets import model_revision, resolve_preset
        from schemas import ModelSpec

        self.start, self.run_id = ColdStart("cpu"), options.run_id  # the cold-start record a real renderer writes

        self.quality = options.quality
        spec = ModelSpec.model_validate(model)
        preset = resolve_preset(spec.name)  # the metadata names the model as the real renderer does
        self.writer = ImageWriter(options, device="cpu", identity={
            "model_id": preset.name, "model_revision": model_revision(preset, spec), "dtype": "float32"})
        self.start.model_loaded()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from flux_worker.best_of import Keeper, expand

        rows = batch.to_pylist()
        # Best-of-n as the real renderer does it (flux_worker/best_of.py), scored by StandInScorer.
        keeper = Keeper(self.quality, StandInScorer(self.quality.scores) if self.quality.scores else None)
        with self.start.first_call():
            result = self.writer.results(batch, keeper.outcomes((self._render(row) for row in expand(rows)), rows))
        self.start.after_batch(result, self.writer.fs, self.writer.root, self.run_id)
        return result

    def _render(self, row: dict[str, Any]) -> Rendered:
        from PIL import Image

        started_at, mark = datetime.now(timezone.utc), time.perf_counter()
        time.sleep(self.seconds_per_image)
        references = ",".join(ref["sha256"] for ref in row.get("reference_images") or ())  # as a Kontext model's
        what = (f"{row['prompt']}|{row['seed']}|{row['width']}x{row['height']}|{row['steps']}|{row['guidance']}|"
                f"{references}")
        # Noise, as random weights render: it does not compress, so an image costs disk as a real one does.
        noise = random.Random(hashlib.sha256(what.encode()).digest()).randbytes(row["width"] * row["height"] * 3)
        image = Image.frombytes("RGB", (row["width"], row["height"]), noise)
        return Rendered(row, image, time.perf_counter() - mark, started_at)


class StandInScorer:
    """Scores from the picture's bytes (no model): the same picture the same scores, another picture others."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def score(self, image: Any, prompt: str) -> dict[str, float]:
        digest = hashlib.sha256(image.tobytes() + prompt.encode()).digest()
        return {name: int.from_bytes(digest[i * 4:i * 4 + 4], "big") / 2**32 * 10 for i, name in enumerate(self.names)}


def member_classes(renderer: type, real: Any) -> Any:
    """`render_stage.in_actor` with the renderer's pool member replaced by `renderer` (tensor-parallel groups kept)."""
    from pipeline import render_stage

    return lambda target: renderer if target == render_stage.RENDERER else real(target)


def stand_in(seconds_per_image: float = 0.0) -> type:
    """The class to pass as `renderer_class`; shipped to the workers by value (tests/ is not on their path)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not seconds_per_image:
        return StandInRenderer
    return type("StandInRenderer", (StandInRenderer,), {"seconds_per_image": seconds_per_image})


class CardTypeStandIn(StandInRenderer):
    """A stand-in whose seconds per image depend on its node's card type (Ray's `accelerator_type:<T>` resource):
    a mixed fleet's pools at their own speeds (benchmarks/bench_mixed_fleet.py, tests/test_fleet.py)."""

    seconds_by_type: dict[str, float] = {}
    marks: str | None = None  # a folder: each batch rendered touches `<card type>-rendered` there

    def __init__(self, model: dict[str, Any], options: RenderOptions):
        import ray

        super().__init__(model, options)
        here = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == here)
        kinds = [name.split(":", 1)[1] for name in node["Resources"] if name.startswith("accelerator_type:")]
        self.card_type = kinds[0] if kinds else ""
        self.seconds_per_image = self.seconds_by_type.get(self.card_type, 0.0)

    wait_for: tuple[str, int] | None = None  # (card type, n): other types' members render n batches, then wait
    batches = 0  # for that type to have rendered one (its mark in `marks`), up to two minutes

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pathlib import Path

        if self.wait_for and self.card_type != self.wait_for[0] and self.batches >= self.wait_for[1]:
            mark, waited = Path(self.marks) / f"{self.wait_for[0]}-rendered", time.monotonic()
            while not mark.exists() and time.monotonic() - waited < 120:
                time.sleep(0.1)
        result = super().__call__(batch)
        self.batches += 1
        if self.marks:
            (Path(self.marks) / f"{self.card_type}-rendered").touch()
        return result


def stand_in_by_card_type(seconds: dict[str, float], marks: str | None = None,
                          wait_for: tuple[str, int] | None = None) -> type:
    """`stand_in`, with seconds per image per card type; `marks`: a folder where a batch leaves its card type;
    `wait_for`: see CardTypeStandIn (a test's run lasts until a type that joins late has rendered)."""
    stand_in()  # shipped by value, as stand_in's
    return type("StandInRenderer", (CardTypeStandIn,), {"seconds_by_type": dict(seconds), "marks": marks,
                                                        "wait_for": wait_for})
