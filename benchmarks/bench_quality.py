"""What quality signals cost per image on CPU: the bench pipeline's render against each scorer and the hash.

    .venv/bin/python benchmarks/bench_quality.py [--images 8] [--threads 2] [--side 256] [--device cpu]

Builds offline (in a temporary folder): the bench FLUX.1 pipeline, a random-weight CLIP at two sizes (`bench`, and
`full`: openai/clip-vit-large-patch14's shapes, what a real job scores with) and the LAION-shaped aesthetic
predictor for each. Then, per image (median of `--images`): the render alone (the pipeline call, --steps steps),
`Scorers.score` with CLIP alone and with the aesthetic predictor too (flux_worker/scorers.py: one image at a time,
fp32, as the renderer scores), and `phash` (flux_worker/perceptual_hash.py). Best-of-n costs n renders and n
scorings per row kept. `--device cuda` measures the GPU row (weights made on the GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_worker.model_build import build_pipeline  # noqa: E402
from flux_worker.perceptual_hash import phash  # noqa: E402
from flux_worker.scorer_build import build_scorer  # noqa: E402
from flux_worker.scorers import Scorers  # noqa: E402
from schemas.quality import QualitySpec  # noqa: E402

PROMPTS = ["a lighthouse on a cliff at dawn", "a bowl of ramen, studio light", "a red fox in fresh snow",
           "an isometric city block at night"]


def median_seconds(work, repeats: int) -> float:
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        work(index)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    pipe = build_pipeline("bench").to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def render(index: int):
        generator = torch.Generator("cpu").manual_seed(index)
        return pipe(PROMPTS[index % len(PROMPTS)], width=args.side, height=args.side, num_inference_steps=args.steps,
                    guidance_scale=3.5, max_sequence_length=64, generator=generator).images[0]

    render(0)  # warm-up
    images = [render(i) for i in range(args.images)]
    rows = [("render (bench pipeline)", median_seconds(render, args.images))]
    with tempfile.TemporaryDirectory() as folder:
        for size in ("bench", "full"):
            clip = build_scorer(Path(folder) / f"clip-{size}", "clip", size)
            aesthetic = build_scorer(Path(folder) / f"aesthetic-{size}", "aesthetic", size)
            for name, quality in ((f"clip_score ({size} CLIP)", QualitySpec(clip=str(clip))),
                                  (f"clip_score + aesthetic_score ({size} CLIP)",
                                   QualitySpec(clip=str(clip), aesthetic=str(aesthetic)))):
                scorers = Scorers(quality, args.device)
                scorers.score(images[0], PROMPTS[0])  # warm-up; the prompt's text embedding is then cached
                rows.append((name, median_seconds(
                    lambda i, s=scorers: s.score(images[i % len(images)], PROMPTS[i % len(PROMPTS)]), args.images)))
    rows.append(("phash", median_seconds(lambda i: phash(images[i % len(images)]), args.images)))
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"{args.side}x{args.side}, {args.steps} steps, {device}, median of {args.images} images")
    print("| step | seconds per image |\n| --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
