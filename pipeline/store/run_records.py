"""What a run leaves to say what it did: `_SUCCESS`, `summary.json`, `report.html`, `runs/<run_id>/summary.json`.

- `runs/<run_id>/summary.json`: every run's own summary; the history of OUTPUT, one folder per run. The last
  RUNS_KEPT runs keep their folders; an older run's summary becomes one row of `runs/history.parquet` (its
  counts, and the whole summary as JSON) and its folder is removed, so a daily job's OUTPUT holds at most
  RUNS_KEPT folders however many years it runs (`retain`).
- `summary.json` and `report.html` at the root: the latest run that had images to render (`images_planned`
  above 0), i.e. the run that made (or tried to make) what OUTPUT holds. A no-op re-run, with nothing left to
  render, leaves them as they are, so its empty report never hides the images; it writes them when there are
  none yet, and when it finds OUTPUT complete where they say it is not, or the other way round (committed
  images deleted since): they never claim more than is on disk.
- `runs/<run_id>/actors/<host>-<pid>.json`: each renderer actor's cold start, written by the actor once after its
  first batch (flux_worker/cold_start.py); gathered into the summary's `actors` when the run ends.
- `_SUCCESS`: removed when a run starts (once it holds the lease) and written, with its summary, when it
  ends, so it exists only while no run is under way and the last one finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import Storage
from pipeline.store.ledger import parquet_bytes
from pipeline.store.report import write_report
from schemas import ActorStart, RunSummary
from schemas.errors import first_line
from schemas.layout import ACTORS, RUN_HISTORY, RUN_ID, RUNS, SUCCESS_FILE, SUMMARY_FILE, describes, run_folder

log = logging.getLogger(__name__)



def clear_success(fs: Storage, root: str) -> None:
    """Remove `_SUCCESS`: from here until this run ends, OUTPUT is not a finished output."""
    path = f"{root}/{SUCCESS_FILE}"
    if fs.exists(path):
        fs.rm_file(path)


def actor_starts(fs: Storage, root: str, run_id: str) -> list[ActorStart]:
    """The cold-start records this run's renderer actors wrote, in the order their processes started.

    A record that cannot be read (an actor killed mid-write leaves none: writes are whole) is left out with a
    log line: it describes the run, it is not the run's result."""
    folder = f"{run_folder(root, run_id)}/{ACTORS}"
    if not fs.exists(folder):
        return []
    starts = []
    for path in sorted(p for p in fs.find(folder) if p.endswith(".json")):
        try:
            starts.append(ActorStart.model_validate(json.loads(fs.read_bytes(path))))
        except ValueError as error:
            log.warning("cold-start record %s left out: %s", path, error)
    return sorted(starts, key=lambda start: start.started_at)


def _complete(fs: Storage, path: str) -> bool | None:
    """What a recorded summary says of completeness (None when it cannot be read)."""
    try:
        return json.loads(fs.read_bytes(path)).get("complete")
    except (ValueError, AttributeError):
        return None


def write(fs: Storage, root: str, summary: RunSummary) -> None:
    """Record a finished run: its own summary, the root summary and report if it rendered, then `_SUCCESS`."""
    body = (summary.model_dump_json(indent=2) + "\n").encode()
    fs.write_bytes(f"{run_folder(root, summary.run_id)}/{SUMMARY_FILE}", body)
    latest = f"{root}/{SUMMARY_FILE}"
    if summary.images_planned or not fs.exists(latest) or _complete(fs, latest) != summary.complete:
        fs.write_bytes(latest, body)
        write_report(fs, root, summary)
    fs.write_bytes(f"{root}/{SUCCESS_FILE}", body)
    try:
        retain(fs, root)
    except Exception as error:  # noqa: BLE001 - the run is recorded; old run folders wait for the next run
        log.warning("older run records in %s were not rolled into %s (%s); the next run tries again", fs.uri(root),
                    RUN_HISTORY, first_line(error, typed=True))


RUNS_KEPT = 100  # run folders kept under runs/; older runs live on as rows of runs/history.parquet
# One row per retired run: what `fluxbatch` prints at a run's end, and the whole summary for anything else.
HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("started_at", pa.string()), ("finished_at", pa.string()), ("complete", pa.bool_()),
    ("images_expected", pa.int64()), ("images_rendered", pa.int64()), ("images_failed", pa.int64()),
    ("invalid_rows", pa.int64()), ("images_missing", pa.int64()), ("summary", pa.string()),
])


def retain(fs: Storage, root: str, kept: int | None = None) -> int:
    """Roll the runs older than the last `kept` (RUNS_KEPT) into runs/history.parquet and remove their folders;
    returns how many. The history is written first, so a kill in between leaves a folder whose run is in the
    history already (the next call skips its row and removes it): nothing is lost, and no row is written twice."""
    kept = RUNS_KEPT if kept is None else kept
    base = f"{root}/{RUNS}"
    folders = sorted(entry.rstrip("/") for entry in fs.ls(base) if re.fullmatch(RUN_ID, entry.rstrip("/")
                                                                               .rsplit("/", 1)[-1]))
    old = folders[:-kept] if kept else folders
    if not old:
        return 0
    history_path = f"{base}/{RUN_HISTORY}"
    history = pq.read_table(pa.BufferReader(fs.read_bytes(history_path))) if fs.exists(history_path) else None
    known = set(history.column("run_id").to_pylist()) if history is not None else set()
    rows = [_history_row(fs, folder) for folder in old if folder.rsplit("/", 1)[-1] not in known]
    if rows:
        added = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
        table = pa.concat_tables([history, added], promote_options="permissive") if history is not None else added
        fs.write_bytes(history_path, parquet_bytes(table))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda folder: _remove_folder(fs, root, folder), old))
    log.info("%s: %d older runs rolled into %s", fs.uri(root), len(old), fs.uri(history_path))
    return len(old)


def _history_row(fs: Storage, folder: str) -> dict:
    run_id = folder.rsplit("/", 1)[-1]
    row: dict = {"run_id": run_id}
    path = f"{folder}/{SUMMARY_FILE}"
    try:
        summary = json.loads(fs.read_bytes(path)) if fs.exists(path) else {}  # a run killed before its end: none
    except ValueError:
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    for field in HISTORY_SCHEMA.names[1:-1]:
        row[field] = summary.get(field)
    if summary:
        row["summary"] = json.dumps(summary, sort_keys=True)
    return row


def _remove_folder(fs: Storage, root: str, folder: str) -> None:
    """Remove a run's folder: the files fluxbatch wrote there (its summary, its actors' cold-start records), then
    the emptied folders on local disk; anything else in it stays, and so does its folder."""
    for path in fs.find(folder):
        if describes(path[len(root) + 1:]):
            fs.rm_file(path)
    if fs.local:
        for sub in sorted((p for p in fs.fs.find(folder, withdirs=True) if fs.isdir(p)), reverse=True) + [folder]:
            with contextlib.suppress(OSError):  # not empty: a file that is not ours is in it
                fs.fs.rmdir(sub)
