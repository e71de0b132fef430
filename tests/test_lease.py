"""One driver per OUTPUT, and what each run leaves behind.

Two `fluxbatch render` processes started together on one OUTPUT (local disk, S3): one renders, the other is
refused in one line naming the holder and writes nothing. A killed driver's lease does not block the next run.
The ledger reader keeps each key once. `_SUCCESS` goes when a run starts; every run keeps its own summary; a
no-op re-run keeps the report of the run that rendered the images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_worker.storage import filesystem
from pipeline import render
from pipeline.plan import image_key
from pipeline.store import ledger
from schemas import IMAGE_RECORD_SCHEMA
from schemas.errors import FluxbatchError
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, error_lines, make_job, metadata, session_cluster_env
from tests.own_ray import REPO

ROWS = [{"id": f"lamp-{i}", "prompt": f"a lamp number {i}", "width": 64, "height": 64} for i in range(3)]
EXPECTED = {image_key(row["id"], 0) for row in ROWS}


pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter


def start_driver(manifest: Path, output: str, model: Path, ray) -> subprocess.Popen:
    """`fluxbatch render` as its own process (with the stand-in renderer), driving the session's Ray cluster."""
    command = [sys.executable, "-m", "tests.stand_in_cli", "render", str(manifest), output, "--model", str(model),
               "--no-progress", "--replicas", "1", "--batch-size", "1", "--cpus-per-replica", "1"]
    return subprocess.Popen(command, cwd=REPO, env=session_cluster_env(ray), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def raw_ledger_keys(output: str) -> list[str]:
    """Every key of every metadata part, repeats included (the reader would hide them)."""
    fs, root = filesystem(output)
    keys: list[str] = []
    for part in sorted(p for p in fs.find(f"{root}/metadata") if p.endswith(".parquet")):
        keys += pq.read_table(pa.BufferReader(fs.read_bytes(part)), columns=["key"]).column("key").to_pylist()
    return keys


def assert_one_renders_and_the_other_is_refused(output: str, drivers: list[subprocess.Popen]) -> None:
    results = []
    for driver in drivers:
        try:
            stdout, stderr = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        results.append((driver.returncode, driver.pid, stdout, stderr))
    assert sorted(code for code, *_ in results) == [0, 2], [(code, err[-2000:]) for code, _, _, err in results]
    (_, winner_pid, winner_out, _), = [r for r in results if r[0] == 0]
    (_, _, refused_out, refused_err), = [r for r in results if r[0] == 2]

    fs, root = filesystem(output)
    runs = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/runs")]
    assert len(runs) == 1, f"the refused driver left a run record: {runs}"  # it wrote nothing
    assert refused_out == ""
    # Its phase lines (Ray joined) came first; the refusal itself is one line.
    line, = error_lines(refused_err)
    assert line.startswith("error: ") and "another fluxbatch driver" in line
    for holder_field in (f"run {runs[0]}", f"pid {winner_pid}", "started 20", "goes stale at"):
        assert holder_field in line, line

    assert "3 rendered" in winner_out
    keys = raw_ledger_keys(output)
    assert sorted(keys) == sorted(EXPECTED), "the ledger holds a key twice, or misses one"
    assert_images_match_metadata(output)
    assert fs.exists(f"{root}/_SUCCESS")
    assert not fs.exists(f"{root}/_lease.json"), "the winner let its lease go when it ended"


@pytest.mark.slow
def test_two_drivers_started_together_on_local_disk_one_renders_the_other_is_refused_naming_the_holder(
        tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = str(tmp_path / "out")
    drivers = [start_driver(manifest, out, tiny_model, ray_cluster) for _ in range(2)]
    assert_one_renders_and_the_other_is_refused(out, drivers)


@pytest.mark.slow
def test_two_drivers_started_together_on_s3_one_renders_the_other_is_refused_naming_the_holder(
        tmp_path, tiny_model, ray_cluster, s3_env, bucket):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = f"s3://{bucket}/out"
    drivers = [start_driver(manifest, out, tiny_model, ray_cluster) for _ in range(2)]
    assert_one_renders_and_the_other_is_refused(out, drivers)


def test_driver_killed_while_holding_the_lease_does_not_block_the_next_run(tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    driver = start_driver(manifest, str(out), tiny_model, ray_cluster)
    try:
        while driver.poll() is None and not (out / "_lease.json").is_file():
            time.sleep(0.01)
        assert driver.poll() is None, f"the driver ended without holding a lease:\n{driver.stderr.read()[-3000:]}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert (out / "_lease.json").is_file()

    # Same machine: the holder's process is gone, so its lease counts for nothing; no wait for it to go stale.
    summary = render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)

    assert (summary.images_rendered, summary.images_failed) == (3, 0)
    assert set(raw_ledger_keys(str(out))) == EXPECTED
    assert not (out / "_lease.json").exists()


def plant_lease(out: Path, renewed_ago: float) -> dict:
    """A lease as a driver on another machine leaves it: pid 4242 there means nothing here."""
    now = time.time()
    holder = {"host": "render-node-7", "pid": 4242, "run_id": "20261201T080000-c0ffee", "machine": "other-machine",
              "started_at": now - renewed_ago - 5, "renewed_at": now - renewed_ago, "expires_after": 60.0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "_lease.json").write_text(json.dumps(holder))
    return holder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lease_of_a_driver_on_another_machine_refuses_while_renewed_and_is_taken_over_once_stale(
        tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model))
    render(job, progress=False)
    plant_lease(out, renewed_ago=1)
    before = snapshot(out)

    with pytest.raises(FluxbatchError) as refused:
        render(job, progress=False)

    message = str(refused.value)
    assert "\n" not in message
    for holder_field in ("run 20261201T080000-c0ffee", "host render-node-7", "pid 4242", "started 20",
                         "goes stale at"):
        assert holder_field in message, message
    assert snapshot(out) == before, "the refused driver changed OUTPUT (it must not even remove _SUCCESS)"

    plant_lease(out, renewed_ago=61)  # not renewed for longer than it said it would stay valid
    again = render(job, progress=False)

    assert (again.images_already_done, again.images_rendered) == (3, 0)
    assert not (out / "_lease.json").exists()


def test_success_marker_survives_refusals_and_is_removed_once_a_run_is_under_way_so_a_run_that_fails_leaves_none(
        tmp_path, tiny_model, ray_cluster, monkeypatch):
    from pipeline.store import committed_images

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model))
    render(job, progress=False)
    success = (out / "_SUCCESS").read_bytes()
    manifest.unlink()
    with pytest.raises(FluxbatchError):  # refused by the pre-flight: the run never starts, OUTPUT is as it was
        render(job, progress=False)
    assert (out / "_SUCCESS").read_bytes() == success

    # Edited rows are refused under the lease, before the plan is made: a refusal changes nothing.
    write_manifest(manifest, [{**row, "prompt": row["prompt"] + ", edited"} for row in ROWS])
    with pytest.raises(FluxbatchError):
        render(job, progress=False)
    assert (out / "_SUCCESS").read_bytes() == success
    assert not (out / "_lease.json").exists(), "a refused run kept its lease"

    # A run that fails once under way (here: at its end-of-run check) leaves no _SUCCESS behind.
    write_manifest(manifest, ROWS)

    def broken(*args, **kwargs):
        raise RuntimeError("storage gave up")

    monkeypatch.setattr(committed_images, "settle", broken)
    with pytest.raises(RuntimeError):
        render(job, progress=False)
    assert not (out / "_SUCCESS").exists(), "_SUCCESS still claims a finished OUTPUT after a run that failed"
    assert not (out / "_lease.json").exists(), "a run that failed kept its lease"


