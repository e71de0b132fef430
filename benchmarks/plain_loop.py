"""The baseline fluxbatch must match: load the pipeline once, render each manifest row, save a PNG locally.

    python benchmarks/plain_loop.py MODEL MANIFEST OUT_DIR

This is what a hand-written script does; it prints one JSON line: load seconds and loop seconds.
Each image uses the row's seed + variant on a CPU generator, as fluxbatch does, so pixels can be compared.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from diffusers import FluxPipeline


def load_pipeline(model: Path) -> tuple[FluxPipeline, int]:
    """The pipeline as a hand-written script loads it, and the text length its preset renders with."""
    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, json.loads((model / "fluxbatch_preset.json").read_text())["max_sequence_length"]


def main() -> int:
    model, manifest, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    pipe, max_seq = load_pipeline(model)
    load = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for row in pq.read_table(manifest).to_pylist():
        for variant in range(row.get("num_images") or 1):
            generator = torch.Generator("cpu").manual_seed(row["seed"] + variant)
            image = pipe(prompt=row["prompt"], width=row["width"], height=row["height"],
                         num_inference_steps=row["steps"], guidance_scale=3.5, max_sequence_length=max_seq,
                         generator=generator).images[0]
            image.save(out / f"{row['id']}-{variant}.png")
    print(json.dumps({"load": load, "loop": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
