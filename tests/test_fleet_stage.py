"""The mixed fleet's queue (pipeline/fleet_stage.py) on the session's real Ray cluster: batches go to whichever
member is free, a batch whose member's process died goes back for another member, a batch that kills every
member that takes it is given up (its rows come back missing), and a pool whose members cannot start is left.

The members render nothing: `Echo` returns each batch's keys (after `seconds` a row), and dies (os._exit, as the
OOM killer would end it) on the rows the test marks. Card types need no `accelerator_type` here: the stages carry
no pin, only a name, so all of them run on the session's one node (tests/test_fleet.py pins them on a cluster
of two types)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray

from flux_worker.fleet_replica import POOL_COLUMN, FleetMember
from pipeline.fleet_stage import FleetStage
from pipeline.render_stage import RenderStage


class Echo:
    """A renderer for the queue's tests: the batch's keys back, after `seconds` per row. A row whose key starts
    with "die" kills the process; "once" does so only the first time (a marker file per key in `marks`)."""

    def __init__(self, model: dict[str, Any], options: Any):
        self.seconds, self.marks = model["seconds"], Path(model["marks"])
        self.name, self.wait_for, self.batches = model.get("name"), model.get("wait_for"), 0
        if model.get("fail_to_start"):
            raise RuntimeError("no such model")
        if model.get("slow_restart") and (self.marks / "once-slow").exists():
            time.sleep(model["slow_restart"])  # rebuilt after the death: seconds in which no member is ready

    def __call__(self, batch: pa.Table) -> pa.Table:
        # `wait_for`: after its first batch, wait (up to a minute) for that pool's first, so both pools are running
        # whatever order their members started in on a loaded machine.
        waited = time.monotonic()
        while self.wait_for and self.batches and not (self.marks / self.wait_for).exists() \
                and time.monotonic() - waited < 60:
            time.sleep(0.05)
        self.batches += 1
        if self.name:
            (self.marks / self.name).touch()
        for key in batch.column("key").to_pylist():
            mark = self.marks / key
            if key.startswith("die") or (key.startswith("once") and not mark.exists()):
                mark.touch()
                os._exit(1)
        time.sleep(self.seconds * batch.num_rows)
        return pa.table({"key": batch.column("key"), "pid": [os.getpid()] * batch.num_rows})


class Rank:
    """An actor a member drives, as a tensor-parallel replica drives its ranks (not restarted when it dies)."""

    def echo(self, keys: list[str], marks: str) -> list[str]:
        if "rank-dies" in keys and not (Path(marks) / "rank-dies").exists():
            (Path(marks) / "rank-dies").touch()
            os._exit(1)
        return keys


class WithRank(Echo):
    """A member whose batches go through a `Rank` actor of its own, started with the member."""

    def __init__(self, model: dict[str, Any], options: Any):
        super().__init__(model, options)
        self.rank = ray.remote(Rank).options(num_cpus=0, max_restarts=0).remote()

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = ray.get(self.rank.echo.remote(batch.column("key").to_pylist(), str(self.marks)))
        return pa.table({"key": keys, "pid": [os.getpid()] * len(keys)})


def pool(card_type: str, replicas: int, marks: Path, seconds: float = 0.02, member: type = Echo,
         **model: Any) -> RenderStage:
    return RenderStage(member=FleetMember, model={"seconds": seconds, "marks": str(marks), **model}, options=None,
                       group={"card_type": card_type, "member": member, "member_kwargs": {}}, num_gpus=None,
                       num_cpus=0.25,
                       replicas=replicas, batch_size=None, max_renderer_deaths=1, env_vars={})


def blocks(keys: list[str], size: int = 2) -> list[pa.Table]:
    return [pa.table({"key": keys[i:i + size]}) for i in range(0, len(keys), size)]


def rendered(stage: FleetStage, keys: list[str]) -> pa.Table:
    return pa.concat_tables(list(stage.run(blocks(keys))))


@pytest.fixture(autouse=True)
def echo_by_value():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_every_batch_once_and_the_faster_pool_takes_more(tmp_path):
    keys = [f"k{i:03d}" for i in range(60)]
    table = rendered(FleetStage([pool("fast", 2, tmp_path, 0.01, name="fast", wait_for="slow"),
                                 pool("slow", 1, tmp_path, 0.1, name="slow")]), keys)
    assert sorted(table.column("key").to_pylist()) == keys  # each once
    took = {name: table.column(POOL_COLUMN).to_pylist().count(name) for name in ("fast", "slow")}
    assert took["fast"] > 2 * took["slow"] > 0, took  # no static split: 2 members at 10x the speed of 1


def test_a_batch_whose_member_died_is_rendered_by_another_and_a_deadly_one_is_given_up(tmp_path):
    keys = [f"k{i:03d}" for i in range(20)] + ["once-a", "k-a", "once-b", "k-b", "die-x", "k-beside-x"]  # 2 a batch
    stage = FleetStage([pool("a", 2, tmp_path)], max_renderer_deaths=1)
    table = rendered(stage, keys)
    done = table.column("key").to_pylist()
    # Killed once: its batch went back to the queue and came back rendered, once.
    assert sorted(k for k in done if k.startswith("once")) == ["once-a", "once-b"]
    assert len(done) == len(set(done))
    # Killed every time: tried 1 + max_renderer_deaths times, then given up with its batch (the driver renders
    # such rows alone: pipeline/run.py); the error is kept for their failure rows.
    assert "die-x" not in done and "k-beside-x" not in done
    assert sorted(done) == sorted(keys[:24])
    assert stage.last_error.startswith(("ActorUnavailableError", "ActorDiedError")), stage.last_error


def test_a_pool_whose_members_cannot_start_is_left_and_none_starting_is_an_error(tmp_path):
    keys = [f"k{i:02d}" for i in range(10)]
    table = rendered(FleetStage([pool("broken", 1, tmp_path, fail_to_start=True), pool("ok", 1, tmp_path)]), keys)
    assert sorted(table.column("key").to_pylist()) == keys
    assert set(table.column(POOL_COLUMN).to_pylist()) == {"ok"}
    with pytest.raises(ray.exceptions.RayActorError, match="no such model"):
        rendered(FleetStage([pool("broken", 1, tmp_path, fail_to_start=True)]), keys)


def test_a_member_whose_rank_died_is_rebuilt_not_left_failing_every_batch(tmp_path):
    """The member's process lives on, but the actor it drives (a tensor-parallel rank) is gone: each call would
    raise that death at once. The queue has Ray rebuild the member (and so its rank), and gives the batch back."""
    keys = [f"k{i:02d}" for i in range(4)] + ["rank-dies", "k-beside"] + [f"m{i:02d}" for i in range(10)]
    table = rendered(FleetStage([pool("a", 1, tmp_path, member=WithRank)], max_renderer_deaths=1), keys)
    assert sorted(table.column("key").to_pylist()) == sorted(keys)  # the batch after the death too, and the rest
    assert len(set(table.column("pid").to_pylist())) == 2  # the member was rebuilt once: a new process


def test_batches_waiting_with_no_renderer_ready_are_said_once(tmp_path, caplog, monkeypatch):
    """The only member died and its rebuild takes seconds (on a cluster, its node is gone with no other of its card
    type): the driver says so in one warning, instead of waiting in silence, and the render goes on after."""
    from pipeline import fleet_stage

    monkeypatch.setattr(fleet_stage, "STALL_SECONDS", 1.0)
    keys = ["once-slow", "k-a", "k-b", "k-c"]
    table = rendered(FleetStage([pool("a", 1, tmp_path, slow_restart=4)], max_renderer_deaths=1), keys)
    assert sorted(table.column("key").to_pylist()) == sorted(keys)
    said = [r.getMessage() for r in caplog.records if "none of the 1 renderers can take one" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("2 batches wait"), said
