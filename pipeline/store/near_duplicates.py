"""Near-duplicate images across a whole OUTPUT: groups of images whose perceptual hashes are a few bits apart.

Two images are near-duplicates when their hashes (flux_worker/perceptual_hash.py) differ in at most
`max_distance` bits; a group is everything joined by such pairs (A~B and B~C group A, B and C, however far A is
from C). Groups are reported, never acted on: nothing is deleted.

A million images make 5e11 pairs, so pairs are never all compared. Identical hashes are collapsed first (a
run of one repeated picture is one value), then the pigeonhole rule narrows the rest: split the 64 bits into
max_distance + 1 chunks and two hashes within max_distance bits agree exactly on at least one chunk, so only
hashes that share a chunk's value (a run) are compared, chunk by chunk. Within a run, pairs already in one group
are not compared: a cluster of similar pictures (a template filled with one seed) shares chunks, and comparing
all its pairs would cost its size squared in every chunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.quality import DEFAULT_DUPLICATE_DISTANCE, MAX_DUPLICATE_DISTANCE

PAIRS_PER_STEP = 1 << 18  # comparisons per numpy step: arrays of 2 MiB stay in cache (4x faster than 32 MiB)
NEIGHBOURS = 8  # each hash is first compared with this many after it in value order in its run
PIVOTS = 8  # and with this many first hashes of its run: one of them is likely near a cluster's middle
JOIN_EDGES = 1 << 22  # found pairs buffered before they are joined (a join passes over every distinct hash)
HASH = re.compile(r"[0-9a-fA-F]{16}")


def near_duplicate_groups(
    keys: Sequence[str], hashes: Sequence[str | None], max_distance: int = DEFAULT_DUPLICATE_DISTANCE
) -> list[list[str]]:
    """Every group of two or more images (`keys[i]` hashed `hashes[i]`) joined by hashes within `max_distance`
    bits; each group's keys sorted, the largest group first (then by first key). Null or empty hashes are skipped."""
    if type(max_distance) is not int or not 0 <= max_distance <= MAX_DUPLICATE_DISTANCE:  # bool is not a distance
        raise ValueError(f"max_distance is bits of 64, from 0 to {MAX_DUPLICATE_DISTANCE}: got {max_distance!r}")
    if len(keys) != len(hashes):
        raise ValueError(f"{len(keys)} keys but {len(hashes)} hashes: give one hash (or None) per key")
    present = [i for i, value in enumerate(hashes) if value]
    values = _as_uint64([hashes[i] for i in present], [keys[i] for i in present])
    distinct, which = np.unique(values, return_inverse=True)
    roots = _components(distinct, max_distance)[which]  # per hashed image: its group's smallest distinct hash
    return _groups([keys[i] for i in present], roots)


def duplicate_summary(groups: list[list[str]], max_distance: int, examples: int = 10) -> dict[str, Any]:
    """What summary.json says of `groups`: how many, how many images they hold, and the `examples` largest with
    their first `examples` keys (a group can hold every image of a run)."""
    return {
        "max_distance": max_distance,
        "groups": len(groups),
        "images": sum(len(group) for group in groups),
        "largest": [{"images": len(group), "keys": group[:examples]} for group in groups[:examples]],
    }


def _as_uint64(hashes: list[str], keys: list[str]) -> np.ndarray:
    """The hex hashes as 64-bit integers, all in one parse; a malformed one is named with its key."""
    joined = "".join(hashes)
    if len(joined) == 16 * len(hashes):
        try:
            values = np.frombuffer(bytes.fromhex(joined), dtype=">u8")
        except ValueError:
            values = None
        if values is not None and values.size == len(hashes):
            return values.astype(np.uint64)
    key, value = next((k, h) for k, h in zip(keys, hashes) if not HASH.fullmatch(h))
    raise ValueError(
        f"image {key!r} has perceptual hash {value!r}: a hash is 16 hex digits (flux_worker/perceptual_hash.py)"
    )


