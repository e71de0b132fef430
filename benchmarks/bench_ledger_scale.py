"""Ledger scale: a run's start, its plan, `verify`, `validate` and compaction over 1M-10M committed rows.

    .venv/bin/python benchmarks/bench_ledger_scale.py --rows 1000000 --parts 10 10000
    .venv/bin/python benchmarks/bench_ledger_scale.py --rows 10000000 --parts 10 --manifest-rows 10000000
    .venv/bin/python benchmarks/bench_ledger_scale.py --rows 1000000 --parts 10000 --store s3
    .venv/bin/python benchmarks/bench_ledger_scale.py --rows 1000000 --parts 10000 --code /tmp/old  # older code
    .venv/bin/python benchmarks/bench_ledger_scale.py --year

No model, no Ray. The ledger is built directly, as runs would leave it: a manifest of `--manifest-rows` rows like a
bulk job's (default: twice `--rows`), whose first `--rows` images are committed in `--parts` parts. Each measure
runs in a fresh Python process, so its peak RSS (VmHWM) is its own; `--code DIR` runs the measures with the
fluxbatch of another checkout (`git worktree add /tmp/old <commit>`), for before and after.

- start: what a run does before planning: read the ledger's columns (changed_rows.read_committed) and find the
  committed keys whose image is missing (committed_images.stale_keys);
- plan: `start`, plus reading and validating the manifest and planning the images left (the run's whole start);
- validate: reading and validating the manifest alone (`fluxbatch validate`);
- verify: `fluxbatch verify`'s ledger side: every part read, one row per key, duplicates, the join with the
  images; images are not hashed (their reads are I/O, one per image, HASH_THREADS at a time);
- compact: `fluxbatch compact`, then `start` again on the compacted ledger.
Ten million image files cannot be made here, so the listing of images/ is given to the measures as the table
(or, for older code, the mapping) that listing them would return, built from the ledger: every image present.

`--year`: a daily catalog job for a year: 365 runs of 300 images (half of them re-renders of changed products),
one metadata part each, a run folder each; the run start of day 1 and day 365, with compaction and retention as a
run does them at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("start", "plan", "validate", "verify", "compact")


def build(folder: Path, rows: int, parts: int, manifest_rows: int) -> None:
    """A manifest of `manifest_rows` rows and a ledger of its first `rows` images in `parts` parts under
    folder/out, plus folder/listing.parquet (what listing images/ returns: path, size)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from benchmarks.bench_driver_scale import PRESET, WORDS
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_images
    from schemas import JobSpec

    rng = np.random.default_rng(0)
    words = pa.array(WORDS)
    prompts = pc.binary_join_element_wise(*[words.take(pa.array(rng.integers(0, len(WORDS), manifest_rows)))
                                            for _ in range(12)], " ")
    numbers = pc.utf8_lpad(pc.cast(pa.array(np.arange(manifest_rows)), pa.string()), 9, "0")
    manifest = pa.table({
        "id": pc.binary_join_element_wise("item-", numbers, ""),
        "prompt": prompts,
        "seed": pa.array(np.arange(manifest_rows)),
        "shop": pc.binary_join_element_wise("shop-", pc.cast(pa.array(np.arange(manifest_rows) % 97), pa.string()), ""),
    })
    pq.write_table(manifest, folder / "manifest.parquet", row_group_size=128 * 1024)
    del manifest, prompts
    job = JobSpec.model_validate({"manifest": str(folder / "manifest.parquet"), "output": {"uri": str(folder / "out")}})
    planned = plan_images(read_manifest(str(folder / "manifest.parquet"), limits=PRESET.limits), job, PRESET, None)
    done = planned.table.slice(0, rows)  # the plan is in key order: any `rows` of it
    del planned
    root = str(folder / "out")
    keys = done.column("key")
    paths = pc.binary_join_element_wise(f"{root}/images", pc.utf8_slice_codeunits(keys, 0, 2),
                                        pc.binary_join_element_wise(keys, ".png", ""), "/")
    sizes = pa.array(200_000 + np.arange(rows) % 50_000, pa.int64())
    now = pa.scalar(1_780_000_000_000_000, pa.timestamp("us", tz="UTC"))
    ledger_rows = done.select([c for c in done.column_names if c not in ("source", "row", "revision")])
    for name, column in [("model_id", pa.repeat(pa.scalar("bench"), rows)),
                         ("model_revision", pa.repeat(pa.scalar("0" * 40), rows)),
                         ("dtype", pa.repeat(pa.scalar("bfloat16"), rows)), ("image_uri", paths), ("bytes", sizes),
                         ("sha256", pc.binary_join_element_wise(keys, keys, "")),
                         ("render_seconds", pa.array(rng.uniform(2.5, 3.5, rows))),
                         ("worker", pa.repeat(pa.scalar("10.0.0.1:1234"), rows)),
                         ("started_at", pa.repeat(now, rows)), ("finished_at", pa.repeat(now, rows))]:
        ledger_rows = ledger_rows.append_column(name, column)
    metadata = folder / "out" / "metadata"
    metadata.mkdir(parents=True)
    (folder / "out" / "_job.json").write_text(json.dumps({"identity": {"model": {}}}))
    per_part = -(-rows // parts)
    for n, start in enumerate(range(0, rows, per_part)):
        run = f"2026{1 + n // 100000 % 12:02d}01T{n // 3600 % 24:02d}{n // 60 % 60:02d}{n % 60:02d}-{n % 2**24:06x}"
        pq.write_table(ledger_rows.slice(start, per_part), metadata / f"part-{run}-00000.parquet", compression="zstd")
    files = pc.binary_join_element_wise(keys, ".png", "")
    names = pc.binary_join_element_wise(pc.utf8_slice_codeunits(keys, 0, 2), files, "/")
    pq.write_table(pa.table({"name": names, "size": sizes}), folder / "listing.parquet")


def peak_gib() -> float:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, which a child started by fork and exec keeps
    from its parent, it starts again at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(what: str, folder: str, store_options: str) -> dict:
    """One measure, in this (fresh) process: seconds and peak RSS."""
    import pyarrow.parquet as pq

    from flux_worker.storage import filesystem
    from pipeline.store import changed_rows, committed_images

    options = json.loads(store_options)
    output = options.pop("output")
    fs, root = filesystem(output, options)
    listed = f"{folder}/listing.parquet"  # name (<kk>/<file> under images/), size; read afresh, as a listing is
    if hasattr(committed_images, "image_listing"):
        committed_images.image_listing = lambda fs, root, expected=0: pq.read_table(listed)
    else:  # older code: a mapping of full path to size
        listing = pq.read_table(listed)
        mapping = dict(zip((f"{root}/images/{name}" for name in listing.column("name").to_pylist()),
                           listing.column("size").to_pylist()))
        committed_images.list_images = lambda fs, root: mapping
        del listing
    base = peak_gib()
    start = time.perf_counter()
    result: dict = {}
    if what in ("start", "plan"):
        from benchmarks.bench_driver_scale import PRESET
        from pipeline.manifest import read_manifest
        from pipeline.plan import plan_images
        from schemas import JobSpec

        committed = changed_rows.read_committed(fs, root)
        stale = committed_images.stale_keys(fs, root, committed)
        result = {"committed": committed.num_rows, "stale": len(stale)}
        if hasattr(changed_rows, "for_planning"):  # as pipeline/run.py does
            committed = changed_rows.for_planning(committed)
        if what == "plan":
            job = JobSpec.model_validate({"manifest": f"{folder}/manifest.parquet", "output": {"uri": output}})
            manifest = read_manifest(f"{folder}/manifest.parquet", limits=PRESET.limits)
            plan = plan_images(manifest, job, PRESET, committed, stale=stale, run_id="20270101T000000-000000")
            result["to_render"] = plan.table.num_rows
    elif what == "validate":
        from benchmarks.bench_driver_scale import PRESET
        from pipeline import manifest as manifests

        kept = {"columns": manifests.VALIDATE_COLUMNS} if hasattr(manifests, "VALIDATE_COLUMNS") else {}
        manifest = manifests.read_manifest(f"{folder}/manifest.parquet", limits=PRESET.limits, **kept)
        result = {"valid": manifest.valid_count}
    elif what == "verify":
        from pipeline.store import verify

        verify.image_listing = committed_images.image_listing
        verify._check_contents = lambda *args: None
        check = verify.check_folder(fs, root)
        result = {"rows": check.rows, "problems": check.problems}
    elif what == "compact":
        from pipeline.store import compaction

        done = compaction.compact(fs, root)
        result = {"merged": done.merged, "written": done.written, "rows": done.rows_after}
    result["seconds"] = time.perf_counter() - start
    result["peak_gib"] = peak_gib()
    result["base_gib"] = base
    return result


def run_measure(what: str, folder: Path, output: str, code: Path, env: dict) -> dict:
    options = json.dumps({"output": output, **json.loads(env.get("BENCH_STORE_OPTIONS", "{}"))})
    child = subprocess.run(
        [sys.executable, __file__, "--measure", what, str(folder), options],
        env={**os.environ, **env, "PYTHONPATH": f"{code}:{REPO}"}, capture_output=True, text=True, check=False)
    if child.returncode:
        raise SystemExit(f"{what} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def scale(args: argparse.Namespace) -> None:
    print("| store | committed rows | parts | measure | seconds | peak RSS GiB | result |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for parts in args.parts:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            folder = Path(tmp)
            if args.keep:  # built once, measured again and again (compact changes it: measure that last)
                folder = Path(args.keep) / f"{args.rows}-{parts}-{args.manifest_rows or 2 * args.rows}"
                folder.mkdir(parents=True, exist_ok=True)
            mark = time.perf_counter()
            if not (folder / "listing.parquet").exists():
                build(folder, args.rows, parts, args.manifest_rows or 2 * args.rows)
            built = time.perf_counter() - mark
            env, output, server = {}, str(folder / "out"), None
            if args.store == "s3":
                server, env, output = upload(folder)
            try:
                steps = [(what, what) for what in args.measures]
                if "compact" in args.measures:
                    steps.append(("start, compacted", "start"))
                for label, what in steps:
                    if what == "validate" and parts != args.parts[0]:
                        continue  # the manifest, not the ledger: once
                    result = run_measure(what, folder, output, args.code, env)
                    detail = {k: v for k, v in result.items() if k not in ("seconds", "peak_gib", "base_gib")}
                    print(f"| {args.store} | {args.rows:,} | {parts:,} | {label} | {result['seconds']:.1f} | "
                          f"{result['peak_gib']:.2f} (base {result['base_gib']:.2f}) | {detail} |", flush=True)
            finally:
                if server is not None:
                    server.stop()
            print(f"<!-- built in {built:.0f} s -->", flush=True)


def upload(folder: Path) -> tuple:
    """The ledger on moto's S3 server (in this process): the server, the environment and OUTPUT's URL."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    client.create_bucket(Bucket="ledger")
    files = [p for p in (folder / "out").rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), "ledger", f"out/{p.relative_to(folder / 'out')}"), files))
    return server, env, "s3://ledger/out"


def year(args: argparse.Namespace) -> None:
    """365 daily catalog runs over one OUTPUT: the run start of day 1 and of day 365."""
    import pyarrow.parquet as pq

    from flux_worker.storage import filesystem
    from pipeline.store import compaction, run_records
    from schemas import RunSummary

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        build(folder, 300, 1, 600)  # day 1: the catalog's 300 products, one part
        fs, root = filesystem(str(folder / "out"))
        first_part = sorted((folder / "out" / "metadata").glob("*.parquet"))[0]
        day_one = pq.read_table(first_part)
        starts = {1: [run_measure("start", folder, str(folder / "out"), args.code, {}) for _ in range(3)]}
        parts_seen = []
        for day in range(2, 366):
            # each day re-renders the 150 products whose prompts changed: a part of 150 rows superseding theirs
            date = f"2026{1 + (day - 1) // 31 % 12:02d}{1 + (day - 1) % 28:02d}"
            run_id = f"{date}T{day // 60:02d}{day % 60:02d}00-{day:06x}"
            changed = day_one.slice((day % 2) * 150, 150)
            pq.write_table(changed, folder / "out" / "metadata" / f"part-{run_id}-00000.parquet", compression="zstd")
            # the run's end: settle retires the superseded rows (modelled as compaction keeping the latest
            # rows), the run's record, retention, and compaction once AUTO_PARTS small parts pile up
            summary = RunSummary(output=root, run_id=run_id, model_id="bench", started_at="2026-01-01T00:00:00Z",
                                 images_expected=300, images_rendered=150, images_total_done=300)
            fs.write_bytes(f"{root}/runs/{run_id}/summary.json", summary.model_dump_json().encode())
            run_records.retain(fs, root)
            if compaction.due(fs, root):
                compaction.compact(fs, root)
            parts_seen.append(len(list((folder / "out" / "metadata").glob("*.parquet"))))
        starts[365] = [run_measure("start", folder, str(folder / "out"), args.code, {}) for _ in range(3)]
        runs = len([p for p in (folder / "out" / "runs").iterdir() if p.is_dir()])
        history = pq.read_table(folder / "out" / "runs" / "history.parquet").num_rows
        print("| day | metadata parts | run folders | run start s (3 runs) | peak RSS GiB |")
        print("| --- | --- | --- | --- | --- |")
        for day, results in starts.items():
            parts = 1 if day == 1 else parts_seen[-1]
            folders = 0 if day == 1 else runs
            print(f"| {day} | {parts} | {folders} (+ {history if day == 365 else 0} in history.parquet) | "
                  f"{', '.join(format(r['seconds'], '.3f') for r in results)} | "
                  f"{max(r['peak_gib'] for r in results):.2f} |")
        print(f"most parts on any day: {max(parts_seen)}")


def main() -> int:
    if sys.argv[1:2] == ["--measure"]:
        sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
        print(json.dumps(measure(*sys.argv[2:5])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="committed rows")
    parser.add_argument("--parts", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--manifest-rows", type=int, default=0, help="manifest rows (default: 2x --rows)")
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--code", type=Path, default=REPO, help="the fluxbatch checkout the measures run")
    parser.add_argument("--tmp", default=None, help="where to build the ledger (default: the system's temp)")
    parser.add_argument("--keep", default=None, help="build into this folder and keep it for the next runs")
    parser.add_argument("--year", action="store_true", help="a daily catalog job's year instead")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.year:
        year(args)
    else:
        scale(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
