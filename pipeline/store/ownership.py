"""What in OUTPUT is fluxbatch's, so that a run touches nothing else.

fluxbatch renders into an empty folder (or prefix) or one holding its `_job.json`. A folder holding someone
else's files is refused before anything is written, unless the user passes `--allow-non-empty-output`; then
the run renders beside those files and never reads, moves or deletes them. The partial-file sweep deletes
only temp files (the exact temp name `write_bytes` uses) that fluxbatch provably wrote: anywhere in the
folders only fluxbatch writes (OWN_FOLDERS: a foreign folder holding one of them is refused even with the
flag), and at the top of OUTPUT only the temp file of a name only fluxbatch writes there (OWN_TOP_FILES, e.g.
`_job.json.fluxbatch-tmp-...`). A user's `data.csv.fluxbatch-tmp-42-deadbeef` is the user's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

from flux_worker.storage import Storage
from schemas.errors import FluxbatchError
from schemas.layout import JOB_FILE, LEASE_FILE, OWN_FOLDERS, OWN_NAMES, OWN_TOP_FILES, TMP_MARK, is_temp_name

log = logging.getLogger(__name__)
SHOWN = 3  # foreign names quoted in the refusal


def is_own_temp_at_top(name: str) -> bool:
    """Whether a file name at the top of OUTPUT is the temp file of one of fluxbatch's own files there."""
    return is_temp_name(name) and name.split(TMP_MARK, 1)[0] in OWN_TOP_FILES


class ForeignOutputError(FluxbatchError, ValueError):
    """OUTPUT holds files fluxbatch did not write; rendering there could mix or lose them."""


def refuse_foreign_output(fs: Storage, root: str, allow_non_empty: bool = False,
                          own: Collection[str] = ()) -> None:
    """Refuse an OUTPUT that is a file, or a non-empty folder without `_job.json`, before anything is written.

    `own`: names the caller itself wrote there before calling (the manifest of `fluxbatch synthesize`).
    """
    where = fs.uri(root)
    if fs.exists(f"{root}/{JOB_FILE}"):
        return  # fluxbatch's own OUTPUT; ledger.check_job decides whether this job may write it
    # Ask "is it a file" of the object itself, never "exists but not a folder": on a store, a prefix exists
    # only while something is under it, and another driver's write-test object can vanish between two requests.
    if fs.isfile(root):
        raise ForeignOutputError(f"OUTPUT {where} is a file, not a folder: choose a folder (or prefix) to render into")
    if not fs.isdir(root):
        return  # nothing there yet (a path inside a file is refused by the write check that follows)
    try:
        entries = fs.ls(root)
    except FileNotFoundError:
        return  # emptied since
    names = sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries} - {""})
    if JOB_FILE in names:
        return  # another driver wrote it since the first question: the lease that follows refuses this one
    # A lease (or a temp file) without _job.json: a fluxbatch run stopped before it wrote anything else
    # (pipeline/store/lease.py takes the lease right after this check).
    foreign = [name for name in names if name != LEASE_FILE and name not in own and not is_own_temp_at_top(name)]
    if not foreign:
        return
    shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
    if not allow_non_empty:
        raise ForeignOutputError(
            f"OUTPUT {where} is not empty and has no {JOB_FILE}, so fluxbatch did not make it (it holds {shown}): "
            "choose an empty or new OUTPUT, or pass --allow-non-empty-output to render beside these files, "
            "which fluxbatch then never touches")
    clashes = [name for name in foreign if name in OWN_NAMES]
    if clashes:
        raise ForeignOutputError(
            f"OUTPUT {where} holds {', '.join(clashes)}, which fluxbatch writes and reads as its own, but no "
            f"{JOB_FILE}: choose another OUTPUT (--allow-non-empty-output renders only beside other names)")
    log.info("rendering into %s beside %d entries fluxbatch did not write; it never touches them",
                where, len(foreign))


def remove_partial_files(fs: Storage, root: str) -> int:
    """Delete the temp files a killed writer left in this version's own folders (local disk only).

    `root` is OUTPUT or one `_versions/<n>/`: its own top-level files and OWN_FOLDERS, never `_versions/`
    (each version's run sweeps its own, under its own lease) and never a folder fluxbatch did not make.
    Object stores need nothing: a put is atomic. No metadata row ever points at one of these files.
    """
    if not fs.local or not os.path.isdir(root):
        return 0
    partial = [entry.path for entry in os.scandir(root)
               if entry.is_file(follow_symlinks=False) and is_own_temp_at_top(entry.name)]
    for name in OWN_FOLDERS:
        for folder, _, files in os.walk(os.path.join(root, name)):
            partial += [os.path.join(folder, file) for file in files if is_temp_name(file)]
    for path in partial:
        os.remove(path)
    if partial:
        log.warning("removed %d partial files left in %s by an interrupted run", len(partial), root)
    return len(partial)
