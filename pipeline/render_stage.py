"""The render stage as data: what each member of the actor pool runs, with what, on what, under which options.

One value, built by one function (`render_stage`) the same way for a replica of one GPU (or CPU) and for a
tensor-parallel group, then handed whole to Ray Data's `map_batches` (as ray.data.llm's processor configs
are). It lives in pipeline/ because it is the driver's Ray Data graph; what a member runs stays in
flux_worker/ (`Renderer`, `TensorParallelReplica`). The same value describes a pool that the driver's own queue
feeds (pipeline/fleet_stage.py: a mixed fleet's pools, `pool_stage`, and a best-of-n job's one pool); there the
member is `FleetMember` around the pool's class, and `FleetStage.run` starts it, not Ray Data.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from flux_worker.fleet_replica import FleetMember, pin
from flux_worker.model_folder import is_model_url
from flux_worker.storage import credential_options
from pipeline.cluster.resources import ReplicaAsk
from pipeline.replica_shape import group_options
from pipeline.signing import signing_credentials
from schemas import JobSpec, ModelSpec, RenderOptions


@dataclass(frozen=True)
class RenderStage:
    """One `map_batches` stage: a pool of `replicas` members, each `member(model, options, **group)`."""

    member: type  # Renderer, or TensorParallelReplica driving one tensor-parallel group
    model: dict[str, Any]  # the job's model spec as workers read it (`model_for_workers`)
    options: RenderOptions  # the same for a one-device renderer and for each rank of a group
    group: dict[str, Any]  # a group's own arguments (replica_shape.group_options); empty for one device
    num_gpus: float | None  # what each pool member reserves; a group's member holds none, its rank actors do
    num_cpus: float
    replicas: int
    batch_size: int | None  # None: each block is one batch (pipeline/plan.py split_best_of)
    max_renderer_deaths: int  # a batch whose member's process died is re-run at most this often (lost_batches.py)
    env_vars: dict[str, str]
    resources: dict[str, float] = field(default_factory=dict)  # more per member: a fleet pool's card-type pin

    @property
    def fn_constructor_kwargs(self) -> dict[str, Any]:
        return {"model": self.model, "options": self.options, **self.group}

    def run(self, blocks: list[pa.Table], one_batch_per_member: bool = False) -> Iterator[pa.Table]:
        """Each rendered batch's result table, as the pool returns them; `one_batch_per_member` queues no batch
        behind another on the same member (a batch that kills its process then takes only itself)."""
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar shows images/s and ETA
        context.print_on_execution_start = False
        context.max_errored_blocks = -1  # a batch past max_renderer_deaths becomes failure rows, not a crash
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for max_restarts / max_task_retries yet, so they go in
            # `ray_remote_args`, which warns on every run that it will be replaced; nothing for a user to do.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = ray.data.from_arrow(blocks).map_batches(
                self.member,
                fn_constructor_kwargs=self.fn_constructor_kwargs,
                batch_size=self.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(self.replicas, len(blocks)),
                                                   max_tasks_in_flight_per_actor=1 if one_batch_per_member else None),
                num_gpus=self.num_gpus,
                num_cpus=self.num_cpus,
                max_restarts=-1,  # a lost member is replaced...
                max_task_retries=self.max_renderer_deaths,  # ...and its batch re-run, this often at most
                runtime_env={"env_vars": self.env_vars},
            )
        yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


class ImportedInActor:
    """A pool member whose real class is imported in the actor's own process, never in the driver's.

    `Renderer` and `TensorParallelReplica` import torch and diffusers (about 5 s and 400 MB); the driver only
    hands Ray Data a class, so it stays light: `fluxbatch render` starts sooner and its process holds less."""

    target = ""  # "module:Class", set by `in_actor`

    def __init__(self, **kwargs: Any):
        module, name = self.target.split(":")
        self.member = getattr(importlib.import_module(module), name)(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.member(batch)


def in_actor(target: str) -> type:
    """A class named like `target`'s (the Ray dashboard shows MapBatches(Renderer)) that builds it in the actor."""
    return type(target.split(":")[1], (ImportedInActor,), {"target": target})


RENDERER = "flux_worker.renderer:Renderer"
TENSOR_PARALLEL_REPLICA = "flux_worker.tensor_parallel:TensorParallelReplica"


