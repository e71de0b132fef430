"""The OUTPUT layout: every folder, file and temp-name pattern fluxbatch writes under an OUTPUT, and nothing else.

    OUTPUT/_job.json                          the job that made OUTPUT (pipeline/store/ledger.py)
    OUTPUT/_lease.json                        the one driver writing it (pipeline/store/lease.py)
    OUTPUT/images/<kk>/<key>[.<run id>].<ext> the images (flux_worker/image_writer.py); <run id>: a re-render
    OUTPUT/metadata/part-<run id>-<n>.parquet the ledger, one row per image
    OUTPUT/metadata/part-<run id>-c<n>.parquet a compacted part: the merge of parts up to run <run id>'s
    OUTPUT/metadata/_compaction.json          an unfinished compaction's journal (pipeline/store/compaction.py)
    OUTPUT/failures/part-<run id>-<stage>-<n>.parquet
    OUTPUT/summary.json, report.html, _SUCCESS   the latest run (pipeline/store/run_records.py)
    OUTPUT/runs/<run id>/summary.json, runs/<run id>/actors/<host>-<pid>.json
    OUTPUT/runs/history.parquet               one row per run whose folder retention removed (run_records.py)
    OUTPUT/webdataset/<n>.tar, OUTPUT/hf/<n>.parquet, each with .stats/<n>.json and .stats.json (pipeline/store/pack.py)
    OUTPUT/_quarantine/<run or repair id>/... what a run or `verify --repair` moved aside
    OUTPUT/_versions/<n>/...                  another version: the same layout again
    OUTPUT/manifest.parquet, synthesis.json   written by `synthesize` and `catalog run` (jobs/)
    OUTPUT/catalog/...                        `catalog run`'s stable paths (jobs/catalog.py)

Every module that writes, reads, sweeps or checks these takes the names from here; `describes` says whether a
path under OUTPUT is one of them (tests/test_layout.py lists whole OUTPUTs against it). It lives in schemas/
because both sides use it: the driver and the renderer actors (which write images and cold-start records).
"""

from __future__ import annotations

import re

JOB_FILE = "_job.json"
LEASE_FILE = "_lease.json"
VERSIONS = "_versions"
SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
PROBE_NAME = "_write-test"  # pre-flight's test write, a temp name (pipeline/preflight.py)
IMAGES = "images"
METADATA = "metadata"
CANDIDATES = "candidates"  # best-of-n candidates not kept, where the job keeps them (schemas/quality.py)
NEAR_DUPLICATES = "near_duplicates.parquet"  # runs/<run id>/: every near-duplicate group the run found
COMPACTION_JOURNAL = "_compaction.json"
RUN_HISTORY = "history.parquet"
FAILURES = "failures"
RUNS = "runs"
ACTORS = "actors"  # runs/<run id>/actors/: each renderer actor's cold-start record
QUARANTINE = "_quarantine"
STATS = ".stats"  # a packed layout's per-shard stats: a dot-folder, which dataset readers skip
# layout name -> (folder under OUTPUT, shard suffix)
LAYOUTS = {"webdataset": ("webdataset", ".tar"), "hf-parquet": ("hf", ".parquet")}
# What `synthesize` and `catalog run` write beside the ledger.
JOB_MANIFEST = "manifest.parquet"
SYNTHESIS_SPEC = "synthesis.json"
CATALOG = "catalog"

# Folders under a version root that hold only what fluxbatch writes.
OWN_FOLDERS = (IMAGES, METADATA, FAILURES, RUNS, CANDIDATES, *(folder for folder, _ in LAYOUTS.values()))
# Files a run writes at the top of OUTPUT through a temp file (the lease is written in place).
OWN_TOP_FILES = frozenset({JOB_FILE, SUCCESS_FILE, SUMMARY_FILE, REPORT_FILE, PROBE_NAME})
# Every name fluxbatch writes at the top of OUTPUT. A foreign folder holding one of these is refused even with
# --allow-non-empty-output: the run would read it as its own, replace it, or delete from it.
OWN_NAMES = frozenset({*OWN_TOP_FILES, LEASE_FILE, VERSIONS, QUARANTINE, *OWN_FOLDERS} - {PROBE_NAME})

# A local file being written is `<final name>.fluxbatch-tmp-<pid>-<8 hex>` until it is renamed whole.
TMP_MARK = ".fluxbatch-tmp-"
TMP_NAME = re.compile(r".+\.fluxbatch-tmp-[0-9]+-[0-9a-f]{8}")
RUN_ID = r"[0-9]{8}T[0-9]{6}-[0-9a-f]{6}"  # a UTC time and 6 hex digits (pipeline/run.py)
REPAIR_ID = r"[0-9]{8}T[0-9]{6}-repair-[0-9a-f]{6}"  # `fluxbatch verify --repair` (pipeline/store/verify.py)
# A best-of-n candidate not kept: its owner is the image of the same <kk>/<key>[.<run id>] (candidate_path).
CANDIDATE_NAME = re.compile(
    rf"/{CANDIDATES}/([0-9a-f]{{2}}/[0-9a-f]{{32}}(?:\.{RUN_ID})?)\.c[0-9]{{1,2}}\.(?:png|jpg|webp)$")
# Every image name `image_path` makes; only these count as images under images/.
IMAGE_NAME = re.compile(rf"/{IMAGES}/([0-9a-f]{{2}})/(\1[0-9a-f]{{30}})(?:\.{RUN_ID})?\.(png|jpg|webp)$")


