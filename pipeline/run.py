"""Run a job: read and validate the manifest, plan, render on a Ray actor pool, commit the ledger.

    manifest ──read+validate──▶ plan ──▶ Ray Data map_batches(Renderer, actor pool) ──▶ metadata parts
                 │                 │                                                ──▶ summary.json, _SUCCESS
                 ▼                 ▼
           failures part     skip keys done
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from flux_worker.presets import ModelPreset, model_revision
from flux_worker.renderer import Renderer
from flux_worker.storage import NoSpaceLeftError, credential_options, filesystem, storage_env, uri
from flux_worker.tensor_parallel import GROUP_NAME_PREFIX, replica_stage, resolve_gpus_per_replica
from pipeline import changed_rows, lease, ledger, ownership, preflight, resources, run_records
from pipeline.lost_batches import DroppedBatchErrors, lost_image_failures
from pipeline.manifest import read_manifest
from pipeline.metrics import DriverMetrics, FailureCounts
from pipeline.pack import expected_keys, pack_images
from pipeline.plan import plan_images, split_blocks
from pipeline.ray_auth import keep_token_auth, starts_local_cluster
from pipeline.ray_session import RaySession, connect, quiet_ray_data, verbose
from schemas import FailureRecord, JobSpec, ModelSpec, RunSummary

log = logging.getLogger(__name__)
DISK_FULL = f"write: {NoSpaceLeftError.__name__}: "  # how a renderer reports an image write on a full disk


def render(job: JobSpec, *, new_version: bool = False, allow_non_empty_output: bool = False,
           rerender_changed: bool = False, progress: bool = True) -> RunSummary:
    """Render every image of `job.manifest` not yet in `job.output`; returns what this run did.

    An OUTPUT holding files fluxbatch did not write is refused unless `allow_non_empty_output` (pipeline/ownership.py).
    Rows edited since their images were committed are refused unless `rerender_changed` (pipeline/changed_rows.py).
    """
    started = time.monotonic()
    fs, root = filesystem(job.output.uri, job.output.storage_options)
    job = writing_to(job, uri(fs, root))  # absolute: see model_for_workers
    # Model, adapters, manifest files, OUTPUT reachable, ours and writable: a mistake is one line, before anything
    # is written (no _job.json recording a job that never ran) and before Ray starts (pipeline/preflight.py).
    preset = preflight.check(job, allow_non_empty_output)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    summary = RunSummary(output=job.output.uri, run_id=run_id, model_id=preset.name,
                         model_revision=model_revision(preset, job.model), started_at=datetime.now(timezone.utc))

    # Ray, and the resources check, before anything is written: a replica no node of a cluster that cannot
    # grow could hold is refused here in one line (pipeline/resources.py), OUTPUT untouched, no actor started.
    # The price: a re-run with nothing left to render starts Ray too.
    session = _ensure_ray(job)
    ask = resources.replica_ask(job, resolve_gpus_per_replica(job), int(ray.cluster_resources().get("CPU", 1)))
    resources.check_fits(ask, resources.alive_nodes(), can_grow=session.can_grow)
    with ExitStack() as leases:
        # One driver per OUTPUT (pipeline/lease.py): held before anything is written, so a second driver is
        # refused (LeaseHeldError, naming the holder) having written nothing.
        held = leases.enter_context(lease.hold(fs, root, run_id, job.lease_seconds))
        version_root = ledger.check_job(fs, root, job, new_version=new_version)
        if version_root != root:  # another version of OUTPUT (see ledger.py): read and write only there
            job = writing_to(job, uri(fs, version_root))
            root, summary.output = version_root, job.output.uri
            output_lease, held = held, leases.enter_context(lease.hold(fs, root, run_id, job.lease_seconds))
            output_lease.release()  # OUTPUT's lease guarded the choice of version folder only
        return _render_held(job, preset, fs, root, summary, held, progress, started, session, ask, rerender_changed)


def _render_held(job: JobSpec, preset: ModelPreset, fs: Any, root: str, summary: RunSummary, held: lease.Lease,
                 progress: bool, started: float, session: RaySession, ask: resources.ReplicaAsk,
                 rerender_changed: bool = False) -> RunSummary:
    """The rest of `render`, run while this driver holds the lease on `root` (OUTPUT or its version folder)."""
    run_id, seconds = summary.run_id, {}
    # The cheap half of `fluxbatch verify`, before this run deletes or writes anything: an unreadable part
    # stops the run in one line naming it (CorruptLedgerError), with the failures of the last run still there.
    committed = changed_rows.read_committed(fs, root)
    run_records.clear_success(fs, root)  # OUTPUT no longer says "done" while this run is under way
    ownership.remove_partial_files(fs, root)
    # Bad rows stream to this run's failure parts as they are found; the previous run's parts stay until the end.
    validate_failures = ledger.FailureWriter(fs, root, run_id, "validate")
    manifest = read_manifest(
        job.manifest,
        job.storage_options,
        limits=preset.limits,
        model_name=job.model.name,
        adapter_names=set(job.model.adapters),
        output=job.output.uri,  # never read as a manifest; a version folder's OUTPUT is excluded by its _job.json
        sink=validate_failures.add,
    )
    validate_failures.flush()
    seconds["read"] = time.monotonic() - started

    mark = time.monotonic()
    # A refusal of changed rows (ChangedRowsError) writes nothing but this run's parts of bad rows, if any.
    plan = plan_images(manifest, job, preset, committed, rerender_changed=rerender_changed)
    del committed  # the ledger's rows: only the superseded ones are kept, in the plan
    seconds["plan"] = time.monotonic() - mark
    invalid_rows = manifest.failures.rows
    log.info("%d manifest rows, %d invalid; %d images expected, %d already done, %d to render",
             manifest.total_rows, invalid_rows, plan.expected, plan.already_done, plan.table.num_rows)

    mark = time.monotonic()
    failures_by_reason = Counter(manifest.failures.by_reason)
    rendered = 0
    if plan.table.num_rows:
        writer = ledger.MetadataWriter(fs, root, run_id, manifest.extra_fields, seconds=job.commit_seconds,
                                       before_commit=held.check)
        print(session.start_line(), file=sys.stderr)  # where to watch the run: dashboard and metrics
        metrics = DriverMetrics(job.output.uri)
        metrics.count_reasons(manifest.failures.by_reason)
        render_failures = _render_plan(job, plan.table, writer, fs, root, run_id, progress, metrics, ask,
                                       session.can_grow)
        rendered = writer.written  # _render_plan flushed the last rows, whatever happened
        failures_by_reason.update(render_failures.by_reason)
        if plan.changed:  # their new rows are committed: the old ones go, so each key is once on disk
            held.check()
            changed_rows.drop_superseded(fs, root, run_id, plan.superseded)
    seconds["render"] = time.monotonic() - mark
    if job.output.layout != "files":
        # Shards are packed from the finished image files and the ledger, so resume never depends on them.
        mark = time.monotonic()
        pack_images(job, expected_keys(manifest))
        seconds["pack"] = time.monotonic() - mark

    summary.manifest_files = len(manifest.files)
    summary.manifest_rows = manifest.total_rows
    summary.invalid_rows = invalid_rows
    summary.images_expected = plan.expected
    summary.images_already_done = plan.already_done
    summary.images_planned = plan.table.num_rows
    summary.images_rendered = rendered
    summary.images_failed = plan.table.num_rows - rendered
    summary.images_total_done = plan.already_done + rendered
    summary.images_per_second = rendered / seconds["render"] if rendered else 0.0
    summary.failures_by_reason = dict(failures_by_reason)
    summary.finished_at = datetime.now(timezone.utc)
    seconds["total"] = time.monotonic() - started
    summary.seconds = {k: round(v, 3) for k, v in seconds.items()}
    ownership.remove_partial_files(fs, root)  # temp files of renderer processes killed during this run
    held.check()  # a driver that lost its lease records nothing more
    # This run's failure parts are all written: they replace the previous run's (a run that stopped earlier
    # left those in place, beside its own).
    ledger.remove_failures_of_other_runs(fs, root, run_id)
    run_records.write(fs, root, summary)
    if session.started_here and plan.table.num_rows:
        # This process's cluster stops with it: its metrics endpoint must show the run's last values first.
        metrics.wait_until_exported(session.metrics_url)
    return summary


def _render_plan(job: JobSpec, plan: pa.Table, writer: ledger.MetadataWriter, fs: Any, root: str, run_id: str,
                 progress: bool, metrics: DriverMetrics, ask: resources.ReplicaAsk, can_grow: bool) -> FailureCounts:
    """Stream the plan through the actor pool (Ray already started); commit finished images, stream failed ones
    to the failure parts; returns their counts."""
    gpus = ask.gpus  # "auto" already resolved: the memory planner picked the tensor-parallel degree
    on_gpu = gpus > 0
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below shows images/s and ETA
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a batch past max_renderer_deaths becomes failure rows, not a crash

    blocks = split_blocks(plan, job.replicas, job.batch_size)
    stage, kwargs = Renderer, {
        "model": model_for_workers(job.model),
        "output_uri": job.output.uri,
        # Environment credentials ride here, not in the runtime_env: Ray logs a runtime_env's variables.
        "storage_options": {**credential_options(job.output.uri), **job.output.storage_options},
        "batch_invariant": job.batch_invariant,
        "threads": None if on_gpu and not job.cpus_per_replica else ask.threads,
        "max_retries": job.max_retries,
        "jpeg_quality": job.output.jpeg_quality,
        "webp_quality": job.output.webp_quality,
    }
    actor = ask.actor_resources()
    if gpus > 1:
        # One pool member per tensor-parallel group; its rank actors hold the GPUs (flux_worker/tensor_parallel.py).
        stage, kwargs, actor = replica_stage(job, int(gpus), kwargs)

    def dataset(blocks: list[pa.Table], in_flight: int | None = None) -> ray.data.Dataset:
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for max_restarts / max_task_retries yet, so they go in
            # `ray_remote_args`, which warns on every run that it will be replaced; nothing for a user to do.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            return ray.data.from_arrow(blocks).map_batches(
                stage,
                fn_constructor_kwargs=kwargs,
                batch_size=job.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(job.replicas, len(blocks)),
                                                   max_tasks_in_flight_per_actor=in_flight),
                **actor,
                # A lost actor is replaced and its batch re-run, at most max_renderer_deaths times
                # (lost_batches.py).
                max_restarts=-1,
                max_task_retries=job.max_renderer_deaths,
                runtime_env={"env_vars": worker_env()},
            )

    def results() -> Iterator[pa.Table]:
        yield from dataset(blocks).iter_batches(batch_format="pyarrow", batch_size=None)
        lost = plan.filter(pc.invert(pc.is_in(plan.column("key"), value_set=pa.array(list(seen), pa.string()))))
        if lost.num_rows:
            stop_leftover_renderers()  # the first pool's actors must not hold the CPUs the second one needs
            # A row that kills its process takes down its block and the blocks queued on the same actor.
            # Render each lost image alone, one task at a time per actor, so only such a row is lost.
            log.warning("%d images lost with their batches; rendering each alone once more", lost.num_rows)
            alone = [lost.slice(i, 1) for i in range(lost.num_rows)]
            yield from dataset(alone, in_flight=1).iter_batches(batch_format="pyarrow", batch_size=None)

    failures = ledger.FailureWriter(fs, root, run_id, "render")  # streamed to parts, never all held
    counts = FailureCounts()
    seen: set[str] = set()
    bar = tqdm(total=plan.num_rows, unit="img", desc="render", disable=not progress, dynamic_ncols=True)
    dropped = DroppedBatchErrors.install()
    metrics.set_pending(plan.num_rows)
    quiet = ExitStack()  # Ray Data's console lines off (unless -v); on a cluster that may grow, say what waits
    quiet.enter_context(quiet_ray_data())
    notice = quiet.enter_context(resources.PendingNotice(ask)) if can_grow else None
    try:
        for batch in results():
            if notice:
                notice.started()
            # A batch retried after a lost actor may come back twice; the ledger keeps each key once.
            keys = batch.column("key").to_pylist()
            if any(key in seen for key in keys):  # per-key set lookups: a run can return millions of keys
                batch = batch.filter(pa.array([key not in seen for key in keys]))
                keys = batch.column("key").to_pylist()
            seen.update(keys)
            ok = pc.is_null(batch.column("error"))
            writer.add(batch.filter(ok))
            failed = [FailureRecord(
                stage="write" if row["error"].startswith("write:") else "render", source=row["source"],
                row=row["row"], request_id=row["request_id"], key=row["key"], variant=row["variant"],
                reason=row["error"], attempts=row["attempts"], at=datetime.now(timezone.utc))
                for row in batch.filter(pc.invert(ok)).to_pylist()]
            for failure in failed:
                failures.add(failure)
                counts.add(failure)
            metrics.count_failures(failed)
            metrics.set_pending(plan.num_rows - len(seen))
            bar.update(batch.num_rows)
            bar.set_postfix(failed=counts.total, refresh=False)
            full = next((f.reason for f in failed if f.reason.startswith(DISK_FULL)), None)
            if full:  # every later image would fail the same way: stop in one line (exit 1), not one by one
                raise NoSpaceLeftError(full.removeprefix(DISK_FULL))
    finally:
        quiet.close()
        dropped.remove()
        bar.close()
        try:
            writer.flush()  # commits the images written so far, also when the run stops early
        finally:
            stop_leftover_renderers()
    for failure in lost_image_failures(plan, seen, dropped.last, job.max_renderer_deaths):
        failures.add(failure)
        counts.add(failure)
    failures.flush()
    return counts


def stop_leftover_renderers() -> None:
    """Kill this driver's renderer actors that outlived their dataset.

    An actor restarting after its process was killed can miss Ray Data's pool shutdown and keep its CPUs
    and GPUs reserved; the next dataset of this driver (the render-alone pass, the next job) would then
    wait for them forever. Between datasets no renderer of ours should be alive, so any left is stopped.
    """
    from ray._private import state, worker

    job_hex = ray.get_runtime_context().get_job_id()
    for info in state.actors(job_id=ray.JobID.from_hex(job_hex)).values():
        if info["State"] != "DEAD" and info["ActorClassName"].startswith("MapWorker("):
            log.info("stopping leftover renderer actor %s (%s)", info["ActorID"], info["State"])
            worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(info["ActorID"]), True)
    # A tensor-parallel replica's placement group outlives the replica (groups belong to the job): remove it,
    # which also stops its rank actors.
    prefix = f"{GROUP_NAME_PREFIX}{job_hex}-"
    for info in ray.util.placement_group_table().values():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            ray.util.remove_placement_group(ray.util.get_placement_group(info["name"]))


def writing_to(job: JobSpec, output_uri: str) -> JobSpec:
    """The job with its output at `output_uri`: the absolute form of the user's, or a version folder of it."""
    return job.model_copy(update={"output": job.output.model_copy(update={"uri": output_uri})})