def test_each_run_keeps_its_summary_and_a_no_op_rerun_keeps_the_report_of_the_run_that_rendered(
        tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model))
    first = render(job, progress=False)
    report = (out / "report.html").read_bytes()

    second = render(job, progress=False)

    assert (second.images_planned, second.images_already_done) == (0, 3)
    runs = {p.name: json.loads((p / "summary.json").read_text()) for p in (out / "runs").iterdir()}
    assert sorted(runs) == sorted([first.run_id, second.run_id])
    assert (runs[first.run_id]["images_rendered"], runs[second.run_id]["images_rendered"]) == (3, 0)
    assert json.loads((out / "summary.json").read_text())["run_id"] == first.run_id
    assert (out / "report.html").read_bytes() == report
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == second.run_id


def image_rows(keys_and_prompts: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "prompt": p} for k, p in keys_and_prompts], schema=IMAGE_RECORD_SCHEMA)


def test_ledger_reader_keeps_one_row_per_key_the_latest_when_parts_repeat_it(tmp_path):
    out = tmp_path / "out"
    fs, root = filesystem(str(out))
    earlier = ledger.MetadataWriter(fs, root, "20261201T080000-aaaaaa", [])
    earlier.add(image_rows([("k1", "old"), ("k2", "two"), ("k1", "old again")]))
    earlier.flush()
    later = ledger.MetadataWriter(fs, root, "20261201T090000-bbbbbb", [])
    later.add(image_rows([("k3", "three"), ("k1", "new")]))
    later.flush()

    table = metadata(str(out))

    assert sorted(table.column("key").to_pylist()) == ["k1", "k2", "k3"]
    assert {r["key"]: r["prompt"] for r in table.to_pylist()}["k1"] == "new"
    assert ledger.done_keys(fs, root) == {"k1", "k2", "k3"}


