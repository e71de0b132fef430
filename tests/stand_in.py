"""A renderer that holds no model, for tests of the driver (lease, ledger, resume, refusals, layouts).

It takes `Renderer`'s constructor arguments and writes each image through the real `ImageWriter`, so paths,
ledger rows and sha256 are the real ones; the picture is a solid colour drawn from the render parameters, so an
edited row renders other bytes and the same row the same bytes. It imports no torch: a replica starts in about
a second instead of the five to nine a real pipeline takes (img2dataset keeps a dummy writer for the same reason).
Reached only through `pipeline.render(..., renderer_class=stand_in())`.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flux_worker.image_writer import ImageWriter, Rendered


class StandInRenderer:
    """Renders a solid colour per (prompt, seed, size, steps, guidance); one image per planned row."""

    def __init__(self, model: dict[str, Any], output_uri: str, storage_options: dict[str, Any] | None = None, *,
                 jpeg_quality: int = 95, webp_quality: int = 95, **_: Any):
        self.writer = ImageWriter(output_uri, storage_options, jpeg_quality=jpeg_quality, webp_quality=webp_quality,
                                  write_threads=2, device="cpu",
                                  identity={"model_id": "stand-in", "model_revision": "none", "dtype": "fp32"})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.writer.results(batch, (self._render(row) for row in batch.to_pylist()))

    @staticmethod
    def _render(row: dict[str, Any]) -> Rendered:
        from PIL import Image

        started_at = datetime.now(timezone.utc)
        what = f"{row['prompt']}|{row['seed']}|{row['width']}x{row['height']}|{row['steps']}|{row['guidance']}"
        colour = tuple(hashlib.sha256(what.encode()).digest()[:3])
        return Rendered(row, Image.new("RGB", (row["width"], row["height"]), colour), 0.0, started_at)


def stand_in() -> type:
    """The class to pass as `renderer_class`; shipped to the workers by value (tests/ is not on their path)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return StandInRenderer
