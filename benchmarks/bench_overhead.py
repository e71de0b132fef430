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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model", type=Path, default=Path(".fluxbatch/bench-model"), help="built if missing")
    args = parser.parse_args(argv)

    model = bench_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(work / "m.parquet", prompts(args.images))
        plain = plain_loop(model, manifest, work / "plain")
        wall, metadata = fluxbatch_render(manifest, str(work / "fb"), model)

    n = args.images
    plain_steady, fb_steady = n / plain["loop"], steady_rate(metadata)
    plain_all, fb_all = n / plain["wall"], n / wall
    print(f"overhead, {n} images of {metadata.column('width')[0]}^2, {metadata.column('steps')[0]} steps; "
          f"{machine()}")
    print(table(["path", "steady img/s", "with start-up img/s", "wall s"], [
        ["plain diffusers loop", plain_steady, plain_all, plain["wall"]],
        ["fluxbatch render, 1 replica", fb_steady, fb_all, wall],
        ["ratio fluxbatch / plain", fb_steady / plain_steady, fb_all / plain_all, ""],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