def test_only_one_of_eight_drivers_racing_for_a_stale_lease_takes_it_over(tmp_path):
    from pipeline.store.lease import Lease, LeaseHeldError

    out = tmp_path / "out"
    plant_lease(out, renewed_ago=61)
    fs, root = filesystem(str(out))
    start, winners, refused = threading.Barrier(8), [], []

    def driver(number: int) -> None:
        lease = Lease(fs, root, f"run-{number}", seconds=30)
        start.wait()
        try:
            winners.append(lease.acquire())
        except LeaseHeldError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=driver, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert (len(winners), len(refused)) == (1, 7)
    assert all(f"run {winners[0].run_id} " in message for message in refused)
    assert json.loads((out / "_lease.json").read_text())["run_id"] == winners[0].run_id
    winners[0].release()
    assert not (out / "_lease.json").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_whose_lease_was_taken_over_stops_committing_and_leaves_the_new_lease(where, tmp_path, request):
    from pipeline.store.lease import Lease, LeaseLostError

    if where == "s3":
        request.getfixturevalue("s3_env")
        output = f"s3://{request.getfixturevalue('bucket')}/out"
    else:
        output = str(tmp_path / "out")
    fs, root = filesystem(output)
    stalled = Lease(fs, root, "run-stalled", seconds=1).acquire()
    stalled._stop.set()  # a driver that stops renewing (paused, cut off from storage) but is still alive
    stalled._thread.join()
    time.sleep(1.2)
    taker = Lease(fs, root, "run-taker", seconds=30).acquire()

    with pytest.raises(LeaseLostError):
        stalled.check()
    writer = ledger.MetadataWriter(fs, root, "run-stalled", [], before_commit=stalled.check)
    writer.add(image_rows([("k1", "a prompt")]))
    with pytest.raises(LeaseLostError):
        writer.flush()
    assert not fs.exists(f"{root}/metadata")
    stalled.release()
    assert json.loads(fs.read_bytes(f"{root}/_lease.json"))["run_id"] == "run-taker"
    taker.release()
    assert not fs.exists(f"{root}/_lease.json")


def test_s3_lease_is_created_once_and_a_stale_one_is_taken_over_only_with_the_etag_it_was_read_with(s3_env, bucket):
    from pipeline.store.lease import Lease, LeaseHeldError, _ObjectSlot

    fs, root = filesystem(f"s3://{bucket}/out")
    first = Lease(fs, root, "run-first", seconds=30).acquire()
    with pytest.raises(LeaseHeldError, match="run run-first "):
        Lease(fs, root, "run-second", seconds=30).acquire()

    slot = _ObjectSlot(fs, f"{root}/_lease.json")
    data, etag = slot.read()
    assert slot.swap(None, b"{}") is None  # If-None-Match: * on an existing lease
    first._stop.set()
    first._thread.join()
    renewed = slot.swap(etag, data + b" ")  # another driver's write in between (here: a byte appended)
    assert renewed and renewed != etag
    assert slot.swap(etag, b"{}") is None  # If-Match on the ETag read before that write
    assert fs.read_bytes(f"{root}/_lease.json") == data + b" "


def test_a_live_lease_on_a_version_folder_refuses_that_versions_runs_only(tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    first = make_job(str(manifest), str(out), str(tiny_model))
    second = make_job(str(manifest), str(out), str(tiny_model), defaults={"steps": 3})
    render(first, progress=False)
    render(second, new_version=True, progress=False)
    plant_lease(out / "_versions" / "2", renewed_ago=1)

    with pytest.raises(FluxbatchError, match=r"_versions/2 is being written by .* host render-node-7"):
        render(second, progress=False)
    assert render(first, progress=False).images_already_done == 3  # another version's folder: not blocked

    assert not (out / "_lease.json").exists()
    assert json.loads((out / "_versions" / "2" / "_lease.json").read_text())["host"] == "render-node-7"
