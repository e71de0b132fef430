"""What a run leaves to say what it did: `_SUCCESS`, `summary.json`, `report.html`, `runs/<run_id>/summary.json`.

- `runs/<run_id>/summary.json`: every run's own summary, kept; the history of OUTPUT, one folder per run.
- `summary.json` and `report.html` at the root: the latest run that had images to render (`images_planned`
  above 0), i.e. the run that made (or tried to make) what OUTPUT holds. A no-op re-run, with nothing left to
  render, leaves them as they are, so its empty report never hides the images; it writes them only when
  there are none yet.
- `_SUCCESS`: removed when a run starts (once it holds the lease) and written, with its summary, when it
  ends, so it exists only while no run is under way and the last one finished.
"""

from __future__ import annotations

import fsspec

from flux_worker.storage import with_retries, write_bytes
from pipeline.report import write_report
from schemas import RunSummary

SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"
RUNS = "runs"


def clear_success(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove `_SUCCESS`: from here until this run ends, OUTPUT is not a finished output."""
    path = f"{root}/{SUCCESS_FILE}"
    if with_retries(lambda: fs.exists(path), f"stat {path}"):
        with_retries(lambda: fs.rm_file(path), f"remove {path}")


def write(fs: fsspec.AbstractFileSystem, root: str, summary: RunSummary) -> None:
    """Record a finished run: its own summary, the root summary and report if it rendered, then `_SUCCESS`."""
    body = (summary.model_dump_json(indent=2) + "\n").encode()
    write_bytes(fs, f"{root}/{RUNS}/{summary.run_id}/{SUMMARY_FILE}", body)
    latest = f"{root}/{SUMMARY_FILE}"
    if summary.images_planned or not with_retries(lambda: fs.exists(latest), f"stat {latest}"):
        write_bytes(fs, latest, body)
        write_report(fs, root, summary)
    write_bytes(fs, f"{root}/{SUCCESS_FILE}", body)
