"""Can the cluster hold the renderer pool the job asks for? Refuse at once, or say what is pending.

Ray queues an actor whose resources no node has and waits for them forever (it warns "the job may hang
forever"). A cluster fluxbatch starts for itself never grows, so an ask that fits no node of it is a
configuration error, refused in one line before any actor starts. A cluster the run joins
(`--ray-address`, `RAY_ADDRESS`) may have an autoscaler that adds nodes on demand: there the run waits,
and says what it is waiting for if the pool has not started after a minute.

A replica is one actor (`num_gpus`, `num_cpus`) or, from 2 GPUs up, one tensor-parallel group: N bundles
of one GPU each, packed onto one node (STRICT_PACK, flux_worker/tensor_parallel.py). Either way one
replica must fit on one node, so nodes are checked one by one, not only the cluster's totals.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from flux_worker.tensor_parallel import GROUP_NAME_PREFIX
from pipeline.cluster import ray_private
from pipeline.replica_shape import cpus_per_rank
from schemas import JobSpec
from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)

PENDING_NOTICE_SECONDS = float(os.environ.get("FLUXBATCH_PENDING_NOTICE_SECONDS", "60"))


class ClusterTooSmallError(FluxbatchError):
    """The job asks for more per replica than any node of a cluster that cannot grow has."""


@dataclass(frozen=True)
class ReplicaAsk:
    """What one replica reserves on one node, and how many replicas the job wants."""

    gpus: float
    cpus: float
    replicas: int
    threads: int = 1  # torch threads of a CPU replica (Ray sets OMP_NUM_THREADS to num_cpus, see DESIGN.md)
    pools: tuple = ()  # a mixed fleet's pools (replica_shape.fleet_pools: a shape per card type); () for one shape

    def needs(self) -> dict[str, float]:
        return {"GPU": self.gpus, "CPU": self.cpus}

    def describe(self) -> str:
        parts = [_count(self.gpus, "GPU")] if self.gpus else []
        return " and ".join([*parts, _count(self.cpus, "CPU")]) + " per replica"


def replica_ask(job: JobSpec, gpus: float, cluster_cpus: int) -> ReplicaAsk:
    """The resources one replica of `job` reserves, `gpus` being its resolved GPUs per replica.

    The one place this is computed: the pool is built from it (pipeline/run.py) and the check reads it.
    """
    threads = job.cpus_per_replica or max(1, cluster_cpus // job.replicas)
    if gpus > 1:  # a tensor-parallel group: its rank actors hold the GPUs and the CPUs, all on one node
        degree = int(gpus)
        return ReplicaAsk(gpus=degree, cpus=degree * cpus_per_rank(job, degree), replicas=job.replicas,
                          threads=threads)
    cpus = job.cpus_per_replica or (1 if gpus > 0 else threads)
    return ReplicaAsk(gpus=gpus, cpus=cpus, replicas=job.replicas, threads=threads)


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def replicas_that_fit(ask: ReplicaAsk, nodes: list[dict[str, float]]) -> int:
    """How many replicas the nodes could hold at once if nothing else ran on them."""
    total = 0
    for node in nodes:
        counts = [int(node.get(name, 0.0) // amount + 1e-9) for name, amount in ask.needs().items() if amount]
        total += min(counts) if counts else ask.replicas
    return total


def shortfall(ask: ReplicaAsk, nodes: list[dict[str, float]]) -> str:
    """The cluster's side of a refusal: what it has, per node where there are several."""
    def amounts(node: dict[str, float]) -> str:
        return " and ".join(_count(node.get(name, 0.0), name) for name in ("GPU", "CPU"))

    if len(nodes) == 1:
        return f"the cluster has {amounts(nodes[0])}"
    largest = {name: max((n.get(name, 0.0) for n in nodes), default=0.0) for name in ("GPU", "CPU")}
    return f"the cluster has {len(nodes)} nodes, each with at most {amounts(largest)} (a replica never spans nodes)"


