"""Join the job's Ray cluster or start a local one, quietly, and say where to watch it.

Quiet by default: between fluxbatch's start line and its summary the user sees our progress bar and our
own lines, nothing from Ray or the libraries under it. Each source is turned down where it starts:

    Ray's Python loggers            ray.init(logging_level=ERROR)
    worker stdout/stderr            ray.init(log_to_driver=False)      (FLUXBATCH_WORKER_LOGS=1 forces them on)
    Ray's C++ core (error lines such as "constructor arguments in the object store", which Ray Data's
    own actor pool triggers on every run: ray-project/ray#57733)
                                    RAY_BACKEND_LOG_LEVEL=fatal while ray.init starts the driver's core worker
    Ray Data's console handler      its level raised while the run's dataset executes (its log file keeps all)
    transformers in the workers     TRANSFORMERS_VERBOSITY=error in their environment

`-v` (the root logger at INFO) leaves all of them as Ray sets them. A variable the user set is never
overridden. RAY_BACKEND_LOG_LEVEL reaches the processes `ray.init` starts with the local cluster too
(Ray has no per-process setting), so their session log files hold only fatal errors unless `-v`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from schemas.errors import FluxbatchError, first_line

log = logging.getLogger(__name__)

WORKER_LOGS_ENV = "FLUXBATCH_WORKER_LOGS"
BACKEND_LOG_LEVEL_ENV = "RAY_BACKEND_LOG_LEVEL"
RAY_DATA_LOGGER = "ray.data"


def verbose() -> bool:
    """`-v` was given: the CLI sets the root logger to INFO (a Python caller may do the same)."""
    return logging.getLogger().isEnabledFor(logging.INFO)


def log_to_driver() -> bool:
    """Whether workers' stdout and stderr are printed by the driver: with `-v`, or FLUXBATCH_WORKER_LOGS=1."""
    forced = os.environ.get(WORKER_LOGS_ENV)
    return forced != "0" if forced else verbose()


@dataclass
class RaySession:
    """The cluster a run renders on: whether this process started it, and where to watch it."""

    started_here: bool  # a local cluster of this process: it never grows and stops when the process ends
    can_grow: bool  # a cluster the run joined: an autoscaler may add nodes on demand
    dashboard_url: str | None  # None: no dashboard, or Ray was started by the caller
    metrics_url: str | None  # this node's Prometheus endpoint; every node serves its own
    nodes: int
    cpus: float
    gpus: float

    def start_line(self) -> str:
        kind = "local Ray cluster" if self.started_here else "Ray cluster"
        size = f"{self.nodes} node{'s' if self.nodes != 1 else ''}, {self.cpus:g} CPUs, {self.gpus:g} GPUs"
        dashboard = f"http://{self.dashboard_url}" if self.dashboard_url else "none"
        if self.dashboard_url and self.started_here:  # token auth is on (ray_auth.py): the page asks for it
            dashboard += " (its token: `ray get-auth-token`)"
        metrics = self.metrics_url or "none"
        if self.metrics_url and self.nodes > 1:
            metrics += " (this node; each node serves its own)"
        return f"fluxbatch: {kind} ({size}); dashboard {dashboard}; metrics {metrics}"


def job_name(command: str, output: str) -> str:
    """The name the Ray dashboard's Jobs page shows for a run (its `job_name` metadata), e.g. `fluxbatch render
    s3://b/run`; without it a driver's row there says "-"."""
    return f"fluxbatch {command} {output}"


class RayUnreachableError(FluxbatchError):
    """No Ray cluster answers at the address a job names (`--ray-address`, `ray_address`, RAY_ADDRESS)."""


