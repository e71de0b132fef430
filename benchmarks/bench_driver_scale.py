"""Driver scale: read, validate, expand and plan a large manifest, resuming against many done keys.

    .venv/bin/python benchmarks/bench_driver_scale.py --rows 1000000 --done 500000

Prints seconds per stage and the peak resident memory of this process (ru_maxrss). No model, no Ray.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_worker.presets import ModelPreset  # noqa: E402
from pipeline.manifest import Manifest, read_manifest  # noqa: E402
from pipeline.plan import image_key, plan_images  # noqa: E402
from schemas import JobSpec  # noqa: E402

WORDS = "red blue green cat dog owl fox heron lighthouse forest city night dawn river mountain portrait".split()
PRESET = ModelPreset(name="bench", source="bench", steps=4, guidance=3.5, max_sequence_length=256, width=1024,
                     height=1024)


def write_manifest(path: Path, rows: int, bad_every: int, seed: int = 0) -> None:
    """`rows` rows like a bulk job's: an id, a prompt of a dozen words, a seed, a size on some rows, a
    carried column; every `bad_every`-th row breaks one rule."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(rows)]
    width = [None if i % 3 else 512 for i in range(rows)]
    steps = [None] * rows
    for i in range(0, rows, bad_every):
        width[i] = 500  # not a multiple of 16
    for i in range(bad_every // 2, rows, bad_every):
        steps[i] = 0
    table = pa.table({
        "id": [f"item-{i:08d}" for i in range(rows)],
        "prompt": prompts,
        "width": pa.array(width, pa.int64()),
        "height": pa.array(width, pa.int64()),
        "steps": pa.array(steps, pa.int64()),
        "seed": pa.array(range(rows), pa.int64()),
        "num_images": pa.array([1] * rows, pa.int64()),
        "shop": [f"shop-{i % 97}" for i in range(rows)],
    })
    pq.write_table(table, path, row_group_size=128 * 1024)


def ledger_rows(manifest: Manifest, job: JobSpec, done: set[str]) -> pa.Table:
    """The committed rows of `done` keys, with the render parameters the planner compares (none changed)."""
    import pyarrow.compute as pc

    table = plan_images(manifest, job, PRESET, None).table
    return table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(done), pa.string())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=500_000, help="keys already in the ledger")
    parser.add_argument("--bad-every", type=int, default=1000, help="one bad row in this many")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.parquet"
        write_manifest(path, args.rows, args.bad_every)
        done = {image_key(f"item-{i:08d}", 0) for i in range(args.done)}
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

        job = JobSpec.model_validate({"manifest": str(path), "output": {"uri": folder}})
        start = time.perf_counter()
        manifest = read_manifest(str(path), limits=PRESET.limits)
        read_s = time.perf_counter() - start
        committed = ledger_rows(manifest, job, done)  # untimed: what the ledger's columns read back as
        mark = time.perf_counter()
        plan = plan_images(manifest, job, PRESET, committed)
        plan_s = time.perf_counter() - mark
        total_s = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    bad = manifest.failures.rows
    print("| rows | bad rows | done keys | to render | read+validate s | expand+resume s | total s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {manifest.total_rows:,} | {bad:,} | {len(done):,} | {plan.table.num_rows:,} | {read_s:.1f} | "
          f"{plan_s:.1f} | {total_s:.1f} | {peak:.2f} (before reading: {base_rss:.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