def is_temp_name(name: str) -> bool:
    """Whether a file name (no folder) is one of `Storage.write_bytes`'s temp files."""
    return TMP_NAME.fullmatch(name) is not None


def image_path(root: str, key: str, extension: str, revision: str | None = None) -> str:
    """OUTPUT/images/<kk>/<key>.<ext>, or <key>.<revision>.<ext> for a key whose committed image this render
    replaces (`revision` is the run id: see PLAN_SCHEMA). Keys are hex digests, so no row can name a path."""
    name = key if revision is None else f"{key}.{revision}"
    return f"{root}/{IMAGES}/{key[:2]}/{name}.{extension}"


def candidate_path(root: str, key: str, candidate: int, extension: str, revision: str | None = None) -> str:
    """OUTPUT/candidates/<kk>/<key>[.<revision>].c<candidate>.<ext>: a best-of-n candidate not kept, written only
    when the job asks (quality.keep_candidates); `key` is the row's first kept image's."""
    name = key if revision is None else f"{key}.{revision}"
    return f"{root}/{CANDIDATES}/{key[:2]}/{name}.c{candidate}.{extension}"


def committed_image_path(root: str, key: str, image_uri: str) -> str:
    """Where the image a ledger row names lies under `root`: its file name under images/<kk>/, so a copied or
    moved OUTPUT (whose rows still name the old URLs) is checked where its images are now."""
    return f"{root}/{IMAGES}/{key[:2]}/{str(image_uri or '').rsplit('/', 1)[-1]}"


def metadata_part(root: str, run_id: str, seq: int) -> str:
    """A metadata part: names start with the run id, a UTC time, so name order is commit order."""
    return f"{root}/{METADATA}/part-{run_id}-{seq:05d}.parquet"


def compacted_part(root: str, run_id: str, seq: int) -> str:
    """A part a compaction writes: named after the newest part it merged (run `run_id`), so it sorts after every
    part it replaces and before every later run's; `c` sorts after digits, so after that run's own parts."""
    return f"{root}/{METADATA}/part-{run_id}-c{seq:05d}.parquet"


COMPACTED_SEQ = re.compile(rf"/part-({RUN_ID})-c([0-9]{{5}})\.parquet$")
PART_RUN_ID = re.compile(rf"/part-({RUN_ID})-")
PART_NAME = re.compile(rf"/part-{RUN_ID}-c?[0-9]{{5}}\.parquet$")  # a metadata part as fluxbatch names it


def failure_part(root: str, run_id: str, stage: str, seq: int) -> str:
    return f"{root}/{FAILURES}/part-{run_id}-{stage}-{seq:05d}.parquet"


def is_part_of_run(path: str, run_id: str) -> bool:
    """Whether a metadata or failure part was written by run `run_id`."""
    return path.rsplit("/", 1)[-1].startswith(f"part-{run_id}-")


def run_folder(root: str, run_id: str) -> str:
    return f"{root}/{RUNS}/{run_id}"


def near_duplicates_path(root: str, run_id: str) -> str:
    """Every near-duplicate group the run found in OUTPUT (pipeline/store/quality_signals.py)."""
    return f"{run_folder(root, run_id)}/{NEAR_DUPLICATES}"


def quarantine_folder(root: str, run_id: str) -> str:
    return f"{root}/{QUARANTINE}/{run_id}"


_SHARD = r"[0-9]{5}"
_PATTERNS = [
    re.escape(name) for name in (JOB_FILE, LEASE_FILE, SUCCESS_FILE, SUMMARY_FILE, REPORT_FILE, JOB_MANIFEST,
                                 SYNTHESIS_SPEC)
] + [
    rf"{IMAGES}/([0-9a-f]{{2}})/\1[0-9a-f]{{30}}(?:\.{RUN_ID})?\.(?:png|jpg|webp)",
    rf"{METADATA}/part-{RUN_ID}-c?[0-9]{{5}}\.parquet",
    rf"{METADATA}/{re.escape(COMPACTION_JOURNAL)}",
    rf"{RUNS}/{re.escape(RUN_HISTORY)}",
    rf"{FAILURES}/part-{RUN_ID}-[a-z]+-[0-9]{{5}}\.parquet",
    rf"{RUNS}/{RUN_ID}/{SUMMARY_FILE}",
    rf"{RUNS}/{RUN_ID}/{NEAR_DUPLICATES}",
    rf"{CANDIDATES}/[0-9a-f]{{2}}/[0-9a-f]{{32}}(?:\.{RUN_ID})?\.c[0-9]{{1,2}}\.(?:png|jpg|webp)",
    rf"{RUNS}/{RUN_ID}/{ACTORS}/[^/]+-[0-9]+\.json",
    *(rf"{folder}/{_SHARD}{re.escape(suffix)}" for folder, suffix in LAYOUTS.values()),
    *(rf"{folder}/{re.escape(STATS)}/{_SHARD}\.json" for folder, _ in LAYOUTS.values()),
    *(rf"{folder}/{re.escape(STATS)}\.json" for folder, _ in LAYOUTS.values()),
    rf"{QUARANTINE}/(?:{RUN_ID}|{REPAIR_ID})/.+",
    rf"{CATALOG}/.+",
]
_DESCRIBED = re.compile(rf"(?:{VERSIONS}/[0-9]+/)?(?:{'|'.join(_PATTERNS)})")


def describes(relative: str) -> bool:
    """Whether `relative` (a file's path under OUTPUT, '/'-separated) is a file this layout names."""
    return _DESCRIBED.fullmatch(relative) is not None
