"""Run a job: read and validate the manifest, plan, render on a Ray actor pool, commit the ledger.

    manifest ──read+validate──▶ plan ──▶ Ray Data map_batches(Renderer, actor pool) ──▶ metadata parts
                 │                 │                                                ──▶ summary.json, _SUCCESS
                 ▼                 ▼
           failures part     skip keys done
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from flux_worker.model_cache import check_cache_here
from flux_worker.model_folder import is_model_url
from flux_worker.presets import ModelPreset, model_revision, model_source
from flux_worker.storage import NoSpaceLeftError, filesystem, storage_env
from flux_worker.tensor_parallel import GROUP_NAME_PREFIX
from pipeline import preflight, references
from pipeline.cluster import ray_private, resources
from pipeline.cluster.metrics import DriverMetrics, FailureCounts
from pipeline.cluster.ray_auth import keep_token_auth, starts_local_cluster
from pipeline.cluster.ray_private import DroppedBatchErrors
from pipeline.cluster.ray_session import RaySession, connect, job_name, quiet_ray_data, verbose
from pipeline.fleet_stage import fleet_stage, one_pool_stage
from pipeline.lost_batches import lost_image_failures
from pipeline.manifest import read_manifest
from pipeline.plan import expected_keys, has_best_of, plan_images, split_best_of, split_blocks
from pipeline.pool_stats import PoolStats
from pipeline.progress import RenderBar, RunProgress, image_counter
from pipeline.render_stage import render_stage
from pipeline.replica_shape import fleet_pools, joined_pools, resolve_gpus_per_replica
from pipeline.store import (
    candidate_files,
    changed_rows,
    committed_images,
    compaction,
    lease,
    ledger,
    ownership,
    quality_signals,
    run_records,
)
from pipeline.store.pack import pack_images
from schemas import FailureRecord, JobSpec, RunSummary
from schemas.errors import FluxbatchError, first_line
from schemas.layout import FAILURES, JOB_FILE, VERSIONS, is_part_of_run

log = logging.getLogger(__name__)
DISK_FULL = f"write: {NoSpaceLeftError.__name__}: "  # how a renderer reports an image write on a full disk


def render(job: JobSpec, *, new_version: bool = False, allow_non_empty_output: bool = False,
           rerender_changed: bool = False, progress: bool = True, renderer_class: type | None = None,
           named: dict[str, str] | None = None) -> RunSummary:
    """Render every image of `job.manifest` not yet in `job.output`; returns what this run did.

    `renderer_class` (Python API only, never a flag or job field): what each pool member runs instead of
    `Renderer`, with its constructor arguments; the fleet benchmark's stand-in that holds no model.

    An OUTPUT holding files fluxbatch did not write is refused unless `allow_non_empty_output` (store/ownership.py).
    Rows edited since their images were committed are refused unless `rerender_changed` (store/changed_rows.py).
    `named`: how the caller gave each job field, for messages (the CLI: the flag as typed, or the job file's field).
    """
    started = time.monotonic()
    fs, root = filesystem(job.output.uri, job.output.storage_options)
    job = writing_to(job, fs.uri(root))  # absolute: see render_stage.model_for_workers
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    undo = _Undo(fs, root, run_id)
    shown = RunProgress(bar=progress)  # phase lines on stderr (pipeline/progress.py), and the bar if `progress`
    try:
        return _render(job, fs, root, run_id, undo, shown, started, new_version, allow_non_empty_output,
                       rerender_changed, renderer_class, named)
    finally:
        shown.close()


def _render(job: JobSpec, fs: Any, root: str, run_id: str, undo: _Undo, shown: RunProgress, started: float,
            new_version: bool, allow_non_empty_output: bool, rerender_changed: bool, renderer_class: type | None,
            named: dict[str, str] | None) -> RunSummary:
    """`render`, its phases shown by `shown`."""
    try:
        # Model, adapters, manifest files, OUTPUT reachable, ours and writable: a mistake is one line, before
        # anything is written (no _job.json recording a job that never ran) and before Ray starts (preflight.py).
        preset = preflight.check(job, allow_non_empty_output)
        summary = RunSummary(output=job.output.uri, run_id=run_id, model_id=preset.name,
                             model_revision=model_revision(preset, job.model, job.storage_options),
                             model_source=model_source(preset, job.model), marks=job.provenance.marks(),
                             started_at=datetime.now(timezone.utc))
        # Ray, and the resources check, before anything is written: a replica no node of a cluster that cannot
        # grow could hold is refused here in one line (cluster/resources.py), OUTPUT untouched, no actor started.
        # The price: a re-run with nothing left to render starts Ray too.
        session = _ensure_ray(job, shown, named)
        # A mixed fleet: a replica shape per card type (None: one shape).
        pools = fleet_pools(job, shown.say, can_grow=session.can_grow)
        if pools:
            job = job.model_copy(update={"replicas": sum(pool.replicas for pool in pools)})
            shown.say("pools: " + "; ".join(f"{p.card_type}: {p.replicas} x {p.gpus_per_replica:g} GPU"
                                             for p in pools))
        # A fleet's pools have their shapes already (the largest stands for the checks that read one number).
        gpus = max(pool.gpus_per_replica for pool in pools) if pools else resolve_gpus_per_replica(job)
        ask = resources.replica_ask(job, gpus, int(ray.cluster_resources().get("CPU", 1)))
        if pools:
            ask = dataclasses.replace(ask, pools=tuple(pools))
        else:  # a fleet's pools were planned from its nodes: each fits where it is
            resources.check_fits(ask, resources.alive_nodes(), can_grow=session.can_grow, named=named)
        with ExitStack() as leases:
            try:
                # One driver per OUTPUT (store/lease.py): held before anything is written, so a second driver is
                # refused (LeaseHeldError, naming the holder) having written nothing.
                held = leases.enter_context(lease.hold(fs, root, run_id, job.lease_seconds))
                undo.lease_taken(held)
                version_root = undo.check_job(job, new_version)
                if version_root != root:  # another version of OUTPUT (see ledger.py): read and write only there
                    job = writing_to(job, fs.uri(version_root))
                    root, summary.output = version_root, job.output.uri
                    # OUTPUT's lease guarded the choice of version folder; it goes once the plan is made (_Undo).
                    undo.output_lease, held = held, leases.enter_context(
                        lease.hold(fs, root, run_id, job.lease_seconds))
                    undo.leases.append(held)
                return _render_held(job, preset, fs, root, summary, held, shown, started, session, ask,
                                    rerender_changed, renderer_class, undo)
            except FluxbatchError as error:
                undo.refused(error)  # still under the leases, which then put back what they found on release
                raise
    except FluxbatchError as error:
        # A refusal (exit 2 before the plan was made) changed nothing: jobs that wrote into OUTPUT before calling
        # render (synthesize, catalog) put their files back on seeing this (jobs/refusal.py).
        error.refused = undo.is_refusal(error)
        raise
    finally:
        undo.remove_empty_folders()  # after the leases are gone (a lease file sits in OUTPUT)


class _Undo:
    """What a run writes before its plan is made, taken back when it is refused (an error with exit code 2: changed
    rows, a corrupt ledger part, a manifest that cannot be read, mixed formats for WebDataset): a refusal leaves
    OUTPUT byte-identical, `_SUCCESS` and the lease included. Once the plan is made the run is under way and
    nothing is undone. What it takes back is this run's own: its lease (restored to what it found), the
    `_job.json` it wrote, its failure parts (named by its run id) and the empty folders it made on local disk."""

    def __init__(self, fs: Any, root: str, run_id: str):
        self.fs, self.root, self.run_id = fs, root, run_id
        self.leases: list[lease.Lease] = []
        self.output_lease: lease.Lease | None = None  # OUTPUT's, while the run writes a version folder
        self.job_files: list[str] = []
        self.folders: list[str] = []  # local folders this run may make, deepest first, that were not there
        self.roots = [root]  # OUTPUT, and the version folder the run writes if another
        self.under_way = False  # set once the plan is made: from then on nothing is taken back
        self.took_back = False
        self.made_root = fs.local and not os.path.isdir(root)

    def lease_taken(self, held: lease.Lease) -> None:
        """Note the lease, and the folders missing now (not before: another driver may have made them since)."""
        self.leases.append(held)
        if self.fs.local:
            root = self.root
            self.folders = [f for f in (f"{root}/{FAILURES}", f"{root}/{VERSIONS}") if not os.path.isdir(f)]
            self.folders += [root] if self.made_root else []

    def plan_made(self) -> None:
        """From here the run is under way: nothing is taken back, and OUTPUT's lease (when the run writes a version
        folder, which it holds the lease of) goes, so runs of other versions may start."""
        self.under_way = True
        if self.output_lease is not None:
            self.output_lease.release()

    def check_job(self, job: JobSpec, new_version: bool) -> str:
        """`ledger.check_job`, remembering the `_job.json` it writes (a new OUTPUT's, or a new version's)."""
        folder, written = ledger.check_job(self.fs, self.root, job, new_version=new_version)
        if folder != self.root:
            self.roots.append(folder)
        if written:
            self.job_files.append(f"{folder}/{JOB_FILE}")
            if folder != self.root and self.fs.local:
                self.folders[:0] = [f"{folder}/{FAILURES}", folder]
        return folder

    def is_refusal(self, error: FluxbatchError) -> bool:
        """An error with exit code 2 (a usage or configuration mistake) raised before the plan was made."""
        return not self.under_way and getattr(error, "exit_code", 2) == 2

    def refused(self, error: FluxbatchError) -> None:
        """Take back what this run wrote, if `error` refused it before its plan was made."""
        if not self.is_refusal(error):
            return
        self.took_back = True
        for held in self.leases:
            held.restore_on_release = True  # read by release(), which the caller's ExitStack runs after this
        try:
            for folder in self.roots:
                for part in ledger.parts(self.fs, f"{folder}/{FAILURES}"):
                    if is_part_of_run(part, self.run_id):
                        self.fs.rm_file(part)
            for path in self.job_files:
                if self.fs.exists(path):
                    self.fs.rm_file(path)
        except Exception as undo_error:  # noqa: BLE001 - the refusal is what the user must see
            log.warning("could not take back what this refused run wrote: %s", undo_error)

    def remove_empty_folders(self) -> None:
        if not self.took_back:
            return
        for folder in self.folders:
            with contextlib.suppress(OSError):  # not empty (or gone): left as it is
                os.rmdir(folder)


def _render_held(job: JobSpec, preset: ModelPreset, fs: Any, root: str, summary: RunSummary, held: lease.Lease,
                 shown: RunProgress, started: float, session: RaySession, ask: resources.ReplicaAsk,
                 rerender_changed: bool, renderer_class: type | None, undo: _Undo) -> RunSummary:
    """The rest of `render`, run while this driver holds the lease on `root` (OUTPUT or its version folder)."""
    # "start": the checks before anything is written, Ray's start (or joining it) and the lease; apart from reading.
    run_id, seconds = summary.run_id, {"start": time.monotonic() - started}
    mark = time.monotonic()
    compaction.recover(fs, root)  # a compaction killed in an earlier run: finished or undone before anything else
    # The cheap half of `fluxbatch verify`, before this run deletes or writes anything: an unreadable part
    # stops the run in one line naming it (CorruptLedgerError), with the failures of the last run still there.
    committed = changed_rows.read_committed(fs, root)
    # Committed images deleted or altered since (one listing): rendered again, each to a path of its own.
    stale = committed_images.stale_keys(fs, root, committed)
    lacking = candidate_files.keys_missing_candidates(fs, root, committed)  # a candidate file gone: again
    if len(lacking):
        stale = pa.concat_arrays([stale, lacking.cast(stale.type)])
    committed = changed_rows.for_planning(committed)  # what the planner compares: the image columns go
    # Bad rows stream to this run's failure parts as they are found; the previous run's parts stay until the end.
    validate_failures = ledger.FailureWriter(fs, root, run_id, "validate")
    manifest = read_manifest(
        job.manifest,
        job.storage_options,
        limits=job.row_limits(preset.limits),
        model_name=job.model.name,
        adapter_names=set(job.model.adapters),
        output=job.output.uri,  # never read as a manifest; a version folder's OUTPUT is excluded by its _job.json
        sink=validate_failures.add,
    )
    # Every reference image read once, inside the job's roots, before anything renders (pipeline/references.py).
    references.check_manifest(manifest, job, sink=validate_failures.add, tensor_parallel=ask.gpus > 1)
    validate_failures.flush()
    seconds["read"] = time.monotonic() - mark

    mark = time.monotonic()
    # A refusal (changed rows, mixed formats for WebDataset) takes back this run's failure parts (_Undo).
    plan = plan_images(manifest, job, preset, committed, rerender_changed=rerender_changed, stale=stale,
                       run_id=run_id)
    undo.plan_made()
    ledger.record_added_sections(fs, root, job)  # an OUTPUT older than its identity's newest sections gets them
    del committed, stale
    seconds["plan"] = time.monotonic() - mark
    _compact_if_due(fs, root, held, shown)  # a run killed after writing thousands of parts left them
    run_records.clear_success(fs, root)  # OUTPUT no longer says "done" while this run is under way
    ownership.remove_partial_files(fs, root)
    invalid_rows = manifest.failures.rows
    if plan.restored:
        log.warning("%d committed images were missing or altered in %s; rendering them again", plan.restored,
                    fs.uri(root))
    log.info("%d manifest rows, %d invalid; %d images expected, %d already done, %d to render "
             "(%d changed, %d restored)", manifest.total_rows, invalid_rows, plan.expected, plan.already_done,
             plan.table.num_rows, plan.changed, plan.restored)

    mark = time.monotonic()
    failures_by_reason = Counter(manifest.failures.by_reason)
    rendered = 0
    if plan.table.num_rows:
        writer = ledger.MetadataWriter(fs, root, run_id, manifest.extra_fields, seconds=job.commit_seconds,
                                       before_commit=held.check)
        shown.say(session.start_line().removeprefix("fluxbatch: "))  # where to watch the run: dashboard, metrics
        metrics = DriverMetrics(job.output.uri)
        metrics.count_reasons(manifest.failures.by_reason)
        pool_stats = PoolStats(ask.pools)  # a mixed fleet's pools (none for one shape)
        render_failures = _render_plan(job, plan.table, writer, fs, root, run_id, shown, metrics, ask,
                                       session.can_grow, renderer_class, pool_stats)
        summary.pools = pool_stats.summaries()
        rendered = writer.written  # _render_plan flushed the last rows, whatever happened
        if job.provenance.enabled and job.provenance.watermark is not None:
            summary.images_without_watermark = writer.marks[job.provenance.marks(watermark_held=False)]
        summary.candidates_rendered = writer.candidates_rendered
        failures_by_reason.update(render_failures.by_reason)
    seconds["render"] = time.monotonic() - mark
    # Every run ends with the ledger and the images agreeing: one row per key, no image without a row, and every
    # committed image present with its size (one listing). What is still missing is said, never claimed done.
    mark = time.monotonic()
    held.check()
    shown.say("checking the committed images in OUTPUT ...", phase="checking OUTPUT")
    settled = committed_images.settle(fs, root, run_id)
    if settled.missing:
        missing = ledger.FailureWriter(fs, root, run_id, "check")
        for key, problem in settled.missing.items():
            missing.add(FailureRecord(stage="check", key=key, reason=f"committed image {problem}",
                                      at=datetime.now(timezone.utc)))
        missing.flush()
        failures_by_reason.update(f"committed image {problem.split(':', 1)[0]}" for problem in settled.missing.values())
        log.warning("%d committed images are missing or altered in %s (first: %s); their keys render again on the "
                    "next run if their rows are in the manifest, else `fluxbatch verify --repair` drops their rows",
                    len(settled.missing), fs.uri(root), "; ".join(list(settled.missing.values())[:3]))
    seconds["check"] = time.monotonic() - mark
    if job.output.layout != "files":
        # Shards are packed from the finished image files and the ledger, so resume never depends on them.
        mark = time.monotonic()
        shown.say(f"packing the {job.output.layout} shards ...", phase="packing")
        pack_images(job, expected_keys(manifest))
        seconds["pack"] = time.monotonic() - mark

    mark = time.monotonic()
    # Only a run that rendered: a no-op run leaves summary.json and the report as they are, so it reads no more.
    signals = quality_signals.read_signals(fs, root, job.quality.duplicate_distance) if plan.table.num_rows \
        else quality_signals.QualitySignals()
    summary.near_duplicates, summary.scores = signals.near_duplicates, signals.scores
    quality_signals.write_groups(fs, root, run_id, signals.groups)
    if signals.groups:
        log.warning("%d groups of near-duplicate images (%d images, hashes within %d bits) in %s; none deleted: "
                    "see summary.json, report.html or runs/%s/near_duplicates.parquet", len(signals.groups),
                    signals.near_duplicates["images"], job.quality.duplicate_distance, fs.uri(root), run_id)
    seconds["quality"] = time.monotonic() - mark

    summary.manifest_files = len(manifest.files)
    summary.manifest_rows = manifest.total_rows
    summary.invalid_rows = invalid_rows
    summary.images_expected = plan.expected
    summary.images_already_done = plan.already_done
    summary.images_planned = plan.table.num_rows
    summary.images_rendered = rendered
    summary.images_failed = plan.table.num_rows - rendered
    summary.images_missing = len(settled.missing)
    summary.images_total_done = plan.already_done + rendered - _lost_during_run(settled, manifest, plan)
    summary.images_per_second = rendered / seconds["render"] if rendered else 0.0
    summary.failures_by_reason = dict(failures_by_reason)
    summary.finished_at = datetime.now(timezone.utc)
    seconds["total"] = time.monotonic() - started
    summary.seconds = {k: round(v, 3) for k, v in seconds.items()}
    summary.actors = run_records.actor_starts(fs, root, run_id)  # each actor's cold start (flux_worker/cold_start.py)
    ownership.remove_partial_files(fs, root)  # temp files of renderer processes killed during this run
    held.check()  # a driver that lost its lease records nothing more
    # This run's failure parts are all written: they replace the previous run's (a run that stopped earlier
    # left those in place, beside its own).
    ledger.remove_failures_of_other_runs(fs, root, run_id)
    shown.say("writing summary.json and report.html ...", phase="writing the report")
    run_records.write(fs, root, summary)
    _compact_if_due(fs, root, held, shown)  # after the report, which reads this run's own parts
    if session.started_here and plan.table.num_rows:
        # This process's cluster stops with it: its metrics endpoint must show the run's last values first.
        metrics.wait_until_exported(session.metrics_url)
    return summary


def _compact_if_due(fs: Any, root: str, held: lease.Lease, shown: RunProgress) -> None:
    """Merge the ledger's small parts once AUTO_PARTS pile up (store/compaction.py). A compaction that fails is
    a warning: the ledger it leaves reads as before, and the next run tries again."""
    try:
        if not compaction.due(fs, root):
            return
        shown.say("compacting the ledger ...", phase="compacting")
        result = compaction.compact(fs, root, check=held.check)
        shown.say(result.line(fs))
    except lease.LeaseLostError:
        raise
    except Exception as error:  # noqa: BLE001 - the images and the ledger are whole either way
        log.warning("the ledger of %s was not compacted (%s); the next run tries again", fs.uri(root),
                    first_line(error, typed=True))


def _lost_during_run(settled: committed_images.Settled, manifest: Any, plan: Any) -> int:
    """Of the images counted done (done before this run, or committed by it), how many were found missing at its
    end: a manifest's key not planned this run, or one this run committed. Keys outside the manifest count in
    `images_missing` only; a planned key whose render failed was never counted done."""
    if not settled.missing:
        return 0
    expected = expected_keys(manifest)
    planned = set(plan.table.column("key").to_pylist())
    return len({key for key in settled.missing if key in expected and key not in planned} | settled.missing_new)


def _render_plan(job: JobSpec, plan: pa.Table, writer: ledger.MetadataWriter, fs: Any, root: str, run_id: str,
                 shown: RunProgress, metrics: DriverMetrics, ask: resources.ReplicaAsk, can_grow: bool,
                 renderer_class: type | None = None, pool_stats: PoolStats | None = None) -> FailureCounts:
    """Stream the plan through the actor pool (Ray already started); commit finished images, stream failed ones
    to the failure parts; returns their counts."""
    count = image_counter() if shown.show_bar else None  # the bar moves per image written (progress.py)
    pool_stats = pool_stats or PoolStats(())
    stage: Any
    if ask.pools:  # a mixed fleet: a pool per card type over one queue; on a cluster that grows, new types join
        stage = fleet_stage(job, ask, worker_env(), run_id, renderer_class, count,
                            joining=_joining(job, shown, pool_stats) if can_grow else lambda running: [])
    elif has_best_of(plan):  # each block one batch (fleet_stage.one_pool_stage says why not Ray Data)
        stage = one_pool_stage(job, ask, worker_env(), run_id, renderer_class, count)
    else:
        stage = render_stage(job, ask, worker_env(), run_id, renderer_class, image_counter=count)
    failures = ledger.FailureWriter(fs, root, run_id, "render")  # streamed to parts, never all held
    if has_best_of(plan):  # a best-of-n row's images in one batch: blocks cut between rows, each block one batch
        blocks = split_best_of(plan, job.batch_size)
    else:
        blocks = split_blocks(plan, job.replicas, job.batch_size, most=1 if ask.pools else 4)
    quiet = ExitStack()  # Ray Data's console lines off (unless -v); on a cluster that may grow, say what waits
    bar = quiet.enter_context(shown.rendering(plan.num_rows, min(job.replicas, len(blocks)), count))
    results = _Results(plan, writer, failures, metrics, bar, pool_stats)
    dropped = DroppedBatchErrors.install()
    quiet.enter_context(quiet_ray_data())
    notice = quiet.enter_context(resources.PendingNotice(ask)) if can_grow else None
    try:
        for batch in stage.run(blocks):
            if notice:
                notice.started()
            results.add(batch)
        lost = results.missing()
        if lost.num_rows:
            stop_leftover_renderers()  # the first pool's actors must not hold the CPUs the second one needs
            # A row that kills its process takes down its block and the blocks queued on the same actor.
            # Render each lost image alone, one batch at a time per actor, so only such a row is lost.
            log.warning("%d images lost with their batches; rendering each alone once more", lost.num_rows)
            for batch in stage.run([lost.slice(i, 1) for i in range(lost.num_rows)], one_batch_per_member=True):
                results.add(batch)
    finally:
        quiet.close()
        dropped.remove()
        try:
            writer.flush()  # commits the images written so far, also when the run stops early
        finally:
            stop_leftover_renderers()
    last_error = getattr(stage, "last_error", None) or dropped.last  # the queue's own (fleet_stage.py), or Ray Data's
    for failure in lost_image_failures(plan, results.seen, last_error, job.max_renderer_deaths):
        results.fail(failure)
    failures.flush()
    return results.counts


def _joining(job: JobSpec, shown: RunProgress, pool_stats: PoolStats) -> Callable[[set[str]], list[Any]]:
    """For a mixed fleet on a cluster that may grow: the pools of card types whose nodes joined since the start
    (replica_shape.joined_pools), each said in one line and counted in the summary's pools."""

    looked: set[str] = set()  # every card type planned (or left out) so far

    def joining(running: set[str]) -> list[Any]:
        looked.update(running)
        pools = joined_pools(job, looked)
        for pool in pools:
            shown.say(f"card type {pool.card_type} joined the cluster: {pool.replicas} x {pool.gpus_per_replica:g} "
                      "GPU, drawing from the same queue")
            pool_stats.join(pool)
        return pools

    return joining


