"""Overhead: a plain diffusers loop against `fluxbatch render` with one replica, same rows, same model.

    .venv/bin/python benchmarks/bench_overhead.py --images 200

The bench-size offline model (about 0.2-0.5 s per image on 2 cores) makes fluxbatch's own costs (Ray,
planning, encoding, writing, the ledger) visible. Goal: fluxbatch >= 0.95 of the plain loop, steady state.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
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
    runs: dict[str, list[float]] = defaultdict(list)  # measure -> one value per round
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(work / "m.parquet", prompts(n))
        for round_ in range(args.rounds):  # interleaved, so a noisy minute hits both paths alike
            plain = plain_loop(model, manifest, work / f"plain-{round_}")
            wall, metadata = fluxbatch_render(manifest, str(work / f"fb-{round_}"), model)
            for measure, value in {"plain steady": n / plain["loop"], "plain all": n / plain["wall"],
                                   "plain wall": plain["wall"], "fb steady": steady_rate(metadata),
                                   "fb all": n / wall, "fb wall": wall}.items():
                runs[measure].append(value)
            print(f"round {round_ + 1}: steady ratio {runs['fb steady'][-1] / runs['plain steady'][-1]:.3f}",
                  file=sys.stderr)

    mid = {measure: median(values) for measure, values in runs.items()}
    ratios = [f / p for f, p in zip(runs["fb steady"], runs["plain steady"])]
    print(f"overhead, {n} images of {metadata.column('width')[0]}^2, {metadata.column('steps')[0]} steps, "
          f"median of {args.rounds} interleaved rounds; {machine()}")
    print(table(["path", "steady img/s", "with start-up img/s", "wall s", "steady img/s, rounds"], [
        ["plain diffusers loop", mid["plain steady"], mid["plain all"], mid["plain wall"],
         spread(runs["plain steady"])],
        ["fluxbatch render, 1 replica", mid["fb steady"], mid["fb all"], mid["fb wall"], spread(runs["fb steady"])],
        ["ratio fluxbatch / plain", mid["fb steady"] / mid["plain steady"], mid["fb all"] / mid["plain all"],
         "", f"per round {spread(ratios)}"],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
