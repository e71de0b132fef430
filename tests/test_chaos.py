"""Chaos on a real local Ray cluster: renderer processes SIGKILLed mid-run, the driver SIGKILLed and run
again, object storage failing 20% of requests. Each run ends with every expected key exactly once. The renders
use the stand-in renderer (tests/stand_in.py): what is under test is the driver, Ray and the storage path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import render
from pipeline.plan import image_key
from tests.conftest import write_manifest
from tests.fault_proxy import FaultProxy
from tests.helpers import assert_images_match_metadata, failures, make_job, metadata, session_cluster_env
from tests.own_ray import REPO
from tests.stand_in import stand_in

# What is tested is the driver's and Ray's handling of lost processes and failing storage, not the model: the
# stand-in renderer (tests/stand_in.py), slowed so that kills land while the pool is rendering.
SLOW_STAND_IN = stand_in(0.1)

pytestmark = pytest.mark.slow


def manifest_rows(count: int, images: int = 2) -> list[dict]:
    return [{"id": f"row-{i}", "prompt": f"a lamp number {i}", "width": 64, "height": 64, "num_images": images}
            for i in range(count)]


def expected_keys(rows: list[dict]) -> set[str]:
    return {image_key(r["id"], v) for r in rows for v in range(r["num_images"])}


def sha_by_key(output: str) -> dict[str, str]:
    return {r["key"]: r["sha256"] for r in metadata(output).to_pylist()}


def assert_exactly_once(output: str, rows: list[dict]) -> None:
    table = assert_images_match_metadata(output)  # also: no key twice, no image without its row
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_keys(rows)
    assert failures(output) is None


def renderer_pids(ray) -> list[int]:
    """PIDs of the live renderer actors of this test process's driver (it renders in-process)."""
    from pipeline.cluster.ray_private import actors_of_this_job

    return [a.pid for a in actors_of_this_job() if "MapWorker" in a.class_name and a.state == "ALIVE" and a.pid]


class RendererKiller(threading.Thread):
    """SIGKILLs every live renderer process each time new images appear, `rounds` times."""

    def __init__(self, ray, images: Path, rounds: int):
        super().__init__(daemon=True)
        self.ray, self.images, self.rounds = ray, images, rounds
        self.killed: list[list[int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while len(self.killed) < self.rounds and not self.done.is_set():
            count = sum(1 for _ in self.images.rglob("*.png")) if self.images.is_dir() else 0
            # Ray may list a just-killed process as ALIVE for a moment: each round kills processes not yet killed.
            done_for = {pid for pids in self.killed for pid in pids}
            pids = [pid for pid in renderer_pids(self.ray) if pid not in done_for] if count > seen else []
            if pids:  # the pool is rendering: images keep appearing
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                self.killed.append(pids)
                seen = count
            time.sleep(0.05)


def test_renderer_processes_killed_mid_run_are_replaced_and_every_image_lands_once(tmp_path, tiny_model,
                                                                                    ray_cluster):
    rows = manifest_rows(24)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model), replicas=2, batch_size=2, cpus_per_replica=1,
                   commit_seconds=0, max_renderer_deaths=10)
    killer = RendererKiller(ray_cluster, out / "images", rounds=2)
    killer.start()
    try:
        summary = render(job, progress=False, renderer_class=SLOW_STAND_IN)
    finally:
        killer.done.set()
        killer.join()

    assert len(killer.killed) >= 2, f"the run ended before two rounds of kills: {killer.killed}"
    assert len({pid for pids in killer.killed for pid in pids}) >= 2
    assert (summary.images_expected, summary.images_rendered, summary.images_failed) == (48, 48, 0)
    assert_exactly_once(str(out), rows)


def test_driver_killed_mid_run_then_run_again_renders_only_the_rest_and_matches_an_uninterrupted_run(
        tmp_path, tiny_model, ray_cluster):
    rows = manifest_rows(20)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    reference = tmp_path / "reference"
    # The reference renders in batches of 2: the same keys must come out byte for byte whatever the batch size.
    render(make_job(str(manifest), str(reference), str(tiny_model), batch_size=2), progress=False,
           renderer_class=stand_in())

    # `fluxbatch render` as its own process, driving the test session's cluster (as a driver on a long-lived
    # cluster does), SIGKILLed with its process group as soon as its first metadata part is committed. One
    # image at a time on one thread, so the 40 images take seconds after the first part, even on a busy machine.
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tests.stand_in_cli", "--seconds-per-image", "0.2", "render", str(manifest),
               str(out), "--model", str(tiny_model), "--no-progress", "--replicas", "1", "--batch-size", "1",
               "--cpus-per-replica", "1", "--commit-seconds", "0"]
    driver = subprocess.Popen(command, cwd=REPO, env=session_cluster_env(ray_cluster), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        parts = out / "metadata"
        while driver.poll() is None and not (parts.is_dir() and any(parts.glob("*.parquet"))):
            time.sleep(0.05)
        assert driver.poll() is None, f"the run ended before it could be killed:\n{driver.stderr.read()[-3000:]}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "_SUCCESS").exists()
    done_before = len(metadata(str(out)))

    again = render(make_job(str(manifest), str(out), str(tiny_model), batch_size=2), progress=False,
                   renderer_class=stand_in())

    assert 0 < done_before < 40, f"the kill came when {done_before} of 40 images were committed"
    assert (again.images_already_done, again.images_rendered, again.images_failed) == (done_before,
                                                                                       40 - done_before, 0)
    assert_exactly_once(str(out), rows)
    assert sha_by_key(str(out)) == sha_by_key(str(reference))


def test_storage_failing_20_percent_of_requests_loses_nothing(tmp_path, tiny_model, ray_cluster, s3_env, bucket,
                                                              monkeypatch):
    import s3fs

    rows = manifest_rows(8)
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    direct.put(str(write_manifest(tmp_path / "m.parquet", rows)), f"{bucket}/in/m.parquet")
    out = f"s3://{bucket}/run"
    with FaultProxy(s3_env, failure_rate=0.2, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # driver and workers both go through the proxy
        summary = render(make_job(f"s3://{bucket}/in/m.parquet", out, str(tiny_model), replicas=2, batch_size=2,
                                  commit_seconds=0), progress=False, renderer_class=stand_in())
        again = render(make_job(f"s3://{bucket}/in/m.parquet", out, str(tiny_model), replicas=2), progress=False,
                       renderer_class=stand_in())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)

    assert sum(proxy.faults.values()) >= 10, (proxy.requests, proxy.faults)
    assert (summary.images_rendered, summary.images_failed, summary.complete) == (16, 0, True)
    assert (again.images_rendered, again.images_already_done) == (0, 16)
    assert_exactly_once(out, rows)
