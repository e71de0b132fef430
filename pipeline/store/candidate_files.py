"""The files of best-of-n candidates not kept (`--keep-candidates`, schemas/quality.py), checked and retired with
the image they belong to.

A candidate file is named after variant 0's image (`candidates/<kk>/<key>[.<run id>].c<n>.<ext>`), and that image's
ledger row names it, with its sha256, in `candidate_scores`. So it lives and goes with that image: the end of a run
(`committed_images.settle`) deletes the candidate files whose image no kept row names (a row re-rendered with
--rerender-changed, a killed run's never committed), and `fluxbatch verify` names a recorded file that is missing or
differs from its row (repair drops that row, so the next run renders it and its candidates again) and a file no
kept row's image owns (an orphan: repair moves it aside).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from pipeline.store import ledger
from schemas.layout import CANDIDATE_NAME, CANDIDATES


def candidate_files(fs: Storage, root: str) -> dict[str, str]:
    """Every candidate file fluxbatch wrote under `root`: its path -> its owner (`<kk>/<key>[.<run id>]`)."""
    base = f"{root}/{CANDIDATES}"
    if not fs.exists(base):
        return {}
    return {path: match.group(1) for path in fs.find(base) if (match := CANDIDATE_NAME.search(path))}


def owners(image_names: pa.ChunkedArray | pa.Array) -> set[str]:
    """The owners the kept rows' images make (`<kk>/<file name>` less its extension)."""
    return set(pc.replace_substring_regex(image_names, pattern=r"\.[a-z]+$", replacement="").to_pylist())


def keys_missing_candidates(fs: Storage, root: str, committed: pa.Table | None) -> pa.Array:
    """The keys whose row names a candidate file that is not there (one listing of candidates/, no file read): a
    run plans them again, as it does a key whose image is missing, so its exit 0 means verify finds them all.
    `committed`: each key's latest row with its candidate_scores (changed_rows.read_committed: no second read)."""
    if committed is None:
        return pa.array([], pa.string())
    rows = committed.filter(pc.greater(pc.list_value_length(committed.column("candidate_scores")).fill_null(0), 0))
    if not rows.num_rows:
        return pa.array([], pa.string())
    there = {path.rsplit("/", 1)[-1] for path in candidate_files(fs, root)}
    rows = rows.select(["key", "candidate_scores"]).to_pylist()
    return pa.array(sorted({str(row["key"]) for row in rows for candidate in row["candidate_scores"]
                            if candidate["image_uri"] and candidate["image_uri"].rsplit("/", 1)[-1] not in there}),
                    pa.string())


@dataclass
class CandidateCheck:
    """What verify found among one folder's candidate files."""

    checked: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # path -> the key whose row names it
    altered: dict[str, str] = field(default_factory=dict)  # path -> the key whose row names it
    orphans: list[str] = field(default_factory=list)
    drop: list[tuple[str, int]] = field(default_factory=list)  # (part, index) of the rows naming a bad file

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.altered) + len(self.orphans)


def check_candidates(fs: Storage, root: str) -> CandidateCheck:
    """Each candidate file a kept row names, read and hashed; and the files no kept row's image owns. One read of
    the ledger's key, image_uri and candidate_scores."""
    from pipeline.store.committed_images import image_names  # it imports this module (settle retires files)

    check = CandidateCheck()
    rows = ledger.read_metadata(fs, root, ["key", "image_uri", "candidate_scores"], locate=True)
    if rows is not None:  # as fluxbatch writes them, whatever rewrote a part (polars: large_string)
        rows = ledger.latest_row_per_key(rows.set_column(0, "key", rows.column("key").cast(pa.string())).set_column(
            1, "image_uri", rows.column("image_uri").cast(pa.string())))
    on_disk = candidate_files(fs, root)
    if on_disk:
        mine = owners(image_names(rows)) if rows is not None else set()
        check.orphans = sorted(path for path, owner in on_disk.items() if owner not in mine)
    if rows is None:
        return check
    rows = rows.filter(pc.greater(pc.list_value_length(rows.column("candidate_scores")).fill_null(0), 0))
    for row in rows.to_pylist():
        for candidate in row["candidate_scores"]:
            if not candidate["image_uri"]:
                continue
            name = candidate["image_uri"].rsplit("/", 1)[-1]
            path = f"{root}/{CANDIDATES}/{name[:2]}/{name}"
            check.checked += 1
            try:
                same = hashlib.sha256(fs.read_bytes(path)).hexdigest() == candidate["sha256"]
            except FileNotFoundError:
                check.missing[path] = row["key"]
            else:
                if not same:
                    check.altered[path] = row["key"]
            if path in check.missing or path in check.altered:
                check.drop.append((row["part"], row["index"]))
    return check
