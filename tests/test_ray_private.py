"""The private Ray calls fluxbatch cannot do without live in pipeline/cluster/ray_private.py only, and each still does
what fluxbatch relies on with the installed Ray: a Ray upgrade that moves one fails here, not in a user's run."""

from __future__ import annotations

import inspect
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "flux_worker", "pipeline", "jobs")
ALLOWED = Path("pipeline/cluster/ray_private.py")


def test_no_module_but_ray_private_names_a_private_ray_api():
    private = re.compile(r"ray\._")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if path.relative_to(REPO) != ALLOWED
             for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not found, "private Ray APIs outside pipeline/cluster/ray_private.py:\n" + "\n".join(found)


def test_private_ray_names_fluxbatch_relies_on_still_exist_with_the_expected_signatures():
    from ray._private import state, worker
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray._raylet import Config, CoreWorker

    assert "job_id" in inspect.signature(state.actors).parameters
    assert callable(getattr(CoreWorker, "kill_actor", None))
    assert hasattr(worker, "global_worker")
    assert callable(getattr(Config, "initialize", None))
    assert RAY_JOB_CONFIG_JSON_ENV_VAR == "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor sets


def test_an_actor_of_this_job_is_listed_and_stopped_by_its_id(ray_cluster):
    import ray

    from pipeline.cluster.ray_private import actors_of_this_job, kill_actor

    @ray.remote(num_cpus=0, max_restarts=-1)
    class Sleeper:
        def pid(self) -> int:

            return os.getpid()

    sleeper = Sleeper.remote()
    pid = ray.get(sleeper.pid.remote())
    [info] = [a for a in actors_of_this_job() if a.pid == pid]
    assert info.state == "ALIVE" and info.class_name.endswith("Sleeper"), info

    kill_actor(info.actor_id)  # no restart, though max_restarts=-1

    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:  # the kill is asynchronous: a call sent just after may still run
            ray.get(sleeper.pid.remote(), timeout=60)
            time.sleep(0.2)
    while [a.state for a in actors_of_this_job() if a.actor_id == info.actor_id] != ["DEAD"]:
        assert time.monotonic() < deadline, "the killed actor was restarted"
        time.sleep(0.2)


def test_the_error_of_a_batch_ray_data_drops_is_seen(ray_cluster):
    import ray

    from pipeline.cluster.ray_private import DroppedBatchErrors

    def fail_on_three(batch: dict) -> dict:
        if 3 in batch["id"]:
            raise ValueError("row three is poison")
        return batch

    context = ray.data.DataContext.get_current()
    saved = context.max_errored_blocks
    context.max_errored_blocks = -1
    dropped = DroppedBatchErrors.install()
    try:
        rows = ray.data.range(6, override_num_blocks=6).map_batches(fail_on_three, batch_size=1).take_all()
    finally:
        dropped.remove()
        context.max_errored_blocks = saved

    assert sorted(r["id"] for r in rows) == [0, 1, 2, 4, 5]
    # The first line of Ray's error: its type and the operator that raised (the failures table's "last error").
    assert len(dropped.errors) == 1 and "Error" in dropped.last and "fail_on_three" in dropped.last, dropped.errors


def test_a_submitted_drivers_runtime_env_is_read(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from pipeline.cluster.ray_private import submitted_job_env

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert submitted_job_env() == {}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, '{"runtime_env": {"env_vars": {"AWS_REGION": "eu-west-1"}}}')
    assert submitted_job_env() == {"AWS_REGION": "eu-west-1"}


def test_restarts_reach_ray_data_through_ray_remote_args_until_map_batches_names_them():
    """Ray 2.60's map_batches names no parameter for max_restarts / max_task_retries, so pipeline/render_stage.py
    passes them through `**ray_remote_args`, which Ray says is deprecated (gone in 2.64): the one deprecated path
    fluxbatch uses. This fails when a named parameter appears (use it, and drop the warning filter there) or when
    the path is gone."""
    import ray.data

    parameters = inspect.signature(ray.data.Dataset.map_batches).parameters
    assert not {"max_restarts", "max_task_retries"} & set(parameters), "map_batches names them now: pass them by name"
    assert parameters["ray_remote_args"].kind is inspect.Parameter.VAR_KEYWORD
    users = [path.relative_to(REPO) for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if "max_task_retries=" in path.read_text()]
    # pipeline/fleet_stage.py starts its actors itself: there they are plain `.options(...)` of an actor class.
    assert users == [Path("pipeline/fleet_stage.py"), Path("pipeline/render_stage.py")]


def test_a_cluster_fluxbatch_starts_can_be_told_to_export_its_metrics_each_second():
    """`ray.init(_system_config=...)` and Ray's `metrics_report_interval_ms` setting still exist. That the setting
    reaches the cluster shows in tests/test_quiet_and_resources.py: at Ray's default (10 s) the end of a run on its
    own cluster, which waits for the endpoint to show its last values, would be silent for longer than 10 s."""
    import ray

    from pipeline.cluster.ray_private import local_cluster_settings

    assert 'kwargs.pop("_system_config"' in inspect.getsource(ray.init)  # a keyword ray.init takes from **kwargs
    assert set(local_cluster_settings()) == {"_system_config"}
    for name in local_cluster_settings()["_system_config"]:
        assert callable(getattr(ray._config, name, None)), name
