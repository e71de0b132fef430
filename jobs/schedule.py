"""`fluxbatch schedule SPEC.yaml`: run fluxbatch jobs when their cron expressions fall due.

A job is due when its latest fire time has passed, no run has been recorded for it yet, and it is at
most `max_delay` seconds old: a scheduler that was down runs each job once for its newest missed fire
time, never once per missed time. Each run is a `fluxbatch ...` child process, started from SPEC's
folder, with its output in STATE/logs/<job>/<run>.log.

Never two runs of one job at once: a run holds STATE/locks/<job>.lock, created exclusively, holding the
run's pid and its start time. A scheduler finding the lock held by a live process records the fire time
as `skipped`; a lock whose process is gone (a scheduler killed mid-run, a reboot) is stale and
is taken over, and that run is recorded as `lost`. Locks live on one machine: run one state folder per
host. Every outcome (succeeded, failed, skipped, lost, stopped) is one line of STATE/history.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from schemas.errors import FluxbatchError
from schemas.schedule import ScheduledJob, ScheduleSpec

log = logging.getLogger(__name__)
HOST = socket.gethostname()


class ScheduleError(FluxbatchError, RuntimeError):
    """The schedule cannot run: an unreadable spec or state folder."""


def latest_fire(job: ScheduledJob, now: datetime, zone: ZoneInfo) -> datetime:
    """The newest fire time of the job's cron expression at or before `now` (aware, in UTC)."""
    from croniter import croniter

    local = now.astimezone(zone).replace(microsecond=0) + timedelta(seconds=1)
    return croniter(job.cron, local).get_prev(datetime).astimezone(timezone.utc)


def due_fire(job: ScheduledJob, now: datetime, zone: ZoneInfo, handled: datetime | None) -> datetime | None:
    """The fire time to run now, or None: already handled, or missed by more than `max_delay`."""
    fire = latest_fire(job, now, zone)
    if handled is not None and handled >= fire:
        return None
    if (now - fire).total_seconds() > job.max_delay:
        return None
    return fire


# -- state: history and locks ----------------------------------------------------------------------

class History:
    """STATE/history.jsonl: one JSON object per run outcome, appended in one write each."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        """Record an outcome; a line is written with one `write` to a file opened for appending."""
        line = (json.dumps(entry, default=str, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded outcome, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def handled_fires(self) -> dict[str, datetime]:
        """Per job, the newest fire time with an outcome: that fire time and older ones are never run again."""
        newest: dict[str, datetime] = {}
        for entry in self.entries():
            fire = datetime.fromisoformat(entry["scheduled_for"])
            if entry["job"] not in newest or fire > newest[entry["job"]]:
                newest[entry["job"]] = fire
        return newest


class JobLock:
    """STATE/locks/<job>.lock: created with O_EXCL, so one process at a time holds it."""

    def __init__(self, folder: Path, job: str):
        self.path = folder / f"{job}.lock"
        self.stale: dict[str, Any] | None = None  # the dead holder taken over by `acquire`, if any

    def acquire(self, holder: dict[str, Any]) -> dict[str, Any] | None:
        """Take the lock for `holder`; returns None when taken, or the live holder that has it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                current = self.holder()
                if current is not None and not is_stale(current):
                    return current
                self.stale = current
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(holder, file, default=str)
            return None
        return self.holder() or {"pid": None}

    def update(self, holder: dict[str, Any]) -> None:
        """Replace the holder (the scheduler hands the lock to its child) in one rename."""
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(holder, default=str))
        os.replace(temporary, self.path)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, or None when nobody does (or its file is being written this instant)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0
            return {"pid": None, "unreadable": True, "age": age}

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def is_stale(holder: dict[str, Any]) -> bool:
    """A holder from this host whose process is gone (or was replaced by another with its pid) is stale."""
    import psutil

    if holder.get("unreadable"):
        return holder.get("age", 0) > 60  # a lock still being written is a second old at most
    if holder.get("host") != HOST:
        return False  # cannot tell from here; locks are per machine
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        process = psutil.Process(pid)
        started = holder.get("pid_started")
        return started is not None and abs(process.create_time() - float(started)) > 1.0
    except psutil.NoSuchProcess:
        return True