def render_stage(job: JobSpec, ask: ReplicaAsk, env_vars: dict[str, str], run_id: str | None = None,
                 renderer_class: type | None = None, image_counter: Any = None) -> RenderStage:
    """The stage rendering `job` with replicas of `ask` ("auto" GPUs already resolved by the memory planner); a
    mixed fleet's is pipeline/fleet_stage.py's, one `pool_stage` per card type.

    `run_id`: where each actor writes its cold-start record. `renderer_class`: a stand-in for `Renderer` taking
    its arguments (the fleet benchmark's; Python API only). `image_counter`: where renderers count each image
    they write, for the bar (pipeline/progress.py)."""
    threads = None if ask.gpus > 0 and not job.cpus_per_replica else ask.threads
    member, group, num_gpus, num_cpus = renderer_class or in_actor(RENDERER), {}, ask.gpus or None, ask.cpus
    if ask.gpus > 1:
        # One pool member per group, holding nothing itself: its rank actors hold the GPUs and the CPUs, in
        # the group's placement group (flux_worker/tensor_parallel.py); each rank runs its share of the cores.
        member, num_gpus, num_cpus = in_actor(TENSOR_PARALLEL_REPLICA), None, 0
        group = group_options(job, int(ask.gpus))
        threads = group["cpus_per_rank"] if threads else None
    options = RenderOptions.for_job(
        job,
        # Environment credentials ride here, not in the runtime_env: Ray logs a runtime_env's variables.
        storage_options={**credential_options(job.output.uri), **job.output.storage_options},
        threads=threads,
        run_id=run_id,
        # Ranks neither compile nor read reference images (both refused before planning).
        compile_cache_options=None if "tp_degree" in group else compile_cache_options(job),
        reference_storage_options=None if "tp_degree" in group else reference_storage_options(job),
        model_storage_options=model_storage_options(job),
        hub_token=hub_token(job),
        image_counter=image_counter,
        signing=signing_credentials(job),  # like the hub token: in the arguments, never the runtime_env
    )
    return RenderStage(member=member, model=model_for_workers(job.model), options=options, group=group,
                       num_gpus=num_gpus, num_cpus=num_cpus, replicas=job.replicas, batch_size=job.batch_size,
                       max_renderer_deaths=job.max_renderer_deaths, env_vars=env_vars)


def pool_stage(job: JobSpec, pool: Any, base: RenderStage, renderer_class: type | None = None) -> RenderStage:
    """One pool of a mixed fleet (a `fleet_plan.PoolPlan`), as pipeline/fleet_stage.py starts its members: `base`
    (the job's one-GPU stage: model, options, environment) with members of the pool's card type and shape
    (flux_worker/fleet_replica.py). A tensor-parallel member holds no GPU itself, its group's rank actors do, in
    bundles pinned to the type; a stand-in renderer holds a group's GPUs itself, as one actor."""
    holds = pool.degree == 1 or renderer_class is not None
    if holds:
        member, kwargs = renderer_class or base.member, {}
    else:
        member = in_actor(TENSOR_PARALLEL_REPLICA)
        kwargs = {**group_options(job, pool.degree, pool.memory), "resources": pin(pool.card_type)}
    return replace(
        queued(base, pool.card_type, member, kwargs), replicas=pool.replicas,
        num_gpus=pool.gpus_per_replica if holds else None, num_cpus=(job.cpus_per_replica or 1) if holds else 0,
        resources=pin(pool.card_type))


def queued(stage: RenderStage, card_type: str, member: type, member_kwargs: dict[str, Any]) -> RenderStage:
    """`stage` as a pool the driver's queue feeds (pipeline/fleet_stage.py): each member a `FleetMember` building
    `member(model=, options=, **member_kwargs)`, its results tagged with `card_type` (none when empty)."""
    return replace(stage, member=FleetMember,
                   group={"card_type": card_type, "member": member, "member_kwargs": member_kwargs})


def compile_cache_options(job: JobSpec) -> dict[str, Any] | None:
    """Storage options for a `model.compile_cache` on an object store: the output's, with the driver's credentials
    for the cache's URL (they travel like the output's, never in the runtime_env). None for a local cache."""
    uri = job.model.compile_cache
    if not job.model.compile or not uri or "://" not in uri or uri.startswith("file://"):
        return None
    return {**credential_options(uri), **job.output.storage_options}


def reference_storage_options(job: JobSpec) -> dict[str, Any]:
    """Storage options for reading rows' reference images on workers: the manifest's, with the driver's
    environment credentials when a reference root (or the manifest, the default root) is on S3."""
    on_s3 = next((url for url in [*job.reference_roots, job.manifest] if url.startswith(("s3://", "s3a://"))), "")
    return {**credential_options(on_s3), **job.storage_options}


def model_storage_options(job: JobSpec) -> dict[str, Any]:
    """Storage options for fetching a model URL on workers (the pipeline's, or a scorer's: schemas/quality.py): the
    manifest's, with the driver's environment credentials for the URL (as the output's travel: in the constructor
    arguments, never the runtime_env)."""
    url = next((name for name in (job.model.name, job.quality.clip, job.quality.aesthetic)
                if name and is_model_url(name)), None)
    if url is None:
        return {}
    return {**credential_options(url), **job.storage_options}


def hub_token(job: JobSpec) -> str | None:
    """The driver's Hugging Face token (HF_TOKEN, or the file `hf auth login` writes) for a hub model: a worker on
    another node has neither. It travels like storage credentials, never in the runtime_env, a log or OUTPUT."""
    name = job.model.name
    if is_model_url(name) or Path(name).expanduser().is_dir():
        return None
    from huggingface_hub import get_token

    return get_token()


def model_for_workers(model: ModelSpec) -> dict[str, Any]:
    """The model spec as renderers get it, local paths made absolute: a worker of a cluster this driver joined
    runs in that cluster's directory, not the driver's, where a relative path points elsewhere or nowhere."""

    def absolute(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path  # a preset name or hub id stays as it is

    data = model.model_dump(mode="json")
    data["name"] = absolute(model.name)
    data["adapters"] = {name: absolute(path) for name, path in model.adapters.items()}
    if model.compile_cache and "://" not in model.compile_cache:  # a folder that may not exist yet
        data["compile_cache"] = str(Path(model.compile_cache).expanduser().resolve())
    if model.cache_dir and not model.cache_dir.startswith("~"):  # "~": each node's own home
        data["cache_dir"] = str(Path(model.cache_dir).resolve())
    return data
