"""`report.html`: a run's summary, a contact sheet of thumbnails with their prompts, and its failures table.

One self-contained file: thumbnails are inline base64 JPEGs and the style is inline, so the report opens
offline, from a laptop, an object-store console or an e-mail attachment. It shows at most `thumbnails`
images (this run's first ones; the output's newest when this run rendered none) and `failure_rows`
failures, and says how many it left out.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.report_plots import TIMING_COLUMNS, actors_svg, histogram_svg, reasons_svg, throughput_svg
from schemas import RunSummary
from schemas.layout import REPORT_FILE, committed_image_path, is_part_of_run

log = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 192
SHEET_COLUMNS = ["key", "request_id", "variant", "prompt", "width", "height", "seed", "image_uri", "render_seconds"]
FAILURE_COLUMNS = ["stage", "source", "row", "request_id", "field", "reason", "attempts"]


def write_report(fs: Storage, root: str, summary: RunSummary, *, thumbnails: int = 120,
                 failure_rows: int = 500) -> str | None:
    """Write OUTPUT/report.html for the run in `summary`; returns its path, or None (logged) if it could not.

    The images and the ledger are what a run is for: a report that cannot be written never fails the run.
    """
    path = f"{root}/{REPORT_FILE}"
    try:
        images, timings = sheet_rows(fs, root, summary.run_id, thumbnails)
        # The first rows only: a run may have written millions (ledger.FailureWriter), a report shows a few.
        failures, failure_total = ledger.first_failures(fs, root, failure_rows)
        document = render_report(summary, images, failures, fs, root, failure_rows=failure_rows,
                                 failure_total=failure_total, timings=timings)
        fs.write_bytes(path, document.encode())
    except Exception as error:  # noqa: BLE001
        log.warning("%s not written: %s", path, error)
        return None
    return path


def sheet_rows(fs: Storage, root: str, run_id: str, limit: int) -> tuple[list[dict[str, Any]], pa.Table]:
    """Up to `limit` metadata rows for the contact sheet, grouped by manifest row, and this run's timing columns
    for the plots (report_plots.py), read part by part so a huge output stays cheap."""
    parts = ledger.metadata_parts(fs, root)
    ours = [p for p in parts if is_part_of_run(p, run_id)]
    rows: list[dict[str, Any]] = []
    timings: list[pa.Table] = []
    for part in ours or list(reversed(parts)):
        if len(rows) >= limit and not ours:
            break
        file = pq.ParquetFile(pa.BufferReader(fs.read_bytes(part)))
        names = set(file.schema_arrow.names)
        timed = bool(ours) and set(TIMING_COLUMNS) <= names
        wanted = [c for c in SHEET_COLUMNS if c in names] if len(rows) < limit else []
        # Once the sheet is full, only the timing columns of this run's later parts are read.
        table = file.read(columns=list(dict.fromkeys(wanted + (TIMING_COLUMNS if timed else []))))
        if timed:
            timings.append(table.select(TIMING_COLUMNS))
        if wanted:
            rows += table.select(wanted).slice(0, limit - len(rows)).to_pylist()
    first = {}  # each manifest row's images side by side, rows in the order their first image finished
    for row in rows:
        first.setdefault(row.get("request_id"), len(first))
    rows.sort(key=lambda r: (first[r.get("request_id")], r.get("variant") or 0))
    empty = pa.table({c: pa.array([], pa.string()) for c in TIMING_COLUMNS})
    return rows, (pa.concat_tables(timings, promote_options="permissive") if timings else empty)


def thumbnail(fs: Storage, image_uri: str) -> str | None:
    """A data: URI of a small JPEG of the image, or None when it cannot be read (the sheet says so)."""
    try:
        data = fs.read_bytes(image_uri)
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
    except Exception as error:  # noqa: BLE001 - a missing preview must not fail the run
        log.warning("no thumbnail for %s: %s", image_uri, error)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def render_report(summary: RunSummary, images: list[dict[str, Any]], failures: pa.Table | None,
                  fs: Storage, root: str, *, failure_rows: int = 500, failure_total: int | None = None,
                  timings: pa.Table | None = None) -> str:
    """The report as one HTML string (templates/report.html): its outcome, summary tables and plots, the contact
    sheet (thumbnails grouped by manifest row, each linking to its image), failures."""
    counts = [
        ("manifest files", summary.manifest_files), ("manifest rows", summary.manifest_rows),
        ("invalid rows", summary.invalid_rows), ("images expected", summary.images_expected),
        ("already done before this run", summary.images_already_done), ("planned", summary.images_planned),
        ("rendered", summary.images_rendered), ("failed", summary.images_failed),
        ("done in total", f"{summary.images_total_done} / {summary.images_expected}"),
        ("committed images missing or altered", summary.images_missing),
        ("images per second", f"{summary.images_per_second:.3f}"),
    ] + ([("best-of-n candidates rendered", summary.candidates_rendered)] if summary.candidates_rendered else []) \
        + ([("rendered without the watermark (the picture could not hold it)", summary.images_without_watermark)]
           if summary.images_without_watermark else [])
    total = failure_total if failure_total is not None else failures.num_rows if failures is not None else 0
    shown = min(total, failure_rows)
    present = [c for c in FAILURE_COLUMNS if failures is not None and c in failures.column_names]
    rows = ([[r.get(c) for c in present] for r in failures.select(present).slice(0, shown).to_pylist()]
            if failures is not None and total else [])
    reasons = sorted(summary.failures_by_reason.items(), key=lambda kv: -kv[1])
    timings = timings if timings is not None and timings.num_rows else None
    return TEMPLATES.get_template("report.html").render(
        summary=summary, style=STYLE, counts=counts, outcome=summary.outcome(),
        plots=[(title, svg) for title, svg in (
            ("images per second", throughput_svg(timings, summary.started_at) if timings else ""),
            ("busy and idle time per actor", actors_svg(timings) if timings else ""),
            ("failures by reason", reasons_svg(reasons)),
            *((f"{name} of OUTPUT's {score['images']} scored images", histogram_svg(name, score["histogram"]))
              for name, score in summary.scores.items())) if svg],
        # Each score's lowest and highest images (summary.json holds them: quality_signals.py), as thumbnails.
        extremes=[(name, end, [{**row, "score": row[name], "src": thumbnail(fs, path), "href": _link(root, path)}
                               for row in score[end] if row.get("image_uri")
                               for path in [committed_image_path(root, row["key"], row["image_uri"])]])
                  for name, score in summary.scores.items() for end in ("lowest", "highest")],
        duplicates=summary.near_duplicates,
        stages=[(k, f"{v:.2f}") for k, v in summary.seconds.items()],
        reasons=reasons or [("none", 0)],
        actor_header=["actor", "device", "process start", "model load", "compile / warm-up", "first image",
                      "compile cache"],
        actors=cold_start_rows(summary),
        pool_header=["card type", "replicas", "GPUs per replica", "images", "images/s", "busy"],
        pools=[(p.card_type, p.replicas, f"{p.gpus_per_replica:g}", p.images,
                "" if p.images_per_second is None else f"{p.images_per_second:.2f}",
                "" if p.busy is None else f"{p.busy:.3f}") for p in summary.pools],
        # Where this OUTPUT holds each image: a copied or moved OUTPUT's rows name the old URL.
        images=[{**row, "src": thumbnail(fs, path), "href": _link(root, path)}
                for row in images for path in [committed_image_path(root, row["key"], row["image_uri"])]],
        failure_total=total, failure_shown=shown, failure_header=present, failure_rows=rows,
    ) + "\n"


def _link(root: str, path: str) -> str:
    """The image's address from report.html, which sits at OUTPUT's top: relative, so a copied OUTPUT's links work."""
    return path.removeprefix(root.rstrip("/") + "/")


