"""A mixed fleet: one job over two card types, each pool at its own shape and speed, all drawing from one plan.

A `ray.cluster_utils.Cluster` of simulated nodes: `--large-nodes` nodes of 8 "large" cards, `--small-nodes` nodes of 8
"small" cards (`accelerator_type:large|small` resources, fake GPUs). The job asks `gpus_per_replica: {large: 1,
small: 4}`: TP-1 replicas on the large cards, replicas of 4 cards on the small ones. The stand-in renderer
(tests/stand_in.py, `stand_in_by_card_type`) sleeps `--large-seconds` / `--small-seconds` per image, then writes a
real 64x64 image. Measured, from the ledger (each image's started_at, finished_at, render seconds and worker):

- every image once, with its file;
- each pool's busy fraction until its own last image (render seconds over replicas x span);
- the gap between the pools' last images, against one batch time of the slower pool;
- images/s over the render (first start to last finish) against the sum of the pools' own rates
  (replicas / seconds per image);
- how long a member waits between two batches (the driver's queue: pipeline/fleet_stage.py).

    .venv/bin/python benchmarks/bench_mixed_fleet.py [--work 60] [--remove-node-after 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fleet import ensure_model  # noqa: E402
from tests.stand_in import stand_in_by_card_type  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-nodes", type=int, default=2)
    parser.add_argument("--small-nodes", type=int, default=2)
    parser.add_argument("--large-seconds", type=float, default=0.3)
    parser.add_argument("--small-seconds", type=float, default=1.2)
    parser.add_argument("--small-degree", type=int, default=4)
    parser.add_argument("--work", type=float, default=60.0, help="seconds the whole fleet should need (default 60)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--remove-node-after", type=float, default=None, metavar="S",
                        help="remove one large node S seconds into the run")
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from pipeline import render
    from schemas import JobSpec
    from tests.helpers import assert_images_match_metadata

    large_replicas = 8 * args.large_nodes
    small_replicas = 8 * args.small_nodes // args.small_degree
    ideal = large_replicas / args.large_seconds + small_replicas / args.small_seconds
    images = int(ideal * args.work)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    large = [cluster.add_node(num_cpus=8, num_gpus=8, resources={"accelerator_type:large": 1})
             for _ in range(args.large_nodes)]
    for _ in range(args.small_nodes):
        cluster.add_node(num_cpus=8, num_gpus=8, resources={"accelerator_type:small": 1})
    folder = Path(tempfile.mkdtemp(prefix="bench-mixed-fleet-"))
    manifest = folder / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(images)], "prompt": [f"a lamp {i}" for i in range(images)],
                             "width": [64] * images, "height": [64] * images}), manifest)
    job = JobSpec.model_validate({
        "manifest": str(manifest), "output": {"uri": str(folder / "out")}, "model": {"name": str(ensure_model())},
        "gpus_per_replica": {"large": 1, "small": args.small_degree}, "batch_size": args.batch_size,
        "ray_address": cluster.address})
    timer = None
    if args.remove_node_after is not None:
        timer = threading.Timer(args.remove_node_after, lambda: cluster.remove_node(large[-1]))
        timer.start()
    try:
        summary = render(job, progress=False, renderer_class=stand_in_by_card_type(
            {"large": args.large_seconds, "small": args.small_seconds}))
    finally:
        if timer:
            timer.cancel()
        ray.shutdown()
        cluster.shutdown()

    table = assert_images_match_metadata(str(folder / "out"))  # each image once, with its file (raises otherwise)
    rows = table.select(["started_at", "finished_at"]).to_pylist()
    span = (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()
    pools = {pool.card_type: pool for pool in summary.pools}
    gap = abs((pools["large"].last_finished_at - pools["small"].last_finished_at).total_seconds())
    batch_time = args.batch_size * args.small_seconds
    removed = f", one large node removed at {args.remove_node_after:g} s" if timer else ""
    print(f"mixed fleet: {args.large_nodes} x 8 large (TP-1, {args.large_seconds} s/image) + {args.small_nodes} x 8 "
          f"small (TP-{args.small_degree}, {args.small_seconds} s/image), batch {args.batch_size}{removed}")
    print(f"images: {images} planned, {table.num_rows} in the ledger once each ({summary.images_failed} failed)")
    print("| pool | replicas | images | images/s | own rate (replicas / s per image) | busy until its last image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seconds in (("large", args.large_seconds), ("small", args.small_seconds)):
        pool = pools[name]
        print(f"| {name} | {pool.replicas} | {pool.images} | {pool.images_per_second:.1f} | "
              f"{pool.replicas / seconds:.1f} | {pool.busy:.3f} |")
    print(f"pools' last images {gap:.2f} s apart (one small batch: {batch_time:.1f} s)")
    print(f"images/s over the render: {table.num_rows / span:.1f} = {table.num_rows / span / ideal:.3f} of the pools' "
          f"own rates together ({ideal:.1f})")
    gaps = batch_gaps(table.select(["worker", "started_at", "finished_at"]).to_pylist())
    print(f"a member's wait between two batches: median {statistics.median(gaps) * 1000:.0f} ms, mean "
          f"{statistics.mean(gaps) * 1000:.0f} ms ({len(gaps)} waits)")


def batch_gaps(rows: list[dict]) -> list[float]:
    """Seconds each worker waited between one batch's last image and the next batch's first (the images of one
    batch follow each other at once: waits under 3 ms are within a batch)."""
    gaps = []
    for worker in {row["worker"] for row in rows}:
        mine = sorted((row for row in rows if row["worker"] == worker), key=lambda row: row["started_at"])
        gaps += [wait for a, b in zip(mine, mine[1:]) if (wait := (b["started_at"] - a["finished_at"]).total_seconds())
                 > 0.003]
    return gaps or [0.0]


if __name__ == "__main__":
    main()
