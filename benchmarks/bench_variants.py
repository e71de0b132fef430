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
from statistics import median  # of a few rounds: single runs on a shared VM move by 20%

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    SIDE,
    STEPS,
    add_rounds_flag,
    bench_model,
    fluxbatch_render,
    machine,
    plain_loop,
    prompts,
    spread,
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


def encoding_share(model: Path, samples: int = 8) -> tuple[float, float]:
    """Seconds to encode one prompt and to render one image (encoding included), in this process.

    Their ratio bounds what the embedding cache can save: with V variants per prompt it skips (V-1)/V of
    the encodings, so the best speed-up is 1 / (1 - share * (V-1)/V).
    """
    import time

    import torch

    from benchmarks.plain_loop import load_pipeline

    pipe, max_seq = load_pipeline(model)
    texts = prompts(samples)
    with torch.inference_mode():
        pipe(prompt=texts[0], width=SIDE, height=SIDE, num_inference_steps=STEPS, max_sequence_length=max_seq)
        start = time.perf_counter()
        for text in texts:
            pipe.encode_prompt(prompt=[text], prompt_2=None, max_sequence_length=max_seq)
        encode = (time.perf_counter() - start) / samples
        start = time.perf_counter()
        for text in texts:
            pipe(prompt=text, width=SIDE, height=SIDE, num_inference_steps=STEPS, max_sequence_length=max_seq)
        image = (time.perf_counter() - start) / samples
    return encode, image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--model", type=Path, default=Path(".fluxbatch/bench-model"), help="built if missing")
    add_rounds_flag(parser)
    args = parser.parse_args(argv)

    model = bench_model(args.model)
    n = args.prompts * args.variants
    batch = ["--batch-size", str(args.variants)]
    rates: dict[str, list[float]] = {"plain": [], "invariant": [], "batched": []}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(work / "m.parquet", prompts(args.prompts), num_images=args.variants)
        for round_ in range(args.rounds):  # interleaved, so a noisy minute hits every path alike
            plain = plain_loop(model, manifest, work / f"plain-{round_}")
            _, invariant = fluxbatch_render(manifest, str(work / f"inv-{round_}"), model, *batch)
            _, batched = fluxbatch_render(manifest, str(work / f"bat-{round_}"), model, *batch,
                                          "--no-batch-invariant")
            rates["plain"].append(n / plain["loop"])
            rates["invariant"].append(steady_rate(invariant))
            rates["batched"].append(steady_rate(batched))
        equal_inv = same_pixels(invariant, work / f"plain-{round_}")
        equal_bat = same_pixels(batched, work / f"plain-{round_}")
    encode, image = encoding_share(model)

    base = median(rates["plain"])
    share = encode / image
    best = 1 / (1 - share * (args.variants - 1) / args.variants)
    print(f"variants, {args.prompts} prompts x {args.variants} images, median of {args.rounds} interleaved "
          f"rounds; {machine()}")
    print(table(["path", "steady img/s", "x plain loop", "steady img/s, rounds", "pixels equal to the plain loop"], [
        ["plain loop (encodes every image's prompt)", base, 1.0, spread(rates["plain"]), "-"],
        ["fluxbatch, cache, batch-invariant", median(rates["invariant"]), median(rates["invariant"]) / base,
         spread(rates["invariant"]), f"{equal_inv[0]}/{equal_inv[1]}"],
        ["fluxbatch, cache, batched by shape", median(rates["batched"]), median(rates["batched"]) / base,
         spread(rates["batched"]), f"{equal_bat[0]}/{equal_bat[1]}"],
    ]))
    print(f"\nprompt encoding: {encode * 1000:.1f} ms of {image * 1000:.1f} ms per image ({share:.1%}); "
          f"the most a cache can gain with {args.variants} variants: {best:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
