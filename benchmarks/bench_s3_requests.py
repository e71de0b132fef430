"""S3 requests per run: how many requests of each kind fluxbatch makes on an S3 OUTPUT, as the store sees them.

    .venv/bin/python benchmarks/bench_s3_requests.py --images 2000

Every HTTP request that reaches moto's S3 server (on loopback, in this process) is logged by a WSGI middleware
wrapped around moto's app: its method, bucket, key and query. The benchmark's own requests (making the bucket)
are left out, and the manifests are on local disk, so what is counted is the driver's and the renderers' traffic
alone, retries included. Renders use the tests' stand-in renderer (tests/stand_in.py: no model, each image
written through the real `ImageWriter`), so a run takes seconds; requests, not pixels, are what is measured.
Images are 64x64: any image under s3fs's multipart threshold (100 MiB) is one PUT, so their size changes no count.
Job settings are the defaults (one replica, batch_size 4, commit_seconds 30).

Cases, each one `pipeline.render` of a manifest of N images (one image per row):
1. fresh: into an empty OUTPUT;
2. no-op: the same manifest again into the same OUTPUT, nothing left to render;
3. resume: into a second OUTPUT, where a first run rendered the manifest's first N/2 rows and ended (that run is
   setup and not counted), the whole manifest: the run finds N/2 images done and renders the other N/2. A
   driver killed part way would leave a little more behind (a stale lease to take over, images written after
   its last commit, which the next run renders and puts again); this is the clean case: what a run asks of the
   store to find the work done and finish the rest.
"per 1,000 images" is a run's total over the manifest's N images, rendered or found done.

Kinds, by what S3 bills: LIST is a GET on the bucket with no key (ListObjects, ListObjectsV2, with or without
prefix, delimiter, list-type); HEAD, DELETE (a POST ?delete, DeleteObjects, counts as one DELETE) and GET (an
object, or any other GET) as their methods; PUT (an object, or a multipart part); COPY (a PUT with
x-amz-copy-source) and POST (multipart start and end) get columns of their own when they occur.

Prices: S3 Standard, US East (N. Virginia), from https://aws.amazon.com/s3/pricing/ as quoted in issue 25 (read
2026-12-05): PUT, COPY, POST, LIST $0.005 per 1,000 requests; GET, SELECT and all other requests (HEAD among
them) $0.0004 per 1,000; DELETE free. The cases also run at N/2 images, so the dollar table can take each kind
as a fixed part per run plus a part per image (the straight line through both sizes): a million-image run pays
its per-run requests once, not 500 times.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_storage import free_port  # noqa: E402
from benchmarks.common import ROOT, machine, prompts, table  # noqa: E402

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
SIDE = 64  # pixels; see the docstring: the size changes no count
MODEL = ROOT / ".fluxbatch" / "fleet-model"  # the tiny model: only pre-flight and the planner read it

KINDS = ("PUT", "GET", "LIST", "HEAD", "DELETE")
RARE = ("COPY", "POST")  # a column each only when a run made one
# What S3 Standard bills per 1,000 requests in us-east-1 (aws.amazon.com/s3/pricing, quoted in issue 25, 2026-12-05).
PRICE_PER_1000 = {"PUT": 0.005, "COPY": 0.005, "POST": 0.005, "LIST": 0.005, "GET": 0.0004, "HEAD": 0.0004,
                  "DELETE": 0.0}
PRICES = ("S3 Standard, us-east-1 (https://aws.amazon.com/s3/pricing/, as quoted in issue 25, read 2026-12-05): "
          "PUT, COPY, POST, LIST $0.005 per 1,000 requests; GET, SELECT and all other requests (HEAD) $0.0004 per "
          "1,000; DELETE free")
LIST_QUERY = {"list-type", "prefix", "delimiter", "marker", "continuation-token", "max-keys", "start-after",
              "uploads", "versions"}
CASES = ("fresh", "no-op", "resume")
CASE_NAMES = {"fresh": "fresh run", "no-op": "no-op re-run", "resume": "resume (first half done)"}


@dataclass(frozen=True)
class Request:
    """One HTTP request as moto's server received it."""

    method: str
    bucket: str
    key: str
    query: dict[str, list[str]]
    copy: bool  # a PUT with x-amz-copy-source: CopyObject or UploadPartCopy
    status: int

    @property
    def kind(self) -> str:
        """The request's kind as S3 bills it (see the module docstring)."""
        if self.method in ("HEAD", "DELETE"):
            return self.method
        if self.method == "POST":
            return "DELETE" if "delete" in self.query else "POST"
        if self.method == "PUT":
            return "COPY" if self.copy else "PUT"
        if self.method == "GET" and not self.key and (not self.query or self.query.keys() & LIST_QUERY):
            return "LIST"
        return "GET" if self.method == "GET" else self.method

    def where(self, root: str) -> str:
        """The name at the top of OUTPUT (`root`, its key prefix) the request is about: `images` for an image,
        the folder's probe or its listing alike; `_job.json` for the file, or the listing that asks whether a
        missing one is a folder."""
        path = self.key or self.query.get("prefix", [""])[0]
        if path.rstrip("/") == root:
            return "OUTPUT itself"
        if not path.startswith(root + "/"):
            return f"outside OUTPUT: {path or '(bucket)'}"
        first = path[len(root) + 1:].split("/", 1)[0]
        return first.split(".fluxbatch-tmp-")[0]  # pre-flight's probe: a temp name of its own


