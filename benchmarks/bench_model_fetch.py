"""A model URL on a cluster: bytes read from S3 per node, and the first vs the later renderers' load per node.

A `ray.cluster_utils.Cluster` of N simulated nodes (default 3), each with its own model cache folder (as each real
node has its own disk), runs R renderer actors per node (default 4), each loading the bench-size model from moto's
S3 server on loopback through the node cache (flux_worker/loading.py, model_cache.py), all at once. A counting
proxy in front of the server records every GET. Expected: the weights' bytes read N times (once per node),
whatever R is; on each node one actor downloads and the others wait on its lock, then load the local copy.

    .venv/bin/python benchmarks/bench_model_fetch.py [--nodes 3] [--renderers 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_model  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--renderers", type=int, default=4, help="renderer actors per node")
    args = parser.parse_args(argv)

    import logging

    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    from flux_worker.model_mirror import mirror
    from tests.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-model-fetch-"))
    model = bench_model(Path(".fluxbatch/models/bench"))
    weights = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs each request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(credentials, AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
    url = "s3://models/bench"
    mirror(str(model), url, say=lambda line: None)

    with FaultProxy(endpoint, failure_rate=0.0) as proxy:
        env = {**credentials, "AWS_ENDPOINT_URL": proxy.url}
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for index in range(args.nodes):
            cluster.add_node(num_cpus=args.renderers, resources={f"node{index}": args.renderers})
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Loader:
            def load(self, cache: str) -> tuple[float, float]:
                from flux_worker.loading import load_pipeline
                from schemas import ModelSpec

                start = time.time()
                load_pipeline(ModelSpec(name=url, cache_dir=cache))
                return start, time.time()

        loaders = [(node, Loader.options(resources={f"node{node}": 1}).remote())
                   for node in range(args.nodes) for _ in range(args.renderers)]
        started = time.time()
        times = ray.get([loader.load.remote(str(work / f"node{node}-cache")) for node, loader in loaders])
        wall = time.time() - started
        fetched = sum(size for method, path, size in proxy.log if method == "GET" and path.endswith(".safetensors"))
        for _, loader in loaders:  # their CPUs (and node resources) back
            ray.kill(loader)
        # Then one more renderer per node, alone: a warm node cache, no lock to wait on.
        later = ray.get([Loader.options(resources={f"node{node}": 1}).remote().load.remote(
            str(work / f"node{node}-cache")) for node in range(args.nodes)])
        ray.shutdown()
        cluster.shutdown()
    server.stop()

    read = sum(size for method, path, size in proxy.log if method == "GET" and path.endswith(".safetensors"))
    assert read == fetched  # the later renderers read no weights from S3
    print(f"model fetch: {args.nodes} nodes x {args.renderers} renderers, bench model ({weights / 2**20:.1f} MiB "
          f"of safetensors) on moto S3 through a counting proxy; wall {wall:.1f} s")
    print(f"safetensors bytes read from S3: {read} = {read / weights:.2f} x the model's ({weights})")
    print(f"| node | {args.renderers} at once, cold cache: slowest (s) | their median (s) | "
          "one more later, warm cache (s) |")
    print("| --- | --- | --- | --- |")
    for node in range(args.nodes):
        seconds = sorted(end - start for (n, _), (start, end) in zip(loaders, times) if n == node)
        print(f"| {node} | {seconds[-1]:.1f} | {statistics.median(seconds):.1f} | "
              f"{later[node][1] - later[node][0]:.1f} |")


if __name__ == "__main__":
    main()
