"""A compaction's journal, `metadata/_compaction.json`: which parts it merges, which it writes, and whether it
has written them all.

A compaction (store/compaction.py) writes its journal first, then its new parts, then the journal again marked
`complete`, then deletes the parts it merged, then the journal. Killed at any step, it leaves the journal, and the
journal says which parts are live:
- not complete: the new parts already written are dead (the merged parts still hold every row);
- complete: the merged parts still there are dead (the new parts hold every row).
The mark is written, not inferred from which new parts exist: a later run may retire every row of a new part and
delete it (ledger.rewrite_part), which must not bring the merged parts back to life. Every reader of the ledger
lists parts through `ledger.metadata_parts`, which applies this rule, so a reader sees the ledger the compaction
started from or the one it made, never both (no key twice, none lost). The next run, compaction or `verify
--repair` (under the lease) finishes or undoes the interrupted one and removes the journal.

Readers outside fluxbatch that read metadata/ as a Parquet folder see both sets of parts during that window:
the rows are the same (a merged row is copied, never changed), so such a reader sees some rows twice until the
next run or `fluxbatch compact OUTPUT` removes the dead parts. Parquet dataset readers skip `_`-names, so
they never read the journal itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flux_worker.storage import Storage
from schemas.errors import FluxbatchError
from schemas.layout import COMPACTION_JOURNAL, METADATA


@dataclass(frozen=True)
class Journal:
    """The parts one compaction merges (`merged`) and the parts it writes in their place (`written`), by file
    name: an OUTPUT copied or moved elsewhere keeps a journal that still reads right."""

    merged: tuple[str, ...]
    written: tuple[str, ...]
    complete: bool = False  # every part in `written` was written whole


class CorruptJournalError(FluxbatchError):
    """`metadata/_compaction.json` is not the journal fluxbatch writes: which parts are live is unknown."""


def path(root: str) -> str:
    return f"{root}/{METADATA}/{COMPACTION_JOURNAL}"


def read(fs: Storage, root: str) -> Journal | None:
    """The journal of a compaction that has not finished in `root`, or None."""
    where = path(root)
    try:
        data = fs.read_bytes(where)
    except FileNotFoundError:
        return None
    try:
        document = json.loads(data)
        return Journal(merged=tuple(document["merged"]), written=tuple(document["written"]),
                       complete=document["complete"] is True)
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptJournalError(
            f"{fs.uri(where)} is not a compaction journal fluxbatch wrote ({type(error).__name__}), so which "
            "metadata parts are live is unknown: restore it from a backup, or move it away and run `fluxbatch "
            "verify OUTPUT --repair`, which drops rows held twice") from error


def write(fs: Storage, root: str, journal: Journal) -> None:
    body = {"merged": list(journal.merged), "written": list(journal.written), "complete": journal.complete}
    fs.write_bytes(path(root), (json.dumps(body, indent=1) + "\n").encode())


def name(part: str) -> str:
    return part.rsplit("/", 1)[-1]


def dead(found: list[str], journal: Journal | None) -> list[str]:
    """The parts of `found` an unfinished compaction left dead: those it merged if it is complete, else those it
    wrote."""
    if journal is None:
        return []
    names = set(journal.merged) if journal.complete else set(journal.written)
    return [part for part in found if name(part) in names]


def live(found: list[str], journal: Journal | None) -> list[str]:
    """The parts of `found` (in name order) that hold the ledger, given an unfinished compaction's `journal`."""
    gone = set(dead(found, journal))
    return [part for part in found if part not in gone]