class RequestLog:
    """WSGI middleware around moto's app: records each request it passes on (method, path, query, status)."""

    def __init__(self, app: Any):
        self.app = app
        self._requests: list[Request] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        status: list[int] = []

        def start(line: str, headers: list, exc_info: Any = None) -> Any:
            status.append(int(line.split()[0]))
            return start_response(line, headers, exc_info)

        body = self.app(environ, start)
        bucket, key = _bucket_and_key(environ)
        request = Request(environ["REQUEST_METHOD"], bucket, key,
                          parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
                          "HTTP_X_AMZ_COPY_SOURCE" in environ, status[0] if status else 0)
        with self._lock:
            self._requests.append(request)
        return body

    def take(self) -> list[Request]:
        """The requests logged since the last call."""
        with self._lock:
            taken, self._requests = self._requests, []
        return taken


def _bucket_and_key(environ: dict[str, Any]) -> tuple[str, str]:
    """Path-style (`/bucket/key`, what boto uses for an IP endpoint) or virtual-hosted (`bucket.host`)."""
    path = environ.get("PATH_INFO", "").lstrip("/")
    host = environ.get("HTTP_HOST", "").split(":")[0]
    if host and not host.replace(".", "").isdigit() and host != "localhost" and "." in host:
        return host.split(".", 1)[0], path
    bucket, _, key = path.partition("/")
    return bucket, key


