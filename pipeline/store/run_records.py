"""What a run leaves to say what it did: `_SUCCESS`, `summary.json`, `report.html`, `runs/<run_id>/summary.json`.

- `runs/<run_id>/summary.json`: every run's own summary, kept; the history of OUTPUT, one folder per run.
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

import json
import logging

from flux_worker.storage import Storage
from pipeline.store.report import write_report
from schemas import ActorStart, RunSummary
from schemas.layout import ACTORS, SUCCESS_FILE, SUMMARY_FILE, run_folder

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