class _Results:
    """Where the pool's result tables go: finished images to the ledger, failed ones to the failure parts."""

    def __init__(self, plan: pa.Table, writer: ledger.MetadataWriter, failures: ledger.FailureWriter,
                 metrics: DriverMetrics, bar: RenderBar, pools: PoolStats):
        self.plan, self.writer, self.failures, self.metrics, self.bar = plan, writer, failures, metrics, bar
        self.pools = pools  # a mixed fleet's per-pool counts; its members tag their rows with their card type
        self.counts = FailureCounts()
        self.seen: set[str] = set()
        metrics.set_pending(plan.num_rows)

    def add(self, batch: pa.Table) -> None:
        # A batch retried after a lost actor may come back twice; the ledger keeps each key once.
        keys = batch.column("key").to_pylist()
        if any(key in self.seen for key in keys):  # per-key set lookups: a run can return millions of keys
            batch = batch.filter(pa.array([key not in self.seen for key in keys]))
            keys = batch.column("key").to_pylist()
        batch = self.pools.add(batch)  # counted once per key, as the ledger keeps it; the card type tag dropped
        self.seen.update(keys)
        ok = pc.is_null(batch.column("error"))
        self.writer.add(batch.filter(ok))
        failed = [FailureRecord(
            stage="write" if row["error"].startswith("write:") else "render", source=row["source"],
            row=row["row"], request_id=row["request_id"], key=row["key"], variant=row["variant"],
            reason=row["error"], attempts=row["attempts"], at=datetime.now(timezone.utc))
            for row in batch.filter(pc.invert(ok)).to_pylist()]
        for failure in failed:
            self.fail(failure)
        self.metrics.count_failures(failed)
        self.metrics.set_pending(self.plan.num_rows - len(self.seen))
        self.bar.done(len(self.seen))
        full = next((f.reason for f in failed if f.reason.startswith(DISK_FULL)), None)
        if full:  # every later image would fail the same way: stop in one line (exit 1), not one by one
            raise NoSpaceLeftError(full.removeprefix(DISK_FULL))

    def fail(self, failure: FailureRecord) -> None:
        self.failures.add(failure)
        self.counts.add(failure)

    def missing(self) -> pa.Table:
        """The planned images no batch has returned yet."""
        returned = pa.array(list(self.seen), pa.string())
        return self.plan.filter(pc.invert(pc.is_in(self.plan.column("key"), value_set=returned)))


