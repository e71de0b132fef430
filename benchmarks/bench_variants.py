"""Variants: 50 prompts with 4 images each. The plain loop encodes the prompt for every image; fluxbatch
encodes each prompt once (its embedding cache) and, with batching on, renders same-shape rows together.

    .venv/bin/python benchmarks/bench_variants.py --prompts 50 --variants 4

Goal: fluxbatch >= 1.3x the plain per-image loop, and images identical to the uncached path (the
batch-invariant run is compared pixel for pixel with the plain loop, which caches nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_model,
    fluxbatch_render,
    machine,
    plain_loop,
    prompts,
    steady_rate,
    table,
    write_manifest,
)


def same_pixels(metadata, plain_dir: Path) -> tuple[int, int]:
    """How many of fluxbatch's images equal the plain loop's pixel for pixel, of how many."""
    equal = 0
    for row in metadata.to_pylist():
        theirs = plain_dir / f"{row['request_id']}-{row['variant']}.png"
        with Image.open(row["image_uri"]) as a, Image.open(theirs) as b:
            equal += bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return equal, metadata.num_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--model", type=Path, default=Path(".fluxbatch/bench-model"), help="built if missing")
    args = parser.parse_args(argv)

    model = bench_model(args.model)
    n = args.prompts * args.variants
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(work / "m.parquet", prompts(args.prompts), num_images=args.variants)
        plain = plain_loop(model, manifest, work / "plain")
        _, invariant = fluxbatch_render(manifest, str(work / "inv"), model, "--batch-size", str(args.variants))
        _, batched = fluxbatch_render(manifest, str(work / "bat"), model, "--batch-size", str(args.variants),
                                      "--no-batch-invariant")
        equal_inv = same_pixels(invariant, work / "plain")
        equal_bat = same_pixels(batched, work / "plain")

    base = n / plain["loop"]
    print(f"variants, {args.prompts} prompts x {args.variants} images; {machine()}")
    print(table(["path", "steady img/s", "x plain loop", "pixels equal to the plain loop"], [
        ["plain loop (encodes every image's prompt)", base, 1.0, "-"],
        ["fluxbatch, cache, batch-invariant", steady_rate(invariant), steady_rate(invariant) / base,
         f"{equal_inv[0]}/{equal_inv[1]}"],
        ["fluxbatch, cache, batched by shape", steady_rate(batched), steady_rate(batched) / base,
         f"{equal_bat[0]}/{equal_bat[1]}"],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
