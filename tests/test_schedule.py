"""`fluxbatch schedule`: due jobs start on their cron expressions, one run per job at a time, with a history."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from jobs.schedule import HOST, JobLock, due_fire, latest_fire, run_schedule
from schemas.schedule import ScheduledJob, ScheduleSpec
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, session_cluster_env

UTC = ZoneInfo("UTC")


def history(folder: Path) -> list[dict]:
    path = folder / "state" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_schedule(folder: Path, jobs: list[dict]) -> Path:
    path = folder / "schedule.yaml"
    path.write_text(yaml.safe_dump({"state": "state", "jobs": jobs}))
    return path


@pytest.mark.slow
def test_scheduler_starts_a_due_job_and_a_second_scheduler_skips_it_while_it_runs(tmp_path, tiny_model,
                                                                                     ray_cluster):
    write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat", "width": 64, "height": 64}])
    spec = write_schedule(tmp_path, [{"name": "cats", "cron": "* * * * *",
                                      "run": f"render m.parquet out --model {tiny_model} --no-progress"}])
    first = subprocess.Popen([sys.executable, "-m", "jobs.cli", "schedule", str(spec), "--once"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=session_cluster_env(ray_cluster))  # the scheduled render joins it
    lock = JobLock(tmp_path / "state" / "locks", "cats")
    try:
        while (lock.holder() or {}).get("by") != "run":  # the first scheduler handed its lock to the run
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        holder = lock.holder()

        out = io.StringIO()
        assert run_schedule(spec, once=True, out=out) == 0  # a second scheduler, at the same time

        code = first.wait(timeout=600)
        logs = "".join(Path(e["log"]).read_text()[-3000:] for e in history(tmp_path) if e.get("log"))
        assert code == 0, first.stdout.read()[-2000:] + logs
    finally:
        if first.poll() is None:
            first.kill()
    outcomes = [(e["job"], e["outcome"], e["run_id"]) for e in history(tmp_path)]
    assert outcomes == [("cats", "skipped", outcomes[0][2]), ("cats", "succeeded", holder["run_id"])]
    skipped = history(tmp_path)[0]
    assert f"already running: run {holder['run_id']} (pid {holder['pid']} on {HOST})" in skipped["reason"]
    assert pq.read_table(tmp_path / "out" / "metadata").num_rows == 1
    assert len(assert_images_match_metadata(str(tmp_path / "out"))) == 1  # in the job's folder, not the cluster's
    assert not lock.path.exists()
    log = Path(history(tmp_path)[1]["log"]).read_text()
    assert "1 rendered, 0 already done" in log


@pytest.mark.slow  # starts fluxbatch child processes
def test_once_records_a_failed_run_and_exits_1_and_the_same_fire_time_is_not_run_again(tmp_path):
    spec = write_schedule(tmp_path, [{"name": "broken", "cron": "*/5 * * * *", "run": "validate missing.parquet"}])
    now = datetime(2026, 5, 1, 12, 7, 30, tzinfo=timezone.utc)

    assert run_schedule(spec, once=True, now=now, out=io.StringIO()) == 1
    assert run_schedule(spec, once=True, now=now + timedelta(minutes=2), out=io.StringIO()) == 0

    (entry,) = history(tmp_path)
    assert (entry["job"], entry["outcome"], entry["exit_code"]) == ("broken", "failed", 2)
    assert entry["scheduled_for"] == "2026-05-01T12:05:00+00:00"
    assert "no manifest at 'missing.parquet'" in Path(entry["log"]).read_text()


@pytest.mark.slow  # starts fluxbatch child processes
def test_a_lock_left_by_a_dead_run_is_taken_over_and_that_run_recorded_as_lost(tmp_path):
    spec = write_schedule(tmp_path, [{"name": "nightly", "cron": "0 2 * * *", "run": "validate missing.parquet"}])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    locks = tmp_path / "state" / "locks"
    locks.mkdir(parents=True)
    (locks / "nightly.lock").write_text(json.dumps({
        "host": HOST, "pid": dead.pid, "pid_started": time.time() - 5, "run_id": "old-run",
        "scheduled_for": "2026-04-30T02:00:00+00:00", "started_at": "2026-04-30T02:00:01+00:00"}))

    run_schedule(spec, once=True, now=datetime(2026, 5, 1, 2, 0, 5, tzinfo=timezone.utc), out=io.StringIO())

    outcomes = [(e["run_id"], e["outcome"]) for e in history(tmp_path)]
    assert outcomes[0] == ("old-run", "lost")
    assert outcomes[1][1] == "failed"  # this fire time did run (its command fails: no manifest)
    assert not (locks / "nightly.lock").exists()


def test_due_means_newest_fire_time_not_yet_handled_and_not_older_than_max_delay():
    job = ScheduledJob(name="hourly", cron="0 * * * *", run="render m.parquet out", max_delay=600)
    now = datetime(2026, 5, 1, 12, 4, tzinfo=timezone.utc)
    noon = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert latest_fire(job, now, UTC) == noon
    assert latest_fire(job, noon, UTC) == noon  # a fire time is due at its own second
    assert due_fire(job, now, UTC, handled=None) == noon
    assert due_fire(job, now, UTC, handled=noon) is None
    assert due_fire(job, now, UTC, handled=noon - timedelta(hours=1)) == noon
    assert due_fire(job, now + timedelta(minutes=11), UTC, handled=None) is None  # missed by more than 600 s
    berlin = ScheduledJob(name="b", cron="0 2 * * *", run="render m.parquet out")
    assert latest_fire(berlin, datetime(2026, 5, 1, 0, 30, tzinfo=timezone.utc), ZoneInfo("Europe/Berlin")) == \
        datetime(2026, 5, 1, 0, 0, tzinfo=timezone.utc)


def test_a_bad_schedule_names_the_job_field_and_the_fix():
    with pytest.raises(ValidationError, match="cron 'every day' is not a valid cron expression"):
        ScheduleSpec.model_validate({"jobs": [{"name": "a", "cron": "every day", "run": "render m out"}]})
    with pytest.raises(ValidationError, match="job names must be unique; a appear"):
        ScheduleSpec.model_validate({"jobs": [{"name": "a", "cron": "* * * * *", "run": "render m out"}] * 2})
    with pytest.raises(ValidationError, match="leave out 'fluxbatch'"):
        ScheduledJob(name="a", cron="* * * * *", run="fluxbatch render m out")
    with pytest.raises(ValidationError, match="name '../x' must be 1-64 letters"):
        ScheduledJob(name="../x", cron="* * * * *", run="render m out")