def check_fits(ask: ReplicaAsk, nodes: list[dict[str, float]], can_grow: bool,
               named: dict[str, str] | None = None) -> None:
    """Raise `ClusterTooSmallError` when no node of a cluster that cannot grow holds one replica.

    Fewer nodes than `replicas` replicas still render, with the replicas that fit: that is said in one line.
    `named`: how the user gave each job field (`--gpus-per-replica`, or "gpus_per_replica in job.yaml").
    """
    fit = replicas_that_fit(ask, nodes)
    if fit >= ask.replicas or can_grow:
        return
    if fit == 0:
        field = "gpus_per_replica" if ask.gpus and not any(n.get("GPU", 0.0) >= ask.gpus for n in nodes) \
            else "cpus_per_replica"
        flag = (named or {}).get(field) or field
        raise ClusterTooSmallError(
            f"{flag} asks for {ask.describe()}, but no node has that: {shortfall(ask, nodes)}; "
            f"lower {field}, or join a larger cluster with --ray-address")
    log.warning("only %d of %d replicas fit on this cluster (%s; %s); rendering with %d",
                fit, ask.replicas, ask.describe(), shortfall(ask, nodes), fit)


def check_this_machine_has_gpus(job: JobSpec, named: dict[str, str] | None = None) -> None:
    """Before a local cluster starts (Ray takes seconds): a job asking for GPUs on a machine without any is
    refused at once, as `check_fits` would refuse it once Ray had started."""
    if job.gpus_per_replica == "auto" or not job.most_gpus_per_replica() or machine_gpus():
        return
    flag = (named or {}).get("gpus_per_replica") or "gpus_per_replica"
    raise ClusterTooSmallError(
        f"{flag} asks for {_count(job.most_gpus_per_replica(), 'GPU')} per replica, but this machine has no GPU "
        "(a run without --ray-address starts its Ray cluster here); set gpus_per_replica 0 to render on CPU, or "
        "join a cluster with GPUs with --ray-address")


def machine_gpus() -> int:
    """The NVIDIA GPUs a Ray cluster started here would see: CUDA_VISIBLE_DEVICES when set, else the device files
    (what Ray's own detection finds, without importing torch or NVML)."""
    import glob

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1" and d != "NoDevFiles"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def _count(value: float, name: str) -> str:
    return f"{value:g} {name}{'' if value == 1 else 's'}"


class PendingNotice:
    """On a cluster that may grow: if no batch came back within `seconds`, say once what the pool waits for.

    The line is printed only when something of ours is really waiting (a queued renderer actor or
    tensor-parallel group), or, when that cannot be asked, when no node could hold a replica: a pool that
    is only slow to load its model stays quiet.
    """

    def __init__(self, ask: ReplicaAsk, seconds: float = PENDING_NOTICE_SECONDS,
                 say: Callable[[str], None] | None = None):
        self.ask, self.say = ask, say or log.warning
        self.timer = threading.Timer(seconds, self._notice)
        self.timer.daemon = True

    def __enter__(self) -> PendingNotice:
        self.timer.start()
        return self

    def started(self) -> None:
        """A batch came back: the pool is running."""
        self.timer.cancel()

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def _notice(self) -> None:
        try:
            nodes = alive_nodes()
            waiting = pending_renderers()
            if waiting is None:
                waiting = replicas_that_fit(self.ask, nodes) == 0
            if waiting:
                replicas = f"{self.ask.replicas} replica{'s' if self.ask.replicas != 1 else ''}"
                self.say(f"waiting for {self.ask.describe()} x {replicas}; "
                         f"{shortfall(self.ask, nodes)}; check the autoscaler")
        except Exception as error:  # a notice must never stop the run it describes
            log.info("could not tell what the renderer pool waits for: %s", error)


def pending_renderers() -> bool | None:
    """Whether a renderer actor or tensor-parallel group of this driver's job waits for resources; None when
    Ray's state API cannot be asked (a cluster without its dashboard)."""
    import ray
    from ray.util.state import list_actors

    job_hex = ray.get_runtime_context().get_job_id()
    prefix = f"{GROUP_NAME_PREFIX}{job_hex}-"
    groups = ray.util.placement_group_table().values()
    if any(g.get("name", "").startswith(prefix) and g.get("state") == "PENDING" for g in groups):
        return True
    try:
        actors = list_actors(filters=[("job_id", "=", job_hex), ("state", "=", "PENDING_CREATION")],
                             raise_on_missing_output=False)
    except Exception:  # no dashboard, or an older cluster: fall back to the cluster's totals
        return None
    return any(ray_private.is_renderer(a.class_name) for a in actors)
