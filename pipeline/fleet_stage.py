"""A mixed fleet's render stage: a pool of actors per card type, each in its type's shape, all fed from one queue.

Ray Data runs one actor shape per map stage, and a fleet needs a shape per card type (TP-1 on 80 GB cards, TP-2
groups on 24 GB ones) drawing from one stream of batches. So the driver runs the fleet's pools itself: each
member is an actor of its own (flux_worker/fleet_replica.py, `FleetMember`), started with one replica of its
type's resources and pinned to that type's nodes, and `FleetStage.run` keeps one queue of batches, handing the
next one to whichever member is free. A faster pool so takes more, and with one batch per member the pools'
last images come within about one batch of each other: no static split.

What a single pool gets from Ray Data, the queue does here, in the driver's thread:
- a member whose process dies (killed, OOM, its node removed) gives its batch back to the front of the queue
  for any member to take, and is used again once Ray has restarted it (on its own type, with the same
  resources); a batch whose member died `max_renderer_deaths + 1` times is given up, and its rows come back
  missing, as with Ray Data (pipeline/run.py then renders each alone: pipeline/lost_batches.py);
- a member whose render raised gives its batch up the same way; the error is kept for the failure rows;
- a member that cannot start (its constructor raised) is left; when no member is left the first such error
  is raised, as Ray Data would.
And what Ray Data cannot do: every `WATCH_SECONDS` the driver asks `joining` for the pools of card types whose
nodes joined the cluster since (an autoscaled node group), and their members start taking from the same queue.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipeline.cluster.resources import ReplicaAsk
from pipeline.render_stage import RenderStage, pool_stage, queued, render_stage
from schemas import JobSpec
from schemas.errors import first_line

log = logging.getLogger(__name__)

WATCH_SECONDS = 5.0  # how often the cluster is looked at for card types that joined it
STALL_SECONDS = 120.0  # batches waiting this long with no member rendering or ready are said, once per stall
DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
        ray.exceptions.NodeDiedError)


@dataclass
class _Member:
    handle: Any
    card_type: str
    pid: int | None = None  # its process, once ready; a rebuilt member answers from another
    replaced: int | None = None  # the process being replaced: an answer from it is not the rebuilt member's


@dataclass
class FleetStage:
    """The pools' stages; `joining(card types running)` gives the stages of card types that joined the cluster
    (none when the cluster cannot grow)."""

    pools: list[RenderStage]
    joining: Callable[[set[str]], list[RenderStage]] = lambda running: []
    max_renderer_deaths: int = 3
    last_error: str | None = field(default=None, init=False)  # of a batch given up: for its rows' failure reason

    def run(self, blocks: list[pa.Table], one_batch_per_member: bool = False) -> Iterator[pa.Table]:
        """Each rendered batch's result table (with the pool column), as the members return them. A member takes
        one batch at a time, always (`one_batch_per_member` is the single pool's choice)."""
        if not blocks:
            return
        waiting = deque(range(len(blocks)))  # indexes into blocks, in plan order
        deaths: Counter[int] = Counter()
        starting: dict[Any, _Member] = {}  # ready() call -> its member, until the member is (re)built
        rendering: dict[Any, tuple[_Member, int]] = {}  # render() call -> its member and batch
        free: deque[_Member] = deque()
        members: list[_Member] = []
        start_errors: list[BaseException] = []
        later: list[tuple[float, _Member]] = []  # members to ask `ready` again, and when

        def start(stage: RenderStage, most: int) -> None:
            member_class = ray.remote(stage.member).options(
                num_gpus=stage.num_gpus or 0, num_cpus=stage.num_cpus, resources=stage.resources,
                max_restarts=-1,  # a member whose process died is restarted with its resources: on its card type
                max_task_retries=0,  # its batch goes back to the queue instead, for any member to take
                runtime_env={"env_vars": stage.env_vars})
            for _ in range(min(stage.replicas, most)):
                member = _Member(member_class.remote(**stage.fn_constructor_kwargs), stage.group["card_type"])
                members.append(member)
                starting[member.handle.ready.remote()] = member

        try:
            for stage in self.pools:
                start(stage, len(blocks))
            watched = moved = time.monotonic()  # moved: the last result or member ready
            stall_said = False
            while waiting or rendering:
                if rendering or free:
                    moved, stall_said = time.monotonic(), False
                elif not stall_said and time.monotonic() - moved >= STALL_SECONDS:
                    stall_said = True
                    log.warning("%d batches wait and none of the %d renderers can take one for %.0f s: each is "
                                "starting or restarting (a node removed, with no other of its card type to hold "
                                "it?); the render goes on when one is ready", len(waiting), len(members),
                                time.monotonic() - moved)
                while free and waiting:
                    member, index = free.popleft(), waiting.popleft()
                    rendering[member.handle.render.remote(blocks[index])] = (member, index)
                for when, member in [item for item in later if item[0] <= time.monotonic()]:
                    later.remove((when, member))
                    starting[member.handle.ready.remote()] = member
                if not rendering and not starting:
                    if not later:  # every member failed to start
                        raise start_errors[0]
                    time.sleep(max(0.0, min(when for when, _ in later) - time.monotonic()))
                    continue
                done, _ = ray.wait([*rendering, *starting], num_returns=1, timeout=1.0)
                for call in done:
                    if call in starting:
                        member = starting.pop(call)
                        try:
                            pid = ray.get(call)
                            if pid == member.replaced:  # asked before Ray stopped the old process: again
                                later.append((time.monotonic() + 0.5, member))
                                continue
                            member.pid, member.replaced = pid, None
                            free.append(member)
                        except ray.exceptions.ActorUnavailableError:  # restarting: ask again in a second
                            later.append((time.monotonic() + 1.0, member))
                        except DIED as error:  # its constructor raised: Ray does not restart it
                            log.warning("a %s renderer could not start: %s", member.card_type, first_line(error))
                            start_errors.append(error)
                        continue
                    member, index = rendering.pop(call)
                    try:
                        table = ray.get(call)
                    except DIED as error:
                        # Its process died (or is unreachable: the batch may still be running there; the ledger
                        # keeps each key once). Or its process lives but its replica is broken: a tensor-parallel
                        # group whose rank died raises that death from the member, which would answer `ready` at
                        # once and fail every batch it takes; Ray rebuilds it instead.
                        if isinstance(error, ray.exceptions.RayTaskError):
                            member.replaced = member.pid
                            ray.kill(member.handle, no_restart=False)
                        self._give_back(index, deaths, waiting, error)
                        starting[member.handle.ready.remote()] = member  # free again once Ray rebuilt it
                        continue
                    except ray.exceptions.RayTaskError as error:  # the render raised: its rows come back missing
                        self.last_error = first_line(error.cause if error.cause else error, typed=True)[:400]
                        log.warning("a batch failed on a %s renderer: %s", member.card_type, self.last_error)
                        free.append(member)
                        continue
                    except ray.exceptions.RayError as error:  # its result lost on the way (object or owner lost)
                        self._give_back(index, deaths, waiting, error)
                        free.append(member)
                        continue
                    free.append(member)
                    yield table
                if waiting and time.monotonic() - watched >= WATCH_SECONDS:  # (none need start for the last few)
                    watched = time.monotonic()
                    for stage in self._joined({member.card_type for member in members}):
                        self.pools.append(stage)
                        start(stage, len(waiting))  # no more members than batches left
        finally:
            for member in members:
                ray.kill(member.handle, no_restart=True)

    def _joined(self, running: set[str]) -> list[RenderStage]:
        """`joining`'s stages; a look that fails (the cluster's control store, the model's files) is tried again at
        the next one, and the render goes on."""
        try:
            return self.joining(running)
        except Exception as error:  # noqa: BLE001 - a look, not the render
            log.warning("looking for card types that joined the cluster failed: %s", first_line(error, typed=True))
            return []

    def _give_back(self, index: int, deaths: Counter, waiting: deque, error: BaseException) -> None:
        """A batch whose member died: to the front of the queue, or given up after `max_renderer_deaths`."""
        deaths[index] += 1
        self.last_error = first_line(error, typed=True)[:400]
        if deaths[index] <= self.max_renderer_deaths:
            waiting.appendleft(index)
        else:
            log.warning("a batch's renderer died %d times; its images are rendered alone", deaths[index])


def one_pool_stage(job: JobSpec, ask: ReplicaAsk, env_vars: dict[str, str], run_id: str | None = None,
                   renderer_class: type | None = None, image_counter: Any = None) -> FleetStage:
    """The job's one shape (`render_stage`'s stage) run as a pool of no card type over the queue. For a plan whose
    blocks must each render as one batch (best-of-n: pipeline/plan.py split_best_of): Ray Data takes whole
    blocks only with `batch_size=None`, which it refuses for a pool that asks for GPUs."""
    base = render_stage(job, ask, env_vars, run_id, renderer_class, image_counter)
    return FleetStage(pools=[queued(base, "", base.member, base.group)], max_renderer_deaths=job.max_renderer_deaths)


def fleet_stage(job: JobSpec, ask: ReplicaAsk, env_vars: dict[str, str], run_id: str | None = None,
                renderer_class: type | None = None, image_counter: Any = None,
                joining: Callable[[set[str]], list[Any]] = lambda running: []) -> FleetStage:
    """The stage rendering `job` on the pools of `ask.pools` (`render_stage`'s arguments); `joining(card types
    running)`: the `PoolPlan`s of card types that joined the cluster since (pipeline/run.py)."""
    # What every pool's members share, a tensor-parallel group's ranks too: the options of a one-GPU replica.
    base = render_stage(job, ReplicaAsk(gpus=1, cpus=1, replicas=job.replicas), env_vars, run_id, None,
                        image_counter)

    def stages(pools: Any) -> list[RenderStage]:
        return [pool_stage(job, pool, base, renderer_class) for pool in pools]

    return FleetStage(pools=stages(ask.pools), joining=lambda running: stages(joining(running)),
                      max_renderer_deaths=job.max_renderer_deaths)
