"""Fleet simulation: fluxbatch's real driver and Ray Data actor pool, against a stand-in renderer holding no model.

Each stand-in image (tests/stand_in.py) sleeps `--seconds` (the GPU's time for one image), then a 64x64 image
is encoded and written like a real one, through the same `ImageWriter` on the same threads, and its result row goes
back through Ray Data to the driver, which commits it to the ledger. Replicas reserve fake GPUs (one each), so the
pool is scheduled as on a GPU cluster. What it measures, per (replicas, seconds per image):

- images/s committed: images in the ledger over the render stage's wall time (pool start-up included), and
  steady (first image started to last image finished);
- GPU-busy fraction: replica-seconds sleeping (rendering) over replica-seconds alive, alive counted from each
  actor's constructor end (its cold-start record) to the last image finished;
- the driver's CPU (cores, averaged over the render) and peak memory (RSS);
- exactly once: every planned image in the metadata once, with its file.

Clusters: `local` (one node, fake GPUs: `ray.init(num_gpus=R)`), or `nodes` (`ray.cluster_utils.Cluster` of
`--nodes` simulated nodes on this machine, GPUs shared out). `--remove-node-after S` removes one worker node S
seconds into each run (`Cluster.remove_node`), killing its actors mid-batch.

    python benchmarks/bench_fleet.py --replicas 8 32 64 --seconds 0.7 3
    python benchmarks/bench_fleet.py --cluster nodes --nodes 4 --replicas 32 --seconds 0.7 --remove-node-after 15

The stand-in is reached only through `pipeline.run.render(..., renderer_class=...)`, a Python-API argument: no
flag or job field can make a user's render take it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.stand_in import stand_in  # noqa: E402  (the tests' stand-in renderer, sleeping --seconds per image)

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".fluxbatch" / "fleet-model"  # the tiny model: only pre-flight and the planner read it


def ensure_model() -> Path:
    if not (MODEL / "model_index.json").is_file():
        from flux_worker.model_build import build_model

        build_model(MODEL, "tiny")
    return MODEL


class Cluster:
    """The Ray cluster a series of runs shares: one node with fake GPUs, or several simulated nodes."""

    def __init__(self, kind: str, gpus: int, nodes: int, cpus_per_node: int | None = None):
        import ray

        self.kind, self.nodes, self.owned = kind, [], not ray.is_initialized()
        if not self.owned:  # a caller's cluster (the test's session cluster): use it as it is
            self.cluster = None
            return
        if kind == "local":
            ray.init(address="local", num_cpus=gpus + 4, num_gpus=gpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
            self.cluster = None
            return
        from ray.cluster_utils import Cluster as RayCluster

        self.cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
        per = -(-gpus // nodes)
        self.nodes = [self.cluster.add_node(num_cpus=cpus_per_node or per + 1, num_gpus=per) for _ in range(nodes)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level="ERROR")

    def remove_one_node_after(self, seconds: float) -> threading.Timer:
        def remove() -> None:
            node = self.nodes.pop()
            print(f"  removing a node ({seconds:.0f}s into the run)", file=sys.stderr)
            self.cluster.remove_node(node, allow_graceful=False)

        timer = threading.Timer(seconds, remove)
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        import ray

        if not self.owned:
            return
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


class DriverUsage:
    """The driver process's CPU seconds and peak RSS over a span (sampled: ru_maxrss holds the import's peak)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> DriverUsage:
        times = self.process.cpu_times()
        self.cpu0, self.wall0 = times.user + times.system, time.monotonic()
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        times = self.process.cpu_times()
        self.cores = (times.user + times.system - self.cpu0) / max(1e-9, time.monotonic() - self.wall0)


def run_one(cluster: Cluster, replicas: int, seconds: float, work: float, batch_size: int,
            remove_after: float | None, folder: Path) -> dict[str, Any]:
    """One fleet run: `replicas` stand-ins with about `work` seconds of images each."""
    from pipeline import render
    from schemas import JobSpec
    from tests.helpers import assert_images_match_metadata

    per_replica = max(batch_size, round(work / seconds))
    images = replicas * per_replica
    manifest = folder / f"m-{replicas}-{seconds}.parquet"
    pa_table = pa.table({"id": [f"r{i}" for i in range(images)], "prompt": ["a lamp"] * images,
                         "width": [64] * images, "height": [64] * images})
    pq.write_table(pa_table, manifest)
    out = folder / f"out-{replicas}-{seconds}"
    job = JobSpec.model_validate({"manifest": str(manifest), "output": {"uri": str(out)},
                                  "model": {"name": str(ensure_model())}, "replicas": replicas,
                                  "gpus_per_replica": 1, "batch_size": batch_size,
                                  "ray_address": cluster.cluster.address if cluster.cluster else None})
    timer = cluster.remove_one_node_after(remove_after) if remove_after is not None else None
    with DriverUsage() as usage:
        summary = render(job, progress=False, renderer_class=stand_in(seconds))
    if timer:
        timer.cancel()
    table = assert_images_match_metadata(str(out))  # each image once, with its file (raises otherwise)
    rows = table.select(["key", "render_seconds", "started_at", "finished_at", "worker"]).to_pylist()
    end = max(r["finished_at"] for r in rows)
    steady = len(rows) / max(1e-9, (end - min(r["started_at"] for r in rows)).total_seconds())
    alive = sum(max(0.0, (end - a.started_at).total_seconds() - a.process_start - a.model_load)
                for a in summary.actors)
    busy = sum(r["render_seconds"] for r in rows)
    last: dict[str, Any] = {}
    for r in rows:
        last[r["worker"]] = max(last.get(r["worker"], r["finished_at"]), r["finished_at"])
    tail = sum((end - finished).total_seconds() for finished in last.values())  # idle after a replica's last image
    return {
        "replicas": replicas, "s/image": seconds, "images": images,
        "committed": f"{summary.images_rendered}/{images}" + ("" if len(rows) == images else " LOST"),
        "render s": round(summary.seconds.get("render", 0.0), 1),
        "img/s committed": round(summary.images_per_second, 1), "img/s steady": round(steady, 1),
        "ideal img/s": round(replicas / seconds, 1),
        "GPU-busy": round(busy / alive, 3) if alive else None, "idle at the end": round(tail / alive, 3) if alive
        else None, "actors": len(summary.actors),
        "driver cores": round(usage.cores, 2), "driver peak RSS MiB": round(usage.peak / 2**20),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", choices=["local", "nodes"], default="local")
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes (--cluster nodes)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seconds", type=float, nargs="+", default=[0.7, 3.0], help="sleep per image")
    parser.add_argument("--work", type=float, default=30.0, help="seconds of images per replica (default 30)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--remove-node-after", type=float, default=None, metavar="S",
                        help="remove one simulated node S seconds into each run (--cluster nodes)")
    args = parser.parse_args(argv)
    if args.remove_node_after is not None and args.cluster != "nodes":
        parser.error("--remove-node-after needs --cluster nodes")
    ensure_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for replicas in args.replicas:
            # A fresh cluster per pool size: the nodes' fake GPUs are the pool's, and a removed node stays gone.
            for seconds in args.seconds:
                cluster = Cluster(args.cluster, replicas, args.nodes)
                try:
                    row = run_one(cluster, replicas, seconds, args.work, args.batch_size, args.remove_node_after,
                                  Path(tmp))
                finally:
                    cluster.close()
                row = {"cluster": args.cluster if args.cluster == "local" else f"{args.nodes} nodes", **row}
                print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
                rows.append(row)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