def stop_leftover_renderers() -> None:
    """Kill this driver's renderer actors that outlived their dataset.

    An actor restarting after its process was killed can miss Ray Data's pool shutdown and keep its CPUs
    and GPUs reserved; the next dataset of this driver (the render-alone pass, the next job) would then
    wait for them forever. Between datasets no renderer of ours should be alive, so any left is stopped.
    Ray Data holds its pool's handles, so they are found and stopped by id (pipeline/cluster/ray_private.py).
    """
    for actor in ray_private.actors_of_this_job():
        if actor.state != "DEAD" and actor.renders:
            log.info("stopping leftover renderer actor %s (%s)", actor.actor_id, actor.state)
            ray_private.kill_actor(actor.actor_id)
    # A tensor-parallel replica's placement group outlives the replica (groups belong to the job): remove it,
    # which also stops its rank actors.
    prefix = f"{GROUP_NAME_PREFIX}{ray.get_runtime_context().get_job_id()}-"
    for info in ray.util.placement_group_table().values():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            ray.util.remove_placement_group(ray.util.get_placement_group(info["name"]))


def writing_to(job: JobSpec, output_uri: str) -> JobSpec:
    """The job with its output at `output_uri`: the absolute form of the user's, or a version folder of it."""
    return job.model_copy(update={"output": job.output.model_copy(update={"uri": output_uri})})


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the storage settings, and quiet library imports."""
    quiet = {} if verbose() else {"TRANSFORMERS_VERBOSITY": "error"}  # -v: transformers' warnings as they are
    # diffusers reads a sharded checkpoint a shard per thread with this set (read once, when it is imported);
    # a tensor-parallel load turns it off itself. The user's own setting wins.
    parallel = {"HF_ENABLE_PARALLEL_LOADING": os.environ.get("HF_ENABLE_PARALLEL_LOADING", "yes")}
    return {**quiet, "TOKENIZERS_PARALLELISM": "false", **parallel, **storage_env()}


def env_not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """`env` less the variables a submitted job's runtime env already sets (they reach every worker anyway):
    Ray refuses a driver's `ray.init` that names one of them again, even with the same value."""
    job_env = ray_private.submitted_job_env()
    return {name: value for name, value in env.items() if name not in job_env}