def write_manifest(path: Path, count: int) -> Path:
    """`count` rows of one 64x64 image each, ids and seeds fixed, so the half manifest is the full one's head."""
    rows = [{"id": f"row-{i:06d}", "prompt": p, "width": SIDE, "height": SIDE, "seed": 1000 + i}
            for i, p in enumerate(prompts(count))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def ensure_model(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        from flux_worker.model_build import build_model

        build_model(folder, "tiny")
    return folder


def render_counted(log: RequestLog, manifest: Path, output: str, model: Path) -> tuple[list[Request], Any, float]:
    """One `pipeline.render` with the stand-in renderer; the requests it made, its summary and its wall seconds."""
    from pipeline import render
    from schemas import JobSpec
    from tests.stand_in import stand_in

    job = JobSpec.model_validate({"manifest": str(manifest), "output": {"uri": output},
                                  "model": {"name": str(model)}, "replicas": 1})
    log.take()  # whatever came before (setup) is not this run's
    start = time.perf_counter()
    summary = render(job, progress=False, renderer_class=stand_in())
    wall = time.perf_counter() - start
    return log.take(), summary, wall


def run_cases(log: RequestLog, images: int, folder: Path, model: Path) -> dict[str, dict[str, Any]]:
    """The three cases at `images` images; per case its requests, summary and wall seconds."""
    full = write_manifest(folder / f"m-{images}.parquet", images)
    half = write_manifest(folder / f"m-{images}-half.parquet", images // 2)
    out, resumed = f"s3://{BUCKET}/fresh-{images}", f"s3://{BUCKET}/resume-{images}"
    cases: dict[str, dict[str, Any]] = {}
    for case, manifest, output in (("fresh", full, out), ("no-op", full, out), ("first half", half, resumed),
                                   ("resume", full, resumed)):
        requests, summary, wall = render_counted(log, manifest, output, model)
        cases[case] = {"requests": requests, "summary": summary, "wall": wall, "root": output.split("/", 3)[3]}
        print(f"  {images} images, {case}: {len(requests)} requests, {summary.images_rendered} rendered, "
              f"{summary.images_already_done} already done, {wall:.1f} s", file=sys.stderr)
    done = {case: (cases[case]["summary"].images_rendered, cases[case]["summary"].images_already_done)
            for case in CASES}
    expected = {"fresh": (images, 0), "no-op": (0, images), "resume": (images - images // 2, images // 2)}
    assert done == expected, f"the cases did not do what they are named for: {done}, expected {expected}"
    return cases


def counts(requests: list[Request]) -> Counter[str]:
    return Counter(request.kind for request in requests)


def code_version() -> str:
    """The commit measured, for the README's record."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}" + (" with uncommitted changes" if changed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images in the manifest (even; the cases also "
                        "run at half this, for the dollar table's fixed and per-image parts)")
    parser.add_argument("--model", type=Path, default=MODEL, help="the tiny model, built if missing")
    args = parser.parse_args(argv)
    if args.images < 8 or args.images % 4:
        parser.error("--images must be a multiple of 4, at least 8 (the cases also run at half of it)")

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    started = time.perf_counter()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request on stderr otherwise
    model = ensure_model(args.model)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    log = RequestLog(server._server.app)  # werkzeug's server calls `.app` for each request
    server._server.app = log
    endpoint = f"http://127.0.0.1:{server._port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):  # this machine's own, not the bench's
        os.environ.pop(name, None)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS})  # the driver's; render passes them to workers
    sizes = (args.images // 2, args.images)
    measured: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        # One local cluster for every run, as the tests' (4 logical CPUs: the actor and Ray Data's tasks side by side).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        with tempfile.TemporaryDirectory() as folder:
            for images in sizes:
                measured[images] = run_cases(log, images, Path(folder), model)
    finally:
        ray.shutdown()
        server.stop()

    print_results(measured, sizes, time.perf_counter() - started)
    return 0


def print_results(measured: dict[int, dict[str, dict[str, Any]]], sizes: tuple[int, int], seconds: float) -> None:
    images = sizes[1]
    cases = measured[images]
    seen = Counter()
    for at in measured.values():
        for case in CASES:
            seen.update(counts(at[case]["requests"]))
    kinds = [*KINDS, *(kind for kind in RARE if seen[kind])]
    other = sorted(set(seen) - set(kinds))
    assert not other, f"requests of no known kind: {other}"

    print(f"S3 requests per run, {images:,} images (one per manifest row), stand-in renderer, moto S3 on loopback; "
          f"{code_version()}; {machine()}; {seconds:.0f} s in all")
    print()
    rows = []
    for case in CASES:
        count = counts(cases[case]["requests"])
        total = sum(count.values())
        rows.append([CASE_NAMES[case], *(count[kind] for kind in kinds), total, f"{1000 * total / images:.1f}"])
    print(table(["case", *kinds, "total", "per 1,000 images"], rows))
    print()

    # Dollars per million images: each kind as fixed-per-run + per-image, the straight line through the two sizes.
    small, large = sizes
    print(f"Dollars per million images (each count taken as a fixed part per run plus a part per image, the line "
          f"through {small:,} and {large:,} images); {PRICES}")
    print()
    rows = []
    for case in CASES:
        low, high = counts(measured[small][case]["requests"]), counts(measured[large][case]["requests"])
        per_million = {kind: max(0.0, high[kind] + (high[kind] - low[kind]) / (large - small) * (1_000_000 - large))
                       for kind in kinds}
        fixed = sum(high[kind] - (high[kind] - low[kind]) / (large - small) * large for kind in kinds)
        put_tier = sum(n for kind, n in per_million.items() if PRICE_PER_1000[kind] == 0.005)
        get_tier = sum(n for kind, n in per_million.items() if PRICE_PER_1000[kind] == 0.0004)
        dollars = {tier: sum(n * PRICE_PER_1000[kind] / 1000 for kind, n in per_million.items()
                             if PRICE_PER_1000[kind] == tier) for tier in (0.005, 0.0004)}
        rows.append([CASE_NAMES[case], f"{fixed:,.0f}", f"{put_tier:,.0f}", f"{get_tier:,.0f}",
                     f"{per_million['DELETE']:,.0f}", f"${dollars[0.005]:.3f}", f"${dollars[0.0004]:.4f}",
                     f"${dollars[0.005] + dollars[0.0004]:.3f}"])
    print(table(["case", "requests per run (fixed part)", "PUT, COPY, POST, LIST per million images",
                 "GET, HEAD per million images", "DELETE per million images", "$ PUT-tier", "$ GET-tier",
                 "$ per million images"], rows))
    print()

    print(f"Where the requests of the {images:,}-image cases go, by the name at the top of OUTPUT they are about "
          "(an object, or a listing by its prefix)")
    print()
    rows = []
    for case in CASES:
        root = cases[case]["root"]
        by_place: dict[str, Counter[str]] = {}
        for request in cases[case]["requests"]:
            by_place.setdefault(request.where(root), Counter())[request.kind] += 1
        for place, count in sorted(by_place.items(), key=lambda item: -sum(item[1].values())):
            rows.append([CASE_NAMES[case], f"`{place}`", *(count[kind] or "" for kind in kinds)])
    print(table(["case", "where", *kinds], rows))
    misses = Counter((CASE_NAMES[case], request.kind) for case in CASES for request in cases[case]["requests"]
                     if request.status == 404)
    if misses:
        print()
        print("of those, answered 404 (an `exists` that found nothing, a lease not there yet): "
              + "; ".join(f"{case}: {n} {kind}" for (case, kind), n in sorted(misses.items())))


if __name__ == "__main__":
    raise SystemExit(main())