def _pid_started(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


# -- the scheduler ---------------------------------------------------------------------------------

@dataclass
class Run:
    job: ScheduledJob
    run_id: str
    scheduled_for: datetime
    started_at: datetime
    process: subprocess.Popen
    lock: JobLock
    log_path: Path
    log_file: TextIO


class Scheduler:
    """Starts due jobs as child processes, one run per job at a time, and records their outcomes."""

    def __init__(self, spec: ScheduleSpec, base: Path, out: TextIO | None = None):
        self.spec, self.base = spec, base
        self.zone = ZoneInfo(spec.timezone)
        self.state = (base / spec.state).resolve()
        self.locks = self.state / "locks"
        try:
            self.locks.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ScheduleError(f"cannot create the state folder {self.state}: {error.strerror}") from error
        self.history = History(self.state / "history.jsonl")
        self.handled = self.history.handled_fires()
        self.running: dict[str, Run] = {}
        self.out = out or sys.stderr

    def tick(self, now: datetime | None = None) -> None:
        """Record finished runs, then start every due job that is not running anywhere."""
        now = now or datetime.now(timezone.utc)
        self.reap()
        for job in self.spec.jobs:
            if job.name in self.running:
                continue
            fire = due_fire(job, now, self.zone, self.handled.get(job.name))
            if fire is not None:
                self.handled[job.name] = fire
                self.start(job, fire, now)

    def start(self, job: ScheduledJob, fire: datetime, now: datetime) -> None:
        """Take the job's lock and start its run; record `skipped` if another live run holds the lock."""
        run_id = f"{fire.strftime('%Y%m%dT%H%M')}-{uuid.uuid4().hex[:6]}"
        lock = JobLock(self.locks, job.name)
        mine = {"host": HOST, "pid": os.getpid(), "pid_started": _pid_started(os.getpid()), "run_id": run_id,
                "scheduled_for": fire.isoformat(), "started_at": now.isoformat(), "by": "scheduler"}
        holder = lock.acquire(mine)
        if lock.stale:
            self._lost(job, lock.stale, now)
        if holder is not None:
            reason = (f"already running: run {holder.get('run_id')} (pid {holder.get('pid')} on "
                      f"{holder.get('host')}) since {holder.get('started_at')}")
            self._record(job, run_id, fire, now, "skipped", reason=reason)
            return
        log_path = self.state / "logs" / job.name / f"{run_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")  # noqa: SIM115 - closed when the run is reaped
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *job.args()], cwd=self.base, env=env,
                                       stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        except OSError as error:
            lock.release()
            log_file.close()
            self._record(job, run_id, fire, now, "failed", reason=f"could not start: {error}")
            return
        lock.update({**mine, "pid": process.pid, "pid_started": _pid_started(process.pid), "by": "run",
                     "scheduler_pid": os.getpid(), "log": str(log_path)})
        self.running[job.name] = Run(job, run_id, fire, now, process, lock, log_path, log_file)
        print(f"{now.isoformat(timespec='seconds')} started {job.name} run {run_id} (pid {process.pid}): "
              f"fluxbatch {job.run}", file=self.out, flush=True)

    def reap(self) -> None:
        """Record the outcome of every run that has finished, and release its lock."""
        for name, run in list(self.running.items()):
            code = run.process.poll()
            if code is None:
                continue
            self._finish(run, "succeeded" if code == 0 else "failed", code)
            del self.running[name]

    def wait(self) -> None:
        """Block until every started run has finished, recording each."""
        while self.running:
            time.sleep(0.5)
            self.reap()

    def stop(self) -> None:
        """Terminate running runs (SIGTERM to each run's process group) and record them as `stopped`."""
        for run in self.running.values():
            try:
                os.killpg(run.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for run in self.running.values():
            try:
                code = run.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(run.process.pid, signal.SIGKILL)
                code = run.process.wait()
            self._finish(run, "stopped", code)
        self.running.clear()

    def _finish(self, run: Run, outcome: str, code: int | None) -> None:
        run.log_file.close()
        run.lock.release()
        finished = datetime.now(timezone.utc)
        self._record(run.job, run.run_id, run.scheduled_for, run.started_at, outcome, exit_code=code,
                     finished_at=finished, log=str(run.log_path))
        print(f"{finished.isoformat(timespec='seconds')} {run.job.name} run {run.run_id} {outcome} "
              f"(exit {code}); log {run.log_path}", file=self.out, flush=True)

    def _lost(self, job: ScheduledJob, holder: dict[str, Any], now: datetime) -> None:
        self._record(job, holder.get("run_id") or "unknown", datetime.fromisoformat(holder["scheduled_for"])
                     if holder.get("scheduled_for") else now, holder.get("started_at") or now, "lost",
                     reason=f"its process (pid {holder.get('pid')}) ended without recording an outcome; "
                     f"see {holder.get('log') or 'its log'}")

    def _record(self, job: ScheduledJob, run_id: str, fire: datetime, started: Any, outcome: str,
                **fields: Any) -> None:
        entry = {"job": job.name, "run_id": run_id, "scheduled_for": fire.isoformat(), "started_at": started,
                 "outcome": outcome, "command": job.run, "host": HOST, **fields}
        self.history.append(entry)
        if outcome in ("skipped", "lost"):
            print(f"{job.name} {outcome}: {fields.get('reason', '')}", file=self.out, flush=True)


def run_schedule(spec_file: str | Path, *, once: bool = False, now: datetime | None = None,
                 out: TextIO | None = None) -> int:
    """Run the schedule: once (start what is due, wait for it, exit 1 if a run failed) or until stopped."""
    path = Path(spec_file)
    if not path.is_file():
        raise ScheduleError(f"no schedule at {str(spec_file)!r}")
    spec = ScheduleSpec.from_yaml(path)
    scheduler = Scheduler(spec, path.resolve().parent, out)
    if once:
        scheduler.tick(now)
        started = dict(scheduler.running)
        scheduler.wait()
        outcomes = [e for e in scheduler.history.entries() if e["run_id"] in {r.run_id for r in started.values()}]
        return 1 if any(e["outcome"] != "succeeded" for e in outcomes) else 0
    print(f"scheduling {len(spec.jobs)} job(s); state in {scheduler.state}; Ctrl-C stops", file=scheduler.out)
    try:
        while True:
            scheduler.tick()
            time.sleep(spec.tick_seconds)
    except KeyboardInterrupt:
        print("stopping: terminating running jobs", file=scheduler.out)
        scheduler.stop()
    return 0