def check_reachable(address: str) -> None:
    """The head of a cluster to join answers at `address`, checked in seconds: Ray's own connect waits minutes
    before it gives up (3 min 25 s measured for a refused local port, 20 s for an unanswered one), then raises a
    traceback. `auto` (the cluster `ray start` left on this machine) is Ray's to find."""
    import socket

    if address in ("auto", "local", ""):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachableError(f"ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by "
                                  "default) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise unreachable(address, error) from None


def unreachable(address: str, error: BaseException) -> RayUnreachableError:
    return RayUnreachableError(
        f"ray address {address}: no Ray cluster answers there ({first_line(error)}); give the head's address "
        "(`ray status` on the head names it), or leave --ray-address out to start a local cluster")


def init_joining(address: str, **settings: Any) -> Any:
    """`ray.init(address, **settings)` for a cluster to join: an address where no Ray answers (nothing listens, or
    something else does) is one line, `RayUnreachableError`."""
    import ray

    check_reachable(address)
    try:
        return ray.init(address=address, **settings)
    except ConnectionError as error:  # something answered, not a Ray head (20 s of Ray's retries)
        raise unreachable(address, error) from None


def connect(address: str, runtime_env: dict, can_grow: bool, name: str | None = None) -> RaySession:
    """`ray.init(address)` with the quiet settings above, unless Ray is already initialized in this process; the
    job is called `name` on the dashboard (a submitted job keeps the name its submission gave it)."""
    import ray
    from ray.job_config import JobConfig

    dashboard = None
    started_here = False
    if not ray.is_initialized():
        from pipeline.cluster.ray_auth import starts_local_cluster
        from pipeline.cluster.ray_private import local_cluster_settings

        started_here = starts_local_cluster(address)
        loud = verbose()
        own = local_cluster_settings() if started_here else {}
        with _backend_log_level(None if loud else "fatal"):
            context = (ray.init if started_here else init_joining)(
                address=address, runtime_env=runtime_env, log_to_driver=log_to_driver(), configure_logging=True,
                logging_level=logging.INFO if loud else logging.ERROR,
                job_config=JobConfig(metadata={"job_name": name} if name else None), **own)
        dashboard = context.dashboard_url or None
    return _describe(started_here, can_grow, dashboard)


def _describe(started_here: bool, can_grow: bool, dashboard: str | None) -> RaySession:
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    metrics = next((f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                    for n in nodes if n["NodeID"] == here and n.get("MetricsExportPort")), None)
    totals = ray.cluster_resources()
    return RaySession(started_here=started_here, can_grow=can_grow, dashboard_url=dashboard, metrics_url=metrics,
                      nodes=len(nodes), cpus=totals.get("CPU", 0.0), gpus=totals.get("GPU", 0.0))


HELD_STDERR: int | None = None  # the terminal's stderr while `_backend_log_level` holds fd 2 in a file


@contextmanager
def _backend_log_level(level: str | None) -> Iterator[None]:
    """RAY_BACKEND_LOG_LEVEL=`level` while `ray.init` starts the driver's C++ core, unless the user set it (or
    `level` is None).

    Ray's C++ logger says so in one INFO line on stderr as it reads the variable ("Set ray log level from
    environment variable ..."), before its level applies. The process's stderr is held in a file while
    `ray.init` runs and written back without that line, so nothing else it prints is lost.
    """
    if level is None or BACKEND_LOG_LEVEL_ENV in os.environ:
        yield
        return
    global HELD_STDERR
    os.environ[BACKEND_LOG_LEVEL_ENV] = level
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        HELD_STDERR = saved
        try:
            yield
        finally:
            HELD_STDERR = None
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.environ.pop(BACKEND_LOG_LEVEL_ENV, None)  # what the driver starts later: Ray's default
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if BACKEND_LOG_LEVEL_ENV not in line))
            sys.stderr.flush()


@contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data's console lines (INFO "execution finished", WARNING "progress bars disabled", ...) off while a
    run's dataset executes, unless `-v`. Its file handler (ray-data.log in the session's logs) keeps them all,
    and handlers of ours on the "ray.data" logger (pipeline/lost_batches.py) still get every record."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    if verbose():
        yield
        return
    console = [h for h in logging.getLogger(RAY_DATA_LOGGER).handlers
               if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in console]
    for handler in console:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for handler, level in zip(console, levels):
            handler.setLevel(level)