def cold_start_rows(summary: RunSummary) -> list[tuple]:
    """Where each renderer actor's cold start went, in seconds (schemas.ActorStart); empty if none reported."""

    def seconds(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}"

    def cache(start: Any) -> str:
        if not start.compile:
            return "compile off"
        return "hit" if start.compile_cache_hit else "miss" + (" (ignored a stale blob)" if start.compile_cache_ignored
                                                               else "")

    return [(a.worker, a.device, seconds(a.process_start), seconds(a.model_load), seconds(a.warmup),
             seconds(a.first_image), cache(a)) for a in summary.actors]


# Autoescaped: prompts, ids and reasons are user text.
TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.store", "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.meta,.note{color:#666;font-weight:normal;font-size:13px}code{font-size:12px}
.tables{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;background:#fff}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:4px}
figure img,.missing{display:block;width:192px;height:192px;object-fit:contain;margin:auto;background:#eee}
.missing{line-height:192px;text-align:center;color:#999}
figcaption{display:flex;flex-direction:column;gap:2px;padding-top:4px}.prompt{font-size:13px}
.ok{color:#1d7a3a}.bad{color:#b3261e}.outcome{font-size:16px;margin:8px 0}
.plots{display:flex;gap:28px;flex-wrap:wrap}.plot text{font:11px system-ui,sans-serif;fill:#444}
"""
