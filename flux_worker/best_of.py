"""Scores and best-of-n on the renderer: each image scored right after it is rendered, before it is encoded, and a
best-of-n row's candidates ranked so its `num_images` best are kept (schemas/quality.py).

A best-of-n row plans one image per image kept (variants 0..k-1, the keys of any row's images); its planned `seed`
is its first candidate's. In a batch, the images of one row are replaced by the row's `candidates` n candidates,
rendered once (candidate c with seed + c, like a row's variants), each scored; they are ranked by the job's
`keep_by` score, highest first, ties to the lower candidate, and variant j keeps the candidate ranked j. So the
same row, seeds and models keep the same images whatever the batch, the batch size or the run, and an image
re-planned alone (its file went missing) is the same candidate again. Every kept image's row records each
candidate's seed and scores (`candidate_scores`); the candidates not kept are written (under OUTPUT/candidates/,
beside variant 0) only when the job asks (`quality.keep_candidates`). A row whose candidate failed keeps nothing
this run: its images are failure rows, and the next run renders them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flux_worker.image_writer import Rendered, describe, failure_row
from schemas.quality import QualitySpec

if TYPE_CHECKING:  # the scorers import torch; what keeps (and the stand-in renderer of the tests) need not
    from flux_worker.scorers import Scorers

SEED_SPAN = 2**64  # seeds are 64 bits, stored signed (schemas/records.py SEED_TYPE)


def candidate_seed(seed: int, candidate: int) -> int:
    """Candidate `candidate`'s seed: the row's + the index, modulo 2**64, as a signed int64 (as the planner adds)."""
    value = (int(seed) + candidate) % SEED_SPAN
    return value - SEED_SPAN if value >= 2**63 else value


def _request(row: dict[str, Any]) -> tuple:
    """What the images of one best-of-n row share: its request and its first candidate's seed."""
    return row["request_id"], row["seed"], tuple(r["sha256"] for r in row.get("reference_images") or ())


def expand(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows to render for a batch: an image per image as it is; the images of each best-of-n row replaced by
    its candidates, once. Every rank of a tensor-parallel group expands the same batch the same way."""
    out: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for row in rows:
        if not row.get("candidates"):
            out.append(row)
            continue
        request = _request(row)
        if request in seen:
            continue
        seen.add(request)
        out.extend({**row, "key": f"{row['key']}#c{c}", "seed": candidate_seed(row["seed"], c), "candidate": c}
                   for c in range(row["candidates"]))
    return out


class Keeper:
    """Scores each rendered image and keeps each best-of-n row's best candidates; on the device that holds the
    images (a single-GPU renderer, rank 0 of a tensor-parallel group)."""

    def __init__(self, quality: QualitySpec, scorers: Scorers | None):
        self.scorers = scorers
        self.keep_by = quality.keep_by
        self.keep_candidates = quality.keep_candidates

    def outcomes(self, rendered: Iterable[Rendered | dict[str, Any]], rows: list[dict[str, Any]]
                 ) -> Iterator[Rendered | dict[str, Any]]:
        """`rendered` (the outcomes of `expand(rows)`) as the outcomes of `rows`: plain images scored as each comes,
        a best-of-n row's images once all its candidates have."""
        pending: dict[tuple, dict[int, Rendered | dict[str, Any]]] = {}
        for outcome in rendered:
            row = outcome.row if isinstance(outcome, Rendered) else outcome
            if "candidate" not in row:
                yield self._scored(outcome) if isinstance(outcome, Rendered) else outcome
                continue
            request = _request({**row, "seed": candidate_seed(row["seed"], -row["candidate"])})
            got = pending.setdefault(request, {})
            got[row["candidate"]] = outcome
            if len(got) == row["candidates"]:
                yield from self._keep(request, got, rows)
                del pending[request]

    def _scored(self, item: Rendered) -> Rendered | dict[str, Any]:
        """`item` with its scores, or its failure row when a scorer failed on it (out of memory, a bad image): the
        image is not written, its row renders again on the next run, and the rest of the batch goes on."""
        if self.scorers is not None:
            try:
                item.scores = self.scorers.score(item.image, item.row["prompt"])
            except Exception as error:  # noqa: BLE001 - reported per image, never raised into the batch
                return failure_row(item.row, f"score: {describe(error)}", item.attempts)
        return item

    def _keep(self, request: tuple, candidates: dict[int, Rendered | dict[str, Any]],
              rows: list[dict[str, Any]]) -> Iterator[Rendered | dict[str, Any]]:
        """The row's planned images in this batch, each the candidate its variant ranks; failures if any failed."""
        mine = sorted((row for row in rows if row.get("candidates") and _request(row) == request),
                      key=lambda row: row["variant"])
        candidates = {c: self._scored(o) if isinstance(o, Rendered) else o for c, o in candidates.items()}
        failed = [(c, o) for c, o in sorted(candidates.items()) if not isinstance(o, Rendered)]
        if failed:
            c, outcome = failed[0]
            for row in mine:
                yield failure_row(row, f"candidate {c} of {len(candidates)}: {outcome['error']}", outcome["attempts"])
            return
        ranked = sorted(candidates, key=lambda c: (-candidates[c].scores[self.keep_by], c))
        keeps = mine[0]["keeps"]  # the row's num_images: ranks 0..keeps-1 are kept
        recorded = [{"candidate": c, "seed": candidates[c].row["seed"], **candidates[c].scores,
                     "kept_as": ranked.index(c) if ranked.index(c) < keeps else None} for c in sorted(candidates)]
        for row in mine:
            chosen = candidates[ranked[row["variant"]]]
            extras = []
            if self.keep_candidates and row["variant"] == 0:
                extras = [(c, candidates[c].image) for c in sorted(ranked[keeps:])]
            # The row's render time (all its candidates) shared among the images it keeps: they sum to it.
            yield Rendered({**row, "seed": chosen.row["seed"]}, chosen.image,
                           sum(item.seconds for item in candidates.values()) / keeps, chosen.started_at,
                           max(item.attempts for item in candidates.values()), scores=dict(chosen.scores),
                           candidate=chosen.row["candidate"], candidate_scores=recorded, extras=extras)
