"""The report's pictures, as inline SVG: images per second over the run, each actor's busy and idle time, failures
by reason. Drawn here from a run's metadata columns (aggregated in Arrow, so a run of millions draws as fast as
one of ten); no plotting library and no script, so `report.html` stays one file that opens offline.
"""

from __future__ import annotations

from datetime import datetime
from html import escape

import pyarrow as pa
import pyarrow.compute as pc

WIDTH, BAR_HEIGHT, LEFT = 640, 18, 220
BINS = 60
TIMING_COLUMNS = ["worker", "started_at", "finished_at", "render_seconds"]


def throughput_svg(timings: pa.Table, started_at: datetime) -> str:
    """Images finished per second over the run (`timings`: this run's rows), in up to BINS bars."""
    if not timings.num_rows:
        return ""
    start = pa.scalar(started_at, pa.timestamp("us", tz="UTC"))
    finished = pc.cast(timings.column("finished_at"), pa.timestamp("us", tz="UTC"))
    offsets = pc.drop_null(pc.max_element_wise(
        pc.divide(pc.cast(pc.cast(pc.subtract(finished, start), pa.int64()), pa.float64()), 1e6), 0.0))
    if not len(offsets):
        return ""
    span = max(pc.max(offsets).as_py(), 1e-3)
    width = span / BINS
    # Binned in Arrow: a run of millions of images draws as fast as one of ten.
    bins = pc.min_element_wise(pc.cast(pc.floor(pc.divide(offsets, width)), pa.int64()), BINS - 1)
    counts = [0] * BINS
    for found in pc.value_counts(bins).to_pylist():
        counts[found["values"]] = found["counts"]
    rates = [count / width for count in counts]
    top = max(rates) or 1.0
    height, bar = 140, (WIDTH - 60) / BINS
    bars = "".join(
        f"<rect x='{50 + i * bar:.1f}' y='{10 + height * (1 - rate / top):.1f}' width='{max(bar - 1, 1):.1f}' "
        f"height='{height * rate / top:.1f}'><title>{i * width:.0f}-{(i + 1) * width:.0f} s: {rate:.2f} img/s"
        "</title></rect>" for i, rate in enumerate(rates) if rate)
    return (f"<svg class='plot' role='img' aria-label='images per second over the run' width='{WIDTH}' "
            f"height='{height + 40}' xmlns='http://www.w3.org/2000/svg'>"
            f"<text x='0' y='18'>{top:.2f}</text><text x='0' y='{height + 10}'>0</text>"
            f"<g fill='#4a7bd0'>{bars}</g>"
            f"<text x='50' y='{height + 32}'>0 s</text>"
            f"<text x='{WIDTH - 10}' y='{height + 32}' text-anchor='end'>{span:.0f} s since the run started "
            "(images/s)</text></svg>")


def actors_svg(timings: pa.Table) -> str:
    """Each actor's busy time (its images' render seconds) against its time from first image started to last
    finished: the idle part is what a faster feed or fewer replicas would reclaim."""
    if not timings.num_rows:
        return ""
    grouped = timings.group_by("worker").aggregate([("render_seconds", "sum"), ("started_at", "min"),
                                                    ("finished_at", "max"), ("worker", "count")])
    rows = []
    for row in grouped.to_pylist():
        alive = (row["finished_at_max"] - row["started_at_min"]).total_seconds()
        busy = min(row["render_seconds_sum"] or 0.0, alive) if alive > 0 else row["render_seconds_sum"] or 0.0
        rows.append((row["worker"], busy, max(alive, busy), row["worker_count"]))
    rows.sort()
    longest = max(alive for _, _, alive, _ in rows) or 1.0
    scale = (WIDTH - LEFT - 10) / longest
    body = []
    for i, (worker, busy, alive, images) in enumerate(rows):
        y = 8 + i * (BAR_HEIGHT + 6)
        share = busy / alive if alive else 1.0
        body.append(
            f"<text x='0' y='{y + 13}'>{escape(worker[-32:])}</text>"
            f"<rect x='{LEFT}' y='{y}' width='{alive * scale:.1f}' height='{BAR_HEIGHT}' fill='#ddd'>"
            f"<title>{escape(worker)}: {images} images, busy {busy:.1f} s of {alive:.1f} s ({share:.0%})</title></rect>"
            f"<rect x='{LEFT}' y='{y}' width='{busy * scale:.1f}' height='{BAR_HEIGHT}' fill='#3c9a5f'/>"
            f"<text x='{LEFT + alive * scale + 4:.1f}' y='{y + 13}'>{share:.0%}</text>")
    height = 16 + len(rows) * (BAR_HEIGHT + 6)
    return (f"<svg class='plot' role='img' aria-label='busy and idle time per actor' width='{WIDTH + 40}' "
            f"height='{height}' xmlns='http://www.w3.org/2000/svg'>{''.join(body)}</svg>")


def reasons_svg(reasons: list[tuple[str, int]]) -> str:
    """Failures by reason, most frequent first."""
    reasons = [(reason, count) for reason, count in reasons if count]
    if not reasons:
        return ""
    most = max(count for _, count in reasons)
    scale = (WIDTH - LEFT - 60) / most
    body = []
    for i, (reason, count) in enumerate(reasons[:20]):
        y = 8 + i * (BAR_HEIGHT + 6)
        body.append(f"<text x='0' y='{y + 13}'>{escape(reason[:34])}</text>"
                    f"<rect x='{LEFT}' y='{y}' width='{count * scale:.1f}' height='{BAR_HEIGHT}' fill='#c9503c'>"
                    f"<title>{escape(reason)}: {count}</title></rect>"
                    f"<text x='{LEFT + count * scale + 4:.1f}' y='{y + 13}'>{count}</text>")
    height = 16 + min(len(reasons), 20) * (BAR_HEIGHT + 6)
    return (f"<svg class='plot' role='img' aria-label='failures by reason' width='{WIDTH}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(body)}</svg>")


def histogram_svg(name: str, histogram: dict[str, list]) -> str:
    """A score's distribution over OUTPUT's images (pipeline/store/quality_signals.py: its bins' edges and counts)."""
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if not counts or not max(counts):
        return ""
    height, top = 160, max(counts)
    width = (WIDTH - 40) / len(counts)
    body = []
    for i, count in enumerate(counts):
        bar = (height - 30) * count / top
        body.append(f"<rect x='{20 + i * width:.1f}' y='{height - 20 - bar:.1f}' width='{max(width - 1, 1):.1f}' "
                    f"height='{bar:.1f}' fill='#3c6fc9'><title>{escape(name)} {edges[i]:.4g} to {edges[i + 1]:.4g}: "
                    f"{count}</title></rect>")
    body.append(f"<text x='20' y='{height - 4}'>{edges[0]:.4g}</text>"
                f"<text x='{WIDTH - 20}' y='{height - 4}' text-anchor='end'>{edges[-1]:.4g}</text>")
    return (f"<svg class='plot' role='img' aria-label='{escape(name)} distribution' width='{WIDTH}' "
            f"height='{height}' xmlns='http://www.w3.org/2000/svg'>{''.join(body)}</svg>")
