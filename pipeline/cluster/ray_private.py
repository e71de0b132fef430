"""The few things fluxbatch needs from Ray that Ray 2.60 offers no public API for, in this one module.

Each is a promise Ray never made us. tests/test_ray_private.py runs every one against the installed Ray,
so an upgrade that moves or changes one fails there, loudly, rather than in a user's run. Nothing else in
schemas/, flux_worker/, pipeline/ or jobs/ may name `ray._...` (that test checks it too).

What lives here, and why no public API does it:
- this job's actors, with or without a dashboard: `ray.util.state.list_actors` asks the dashboard, which a
  minimal install or `include_dashboard=False` lacks;
- stop an actor known only by its id: `ray.kill` takes a handle, and Ray Data keeps its pool's handles;
- re-read Ray's settings after setting RAY_AUTH_MODE (pipeline/cluster/ray_auth.py): Ray reads them once per process;
- the runtime env of a submitted job's driver: an environment variable named by a private constant;
- how often a local cluster exports its metrics: `metrics_report_interval_ms` (10 s) is a Ray setting that only
  `ray.init(_system_config=...)` sets for a cluster it starts; at 10 s, the end of a run on its own cluster waits
  up to 10 s for the endpoint to show the last values (pipeline/cluster/metrics.py);
- the error of a batch Ray Data dropped (`max_errored_blocks=-1`): no public hook reports errored blocks (its
  `ExecutionCallback` is internal); Ray Data logs each to the "ray.data" logger with the exception attached.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from schemas.errors import first_line

RAY_DATA_LOGGER = "ray.data"


@dataclass(frozen=True)
class ActorInfo:
    """One actor of this driver's job, as Ray's control store (GCS) knows it."""

    actor_id: str  # hex
    class_name: str  # Ray Data's pool actors are "MapWorker(MapBatches(<callable>))"
    state: str  # DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING or DEAD
    pid: int | None

    @property
    def renders(self) -> bool:
        """One of this job's renderers: a member of Ray Data's pool, or of a mixed fleet's (pipeline/fleet_stage.py)."""
        return is_renderer(self.class_name)


def is_renderer(class_name: str) -> bool:
    return class_name.startswith(("MapWorker(", "FleetMember"))


def actors_of_this_job() -> list[ActorInfo]:
    """Every actor this driver's job started, dead ones included; asked of the GCS, so no dashboard is needed."""
    import ray
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return [ActorInfo(actor_id=info["ActorID"], class_name=info["ActorClassName"], state=info["State"],
                      pid=info.get("Pid") or None)
            for info in state.actors(job_id=job).values()]


def kill_actor(actor_id: str) -> None:
    """What `ray.kill(handle, no_restart=True)` does, for an actor whose handle this process does not hold."""
    import ray
    from ray._private import worker

    worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)


def reload_ray_config() -> None:
    """Make this process's Ray re-read its settings from the environment (as Ray does itself after it turns
    token authentication on); call before `ray.init`."""
    from ray._raylet import Config

    Config.initialize("")


LOCAL_METRICS_EXPORT_MS = 1000  # Ray's floor for its exporter (max(interval, 1000 ms))


def local_cluster_settings() -> dict[str, Any]:
    """`ray.init` arguments for a cluster this process starts: metrics exported each second, so a short run's last
    values reach its endpoint a second after it ends, not ten (only a cluster that `ray.init` starts takes them)."""
    return {"_system_config": {"metrics_report_interval_ms": LOCAL_METRICS_EXPORT_MS}}


def submitted_job_env() -> dict[str, str]:
    """The `env_vars` of the runtime env a Ray Jobs submission gave this driver; empty for any other driver."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    return dict((job_config.get("runtime_env") or {}).get("env_vars") or {})


class DroppedBatchErrors(logging.Handler):
    """Remembers the error of each batch Ray Data drops, while installed on Ray Data's logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            error: Any = record.exc_info[1]
            self.errors.append(first_line(error, typed=True)[:400])

    @property
    def last(self) -> str | None:
        return self.errors[-1] if self.errors else None

    @classmethod
    def install(cls) -> DroppedBatchErrors:
        # Importing ray.data configures its logger and drops the handlers already there: import it first.
        import ray.data  # noqa: F401

        handler = cls()
        logging.getLogger(RAY_DATA_LOGGER).addHandler(handler)
        return handler

    def remove(self) -> None:
        logging.getLogger(RAY_DATA_LOGGER).removeHandler(self)
