"""The quality signals of a whole OUTPUT, read from its ledger: near-duplicate groups and score distributions.

Found by the driver at the end of each run (summary.json, report.html, and every group in
runs/<run id>/near_duplicates.parquet) and by `fluxbatch verify`. Nothing is deleted: a group is a list of keys
for the user to look at. Only the columns needed are read (key, phash, the scores, and for the thumbnails the
prompt and image of the lowest and highest), so a million-image OUTPUT reads a few tens of megabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.near_duplicates import duplicate_summary, near_duplicate_groups
from schemas.layout import near_duplicates_path
from schemas.quality import SCORES

EXTREMES = 6  # lowest- and highest-scoring images the report shows per score
BINS = 20  # a score's histogram in summary.json and the report


@dataclass
class QualitySignals:
    """What summary.json and the report say of an OUTPUT's images: near-duplicate groups and scores."""

    groups: list[list[str]] = field(default_factory=list)
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # score -> count, quantiles, histogram, extremes


def read_signals(fs: Storage, root: str, max_distance: int, scores: bool = True) -> QualitySignals:
    """The signals of every committed image of OUTPUT (a key's latest row); the near-duplicates alone without
    `scores` (`fluxbatch verify`)."""
    columns = ["key", "phash", *(SCORES if scores else ())]
    table = ledger.read_metadata(fs, root, columns)
    if table is None:
        return QualitySignals(near_duplicates=duplicate_summary([], max_distance))
    table = ledger.latest_row_per_key(table)
    groups = near_duplicate_groups(table.column("key").to_pylist(), table.column("phash").to_pylist(), max_distance)
    signals = QualitySignals(groups, duplicate_summary(groups, max_distance))
    for score in SCORES if scores else ():
        values = table.column(score)
        if values.null_count < len(values):
            signals.scores[score] = _distribution(table.select(["key", score]).filter(pc.is_valid(values)), score)
    # The extremes' prompts and images, for every score at once: one more read, of those few keys only.
    extremes = [row for score in signals.scores.values() for end in ("lowest", "highest") for row in score[end]]
    about = _rows_of(fs, root, {row["key"] for row in extremes}) if extremes else {}
    for row in extremes:
        row.update(about.get(row["key"], {}))
    return signals


def _distribution(scored: pa.Table, score: str) -> dict[str, Any]:
    """Count, quantiles, a histogram and the lowest and highest images (key and score) of one score."""
    values = scored.column(score).to_numpy()
    counts, edges = np.histogram(values, bins=BINS)
    order = np.argsort(values, kind="stable")
    picked = {"lowest": order[:EXTREMES].tolist(), "highest": order[::-1][:EXTREMES].tolist()}
    return {
        "images": int(values.size),
        "min": float(values.min()), "p10": float(np.quantile(values, 0.1)), "median": float(np.median(values)),
        "p90": float(np.quantile(values, 0.9)), "max": float(values.max()), "mean": float(values.mean()),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        **{end: [{"key": scored.column("key")[i].as_py(), score: float(values[i])} for i in rows]
           for end, rows in picked.items()},
    }


def _rows_of(fs: Storage, root: str, keys: set[str]) -> dict[str, dict[str, Any]]:
    """The prompt and image of a few keys (the extremes), read with the key filter pushed into each part."""
    found = ledger.read_metadata(fs, root, ["key", "prompt", "image_uri"],
                                 each=lambda part: part.filter(pc.is_in(part.column("key"), pa.array(sorted(keys)))))
    if found is None:
        return {}
    return {row["key"]: {"prompt": row["prompt"], "image_uri": row["image_uri"]}
            for row in ledger.latest_row_per_key(found).to_pylist()}


def write_groups(fs: Storage, root: str, run_id: str, groups: list[list[str]]) -> str | None:
    """Every near-duplicate group as rows (group, key) in runs/<run id>/near_duplicates.parquet; None when none."""
    if not groups:
        return None
    table = pa.table({"group": pa.array([g for g, keys in enumerate(groups) for _ in keys], pa.int64()),
                      "key": pa.array([key for keys in groups for key in keys], pa.string())})
    path = near_duplicates_path(root, run_id)
    fs.write_bytes(path, ledger.parquet_bytes(table))
    return path