def _components(values: np.ndarray, max_distance: int) -> np.ndarray:
    """Per distinct hash (`values`, sorted), the smallest index of its group."""
    components = _Components(values.size)
    if max_distance == 0 or values.size < 2:
        return components.roots
    bits_left = 64
    for width in _chunk_widths(max_distance):
        bits_left -= width
        chunk = (values >> np.uint64(bits_left)) & np.uint64((1 << width) - 1)
        order = np.argsort(chunk, kind="stable")  # runs of one chunk value, each in value order
        ordered = chunk[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        lengths = np.diff(np.r_[starts, values.size])
        _join_run_pairs(components, values, order, np.repeat(np.arange(starts.size), lengths), max_distance)
    return components.roots


def _chunk_widths(max_distance: int) -> list[int]:
    """64 bits in max_distance + 1 chunks as even as they go, most significant first."""
    count = max_distance + 1
    return [64 // count + (i < 64 % count) for i in range(count)]


def _join_run_pairs(
    components: _Components, values: np.ndarray, order: np.ndarray, run_of: np.ndarray, max_distance: int
) -> None:
    """Joins every close pair of hashes within a run (`values[order]`, in runs `run_of`) but those already in one
    group. Each hash is first compared with its NEIGHBOURS in value order and with its run's first PIVOTS, which
    joins most of a cluster of similar pictures; a close pair still apart then has an end outside its run's largest
    group, so the largest group goes to the end of its run and each other hash is compared with everything after
    it."""
    position = np.arange(values.size)
    run_start = np.r_[0, np.flatnonzero(np.diff(run_of)) + 1]
    run_end = np.r_[run_start[1:], values.size][run_of]
    run_start = run_start[run_of]
    ordered = values[order]

    def compare(first: np.ndarray, second: np.ndarray) -> None:
        close = np.bitwise_count(ordered[first] ^ ordered[second]) <= max_distance
        components.add(order[first[close]], order[second[close]])

    for offset in range(1, NEIGHBOURS + 1):
        near = np.flatnonzero(run_end - position > offset)
        compare(near, near + offset)
    for pivot in range(PIVOTS):
        later = np.flatnonzero(position - run_start > pivot)
        compare(run_start[later] + pivot, later)
    components.join()
    in_largest = _in_largest_group(run_of, components.roots[order])
    if in_largest.any():
        regrouped = np.argsort(run_of * 2 + in_largest, kind="stable")
        order, ordered, in_largest = order[regrouped], ordered[regrouped], in_largest[regrouped]
    rows = np.flatnonzero(~in_largest & (run_end - position > 1))
    after = run_end[rows] - rows - 1  # how many hashes each row is compared with
    if rows.size:
        steps = np.searchsorted(np.cumsum(after), np.arange(PAIRS_PER_STEP, after.sum(), PAIRS_PER_STEP))
        for batch in np.split(np.arange(rows.size), np.unique(steps)):
            counts, first = after[batch], rows[batch]
            later = np.arange(counts.sum()) + np.repeat(first + 1 - (np.cumsum(counts) - counts), counts)
            close = np.flatnonzero(np.bitwise_count(np.repeat(ordered[first], counts) ^ ordered[later]) <= max_distance)
            if close.size:
                row = first[np.searchsorted(np.cumsum(counts), close, side="right")]
                components.add(order[row], order[later[close]])
    components.join()  # before the next chunk, so pairs this one joined are skipped there


def _in_largest_group(run_of: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Per position, whether its hash is in the group most of its run shares (the smallest root on a tie), where
    two or more of the run do; all False where no run has one."""
    grouped = np.flatnonzero(np.bincount(roots)[roots] > 1)  # groups of one cannot be a run's largest of two or more
    pairs, counts = np.unique(run_of[grouped] * np.int64(roots.size) + roots[grouped], return_counts=True)
    run, root = np.divmod(pairs[counts > 1], roots.size)
    first = np.lexsort((root, -counts[counts > 1], run))
    first = first[np.r_[True, run[first][1:] != run[first][:-1]]] if first.size else first
    largest = np.full(int(run_of[-1]) + 1, -1)
    largest[run[first]] = root[first]
    return roots == largest[run_of]


class _Components:
    """Union-find over the distinct hashes, as each one's root (the smallest index of its group after `join`).
    Pairs are buffered and joined in bulk, since a join passes over every hash."""

    def __init__(self, size: int) -> None:
        self.roots = np.arange(size)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._count = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Buffers the pairs a-b, but those already in one group, and those that join the same two groups as the
        pair before them (a hash outside a cluster is close to many of it in a row)."""
        root_a, root_b = self.roots[a], self.roots[b]
        keep = np.flatnonzero(
            (root_a != root_b) & np.r_[True, (root_a[1:] != root_a[:-1]) | (root_b[1:] != root_b[:-1])]
        )
        if keep.size:
            self._pending.append((a[keep], b[keep]))
            self._count += keep.size
            if self._count >= JOIN_EDGES:
                self.join()

    def join(self) -> None:
        if self._pending:
            a, b = (np.concatenate(side) for side in zip(*self._pending))
            self.roots = _joined(self.roots, a, b)
            self._pending, self._count = [], 0


def _joined(roots: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`roots` (each element's root: roots[roots] == roots) with the pairs a-b joined: each round hooks every root
    under the smallest root it is paired with (pointing down only, so no cycles), then points everyone at their
    root again; pairs a round could not join (a root hooked elsewhere) go to the next."""
    roots = roots.copy()
    while a.size:
        root_a, root_b = roots[a], roots[b]
        apart = root_a != root_b
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        if not a.size:
            break
        np.minimum.at(roots, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                break
            roots = jumped
    return roots


def _groups(keys: list[str], roots: np.ndarray) -> list[list[str]]:
    """The keys of each root's images where it has two or more, sorted; the largest group first, then by first key."""
    if not roots.size:
        return []
    members = np.flatnonzero(np.bincount(roots)[roots] >= 2)
    members = members[np.argsort(roots[members], kind="stable")]
    cuts = np.flatnonzero(np.diff(roots[members])) + 1
    groups = [sorted(keys[i] for i in part.tolist()) for part in np.split(members, cuts)] if members.size else []
    return sorted(groups, key=lambda group: (-len(group), group[0]))
