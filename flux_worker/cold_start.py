"""Where an actor's cold start goes: seconds from its process's creation to its first image, stage by stage.

A renderer actor (and rank 0 of a tensor-parallel group) writes one small JSON record, once, after its first
batch: `OUTPUT/runs/<run_id>/actors/<host>-<pid>.json`, through `Storage.write_bytes` (whole or absent), in
fluxbatch's own per-run folder. The driver gathers them into `summary.json`'s `actors` and `report.html` at the
end of the run (pipeline/store/run_records.py). A file per actor rather than a column of the result rows: a cold start
happens once per process, not per image; its record arrives even when every image of the first batch failed;
and the ledger's schema stays as it is. An actor Ray restarts is a new process, so it writes a record of its own.

    process_start   process created -> renderer constructed: Ray's worker start, importing torch and diffusers
    model_load      the constructor: weights to the device, fast-path options applied
    warmup          the first pipeline call: compile (or loading the compile cache) and the first denoising
    first_image     process created -> first image written (everything above, plus any wait for a first batch)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import psutil
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from schemas.errors import first_line
from schemas.layout import ACTORS, run_folder

if TYPE_CHECKING:  # the compile cache imports torch; a stand-in renderer that loads no model must not
    from flux_worker.compile_cache import CompileCache

log = logging.getLogger(__name__)


def actor_record_path(root: str, run_id: str, worker: str) -> str:
    """Where an actor's record goes; `worker` is "host:pid" as in the metadata's worker column."""
    return f"{run_folder(root, run_id)}/{ACTORS}/{worker.replace(':', '-').replace('/', '-')}.json"


class ColdStart:
    """One actor's cold-start clock: made first thing in its constructor, written once after its first batch."""

    def __init__(self, device: str):
        self.constructed = time.time()
        self.created = psutil.Process(os.getpid()).create_time()
        self.device = device
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.loaded: float | None = None
        self.warmup: float | None = None
        self.written = False

    def model_loaded(self) -> None:
        self.loaded = time.time()

    @contextlib.contextmanager
    def first_call(self) -> Iterator[None]:
        """Time the actor's first pipeline call (its warm-up); later calls pass through untimed."""
        if self.warmup is not None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.warmup = time.perf_counter() - start

    def record(self, first_image: float | None, compile_cache: CompileCache | None) -> dict[str, Any]:
        """The actor's record, as schemas.ActorStart reads it."""
        loaded = self.loaded if self.loaded is not None else self.constructed
        record: dict[str, Any] = {
            "worker": self.worker,
            "device": self.device,
            "started_at": datetime.fromtimestamp(self.created, timezone.utc).isoformat(),
            "process_start": round(max(0.0, self.constructed - self.created), 3),
            "model_load": round(loaded - self.constructed, 3),
            "warmup": None if self.warmup is None else round(self.warmup, 3),
            "first_image": None if first_image is None else round(max(0.0, first_image - self.created), 3),
            "compile": compile_cache is not None,
        }
        if compile_cache is not None:
            stats = compile_cache.stats
            record.update(compile_cache_hit=stats.loaded > 0, compile_cache_loaded=stats.loaded,
                          compile_cache_saved=stats.saved, compile_cache_ignored=stats.ignored,
                          **inductor_cache_counts())
        return record

    def after_batch(self, result: pa.Table, fs: Storage, root: str, run_id: str | None,
                    compile_cache: CompileCache | None = None) -> None:
        """After the actor's first batch, write its record (once); a record that cannot be written is logged,
        never fails the batch: the images are what the run is for."""
        if self.written or run_id is None:
            return
        self.written = True
        done = result.filter(pc.is_null(result.column("error"))).column("finished_at")
        first = pc.min(done).as_py() if len(done) else None
        record = self.record(first.timestamp() if first is not None else None, compile_cache)
        path = actor_record_path(root, run_id, self.worker)
        try:
            fs.write_bytes(path, (json.dumps(record, sort_keys=True) + "\n").encode())
        except Exception as error:  # noqa: BLE001
            log.warning("cold-start record %s not written: %s", path, first_line(error, typed=True))
        log.info("cold start: %s", record)


def inductor_cache_counts() -> dict[str, int]:
    """inductor's FX-graph cache hits and misses in this process: what the compile cache saved it from building."""
    try:
        from torch._dynamo.utils import counters  # private, but the one count of what inductor built or reused
    except ImportError:
        return {}
    return {"inductor_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "inductor_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"])}
