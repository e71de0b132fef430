"""Run `fluxbatch` in a subprocess that starts a Ray cluster of its own, and stop exactly that cluster.

Several engineers' Ray clusters share this machine, so nothing here stops Ray by name: the subprocess
gets its own session (process group) and its own Ray temp folder, and only processes in that session or
naming that folder on their command line are killed, by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class OwnRay:
    """A private Ray temp folder for CLI subprocesses; `stop()` kills what they started, and only that."""

    def __init__(self) -> None:
        # Short: Ray puts unix sockets under it, and socket paths are limited to 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="fbray-", dir="/tmp")
        self.sessions: set[int] = set()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "RAY_TMPDIR": self.temp_dir,
                "FLUXBATCH_WORKER_LOGS": "1", **extra}

    def start(self, args: list[str], module: str = "jobs.cli", stderr: Any = subprocess.PIPE,
              **env: str) -> subprocess.Popen:
        """Start `python -m MODULE ARGS` (`fluxbatch`, or tests.stand_in_cli) in a new session, output captured
        (`stderr`: a pipe, or a pseudo-terminal's file descriptor)."""
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        self.sessions.add(proc.pid)
        return proc

    def run(self, args: list[str], timeout: float = 600, module: str = "jobs.cli",
            **env: str) -> subprocess.CompletedProcess:
        proc = self.start(args, module, **env)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def processes(self) -> list[int]:
        """PIDs of processes in our sessions or naming our Ray temp folder (raylet, gcs, workers)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                session = os.getsid(pid)
            except (OSError, ProcessLookupError):
                continue
            if session in self.sessions or self.temp_dir in cmdline:
                found.append(pid)
        return found

    def stop(self, timeout: float = 30) -> None:
        """Kill every process of our clusters by PID, wait until they are gone."""
        deadline = time.monotonic() + timeout
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
