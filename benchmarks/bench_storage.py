"""Storage: the same job written to S3 (moto's server on loopback) and to local disk.

    .venv/bin/python benchmarks/bench_storage.py --images 100

Images are encoded and uploaded on the renderer's write threads while the next image renders.
Goal: S3 >= 0.9 of local, steady state.
"""

from __future__ import annotations

import argparse
import socket
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
    prompts,
    spread,
    steady_rate,
    table,
    write_manifest,
)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--model", type=Path, default=Path(".fluxbatch/bench-model"), help="built if missing")
    add_rounds_flag(parser)
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    model = bench_model(args.model)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    runs: dict[str, list[float]] = defaultdict(list)  # measure -> one value per round
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench-key", aws_secret_access_key="bench-secret",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            manifest = write_manifest(work / "m.parquet", prompts(args.images))
            for round_ in range(args.rounds):  # interleaved, so a noisy minute hits both outputs alike
                for output, target, target_env in (("local", str(work / f"out-{round_}"), None),
                                                   ("s3", f"s3://bench/run-{round_}", env)):
                    wall, metadata = fluxbatch_render(manifest, target, model, env=target_env)
                    runs[output].append(steady_rate(metadata))
                    runs[f"{output} wall"].append(wall)
    finally:
        server.stop()

    print(f"storage, {args.images} images; moto S3 on loopback, median of {args.rounds} interleaved rounds; "
          f"{machine()}")
    print(table(["output", "steady img/s", "wall s", "x local", "steady img/s, rounds"], [
        ["local disk", median(runs["local"]), median(runs["local wall"]), 1.0, spread(runs["local"])],
        ["S3 (moto, loopback)", median(runs["s3"]), median(runs["s3 wall"]), median(runs["s3"]) / median(runs["local"]),
         spread(runs["s3"])],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
