"""Overhead: a plain diffusers loop against `fluxbatch render` with one replica, same rows, same model.

    .venv/bin/python benchmarks/bench_overhead.py --images 200

The bench-size offline model (about 0.2-0.5 s per image on 2 cores) makes fluxbatch's own costs (Ray,
planning, encoding, writing, the ledger) visible. Goal: fluxbatch >= 0.95 of the plain loop, steady state.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import median  # of a few rounds: single runs on a shared VM move by 20%

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model", type=Path, default=Path(".fluxbatch/bench-model"), help="built if missing")
    add_rounds_flag(parser)
    args = parser.parse_args(argv)

    model = bench_model(args.model)
    n = args.images
    plain_steady, plain_all, plain_wall, fb_steady, fb_all, fb_wall = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(work / "m.parquet", prompts(n))
        for round_ in range(args.rounds):  # interleaved, so a noisy minute hits both paths alike
            plain = plain_loop(model, manifest, work / f"plain-{round_}")
            wall, metadata = fluxbatch_render(manifest, str(work / f"fb-{round_}"), model)
            plain_steady.append(n / plain["loop"])
            plain_all.append(n / plain["wall"])
            plain_wall.append(plain["wall"])
            fb_steady.append(steady_rate(metadata))
            fb_all.append(n / wall)
            fb_wall.append(wall)
            print(f"round {round_ + 1}: steady ratio {fb_steady[-1] / plain_steady[-1]:.3f}", file=sys.stderr)

    ratios = [f / p for f, p in zip(fb_steady, plain_steady)]
    print(f"overhead, {n} images of {metadata.column('width')[0]}^2, {metadata.column('steps')[0]} steps, "
          f"median of {args.rounds} interleaved rounds; {machine()}")
    print(table(["path", "steady img/s", "with start-up img/s", "wall s", "steady img/s, rounds"], [
        ["plain diffusers loop", median(plain_steady), median(plain_all), median(plain_wall), spread(plain_steady)],
        ["fluxbatch render, 1 replica", median(fb_steady), median(fb_all), median(fb_wall), spread(fb_steady)],
        ["ratio fluxbatch / plain", median(fb_steady) / median(plain_steady), median(fb_all) / median(plain_all),
         "", f"per round {spread(ratios)}"],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