def model_for_workers(model: ModelSpec) -> dict[str, Any]:
    """The model spec as renderers get it, local paths made absolute: a worker of a cluster this driver joined
    runs in that cluster's directory, not the driver's, where a relative path points elsewhere or nowhere."""

    def absolute(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path  # a preset name or hub id stays as it is

    data = model.model_dump(mode="json")
    data["name"] = absolute(model.name)
    data["adapters"] = {name: absolute(path) for name, path in model.adapters.items()}
    return data


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the storage settings, and quiet library imports."""
    quiet = {} if verbose() else {"TRANSFORMERS_VERBOSITY": "error"}  # -v: transformers' warnings as they are
    return {**quiet, "TOKENIZERS_PARALLELISM": "false", **storage_env()}


def env_not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """`env` less the variables a submitted job's runtime env already sets (they reach every worker anyway):
    Ray refuses a driver's `ray.init` that names one of them again, even with the same value."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {name: value for name, value in env.items() if name not in job_env}


def _ensure_ray(job: JobSpec) -> RaySession:
    """Join the job's Ray cluster, or start a local one, quietly (pipeline/ray_session.py); storage settings
    travel to every worker.

    Without `--ray-address` (or `RAY_ADDRESS`, which Ray Jobs sets for a submitted driver) fluxbatch starts
    its own local cluster rather than joining whatever `ray start` left on the machine: joining a cluster is
    asked for by name (`--ray-address auto`). Only a joined cluster may grow (an autoscaler); the job's
    address decides, also when the caller initialized Ray already.
    """
    address = job.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized():
        keep_token_auth(address)
    return connect(address, {"env_vars": env_not_set_by_job(worker_env())},
                   can_grow=not starts_local_cluster(address))