def _ensure_ray(job: JobSpec, shown: RunProgress | None = None, named: dict[str, str] | None = None) -> RaySession:
    """Join the job's Ray cluster, or start a local one, quietly (pipeline/cluster/ray_session.py); storage settings
    travel to every worker.

    Without `--ray-address` (or `RAY_ADDRESS`, which Ray Jobs sets for a submitted driver) fluxbatch starts
    its own local cluster rather than joining whatever `ray start` left on the machine: joining a cluster is
    asked for by name (`--ray-address auto`). Only a joined cluster may grow (an autoscaler); the job's
    address decides, also when the caller initialized Ray already.
    """
    address = job.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized():
        if starts_local_cluster(address):
            resources.check_this_machine_has_gpus(job, named)  # in a second, not after Ray's start
            if is_model_url(job.model.name):  # the renderers fetch it here, into this machine's cache
                check_cache_here(job.model.cache_dir)
        keep_token_auth(address)
        if shown is not None:
            shown.say("starting a local Ray cluster ..." if starts_local_cluster(address) else
                      f"joining the Ray cluster at {address} ...", phase="starting Ray")
    return connect(address, {"env_vars": env_not_set_by_job(worker_env())},
                   can_grow=not starts_local_cluster(address), name=job_name("render", job.output.uri))

