"""Compaction of the ledger (pipeline/store/compaction.py): few large parts, the same rows, at every step of a kill.

One OUTPUT is rendered once per module with the stand-in renderer, one metadata part per image
(`commit_seconds=0`, batch size 1), half of it from a manifest with a carried column the other half lacks; each
test compacts its own copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_worker.storage import Storage, filesystem
from pipeline import render
from pipeline.store import compaction, ledger, run_records
from pipeline.store.lease import hold
from pipeline.store.verify import verify_output
from tests.conftest import write_manifest
from tests.helpers import make_job
from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("ray_cluster", "stand_in_renderer")

ROWS = [{"id": f"r{i}", "prompt": f"a kettle number {i}", "width": 64, "height": 64, "steps": 2} for i in range(16)]


def parts(out: Path) -> list[Path]:
    return sorted((out / "metadata").glob("*.parquet"))


def rows_by_key(out: Path) -> dict[str, dict]:
    """The ledger as every reader sees it: each key's latest row, all columns."""
    fs, root = filesystem(str(out))
    table = ledger.read_table(fs, root, "metadata")
    rows = {row["key"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows
    return rows


def keys_on_disk(out: Path) -> list[str]:
    """Every key of every Parquet file in metadata/, as a reader of the folder that knows nothing of fluxbatch."""
    return [k for p in parts(out) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_model, ray_cluster, stand_in_renderer) -> Path:
    folder = tmp_path_factory.mktemp("compaction")
    out = folder / "out"
    first = write_manifest(folder / "first.parquet", ROWS[:8])
    render(make_job(str(first), str(out), str(tiny_model), batch_size=1, commit_seconds=0), progress=False)
    carried = write_manifest(folder / "m.parquet", [{**row, "shop": f"shop-{i}"} for i, row in enumerate(ROWS)])
    render(make_job(str(carried), str(out), str(tiny_model), batch_size=1, commit_seconds=0), progress=False)
    assert len(parts(out)) >= 4
    return folder


@pytest.fixture
def output(rendered, tmp_path) -> Path:
    shutil.copytree(rendered, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out"


def supersede_first_row(out: Path) -> str:
    """A later part holding the first part's first key again with another prompt, as a run killed between its
    commit and its settling leaves it (store/changed_rows.py): readers keep the later row. Returns the key."""
    first = pq.read_table(parts(out)[0])
    later = first.slice(0, 1).set_column(first.schema.get_field_index("prompt"), "prompt",
                                         pa.array(["the prompt of a later run"]))
    pq.write_table(later, out / "metadata" / "part-29991231T000000-abcdef-00000.parquet")
    return first.column("key")[0].as_py()


def test_compaction_keeps_each_keys_latest_row_with_every_column_in_one_part(output):
    key = supersede_first_row(output)
    before = rows_by_key(output)
    assert len(keys_on_disk(output)) == len(before) + 1
    fs, root = filesystem(str(output))

    result = compaction.compact(fs, root)

    assert (result.merged, result.written) == (result.parts_before, 1)  # every part is small: all merged
    assert (result.rows_before, result.rows_after) == (len(before) + 1, len(before))
    assert [p.name for p in parts(output)] == ["part-29991231T000000-abcdef-c00000.parquet"]
    assert sorted(keys_on_disk(output)) == sorted(before)  # each key once, on disk too
    assert rows_by_key(output) == before  # every column of every row, the carried one included
    assert before[key]["prompt"] == "the prompt of a later run"
    assert sum(row["shop"] is not None for row in before.values()) == len(ROWS) - 8
    assert compaction.compact(fs, root).merged == 0  # one part: nothing left to merge


class Killed(BaseException):
    """The process died here: nothing after this write or delete happens."""


class DyingStorage(Storage):
    """Storage that dies at its `budget`-th write or delete, and stays dead (a killed process does nothing more)."""

    def __init__(self, fs, budget: int):
        super().__init__(fs.fs)
        self.budget = budget

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Killed

    def write_bytes(self, path: str, data: bytes) -> None:
        self._spend()
        super().write_bytes(path, data)

    def rm_file(self, path: str) -> None:
        self._spend()
        super().rm_file(path)


def test_a_compaction_killed_at_each_step_loses_and_duplicates_nothing(rendered, output, tmp_path, tiny_model):
    before = rows_by_key(output)
    # the journal, the new part, the journal marked complete, each merged part deleted, the journal deleted
    steps = len(parts(output)) + 4
    outcomes = set()
    for budget in range(steps):
        copy = tmp_path / f"killed-{budget}"
        shutil.copytree(output, copy)
        fs, root = filesystem(str(copy))
        with pytest.raises(Killed):
            compaction.compact(DyingStorage(fs, budget), root)
        outcomes.add((len(parts(copy)), (copy / "metadata" / "_compaction.json").exists()))

        assert rows_by_key(copy) == before, f"killed after {budget} steps"
        check = verify_output(str(copy))
        assert check.problems == 0, check.report()

        compaction.compact(fs, root)  # the next compaction finishes or undoes the killed one
        assert rows_by_key(copy) == before
        assert sorted(keys_on_disk(copy)) == sorted(before)
        assert not (copy / "metadata" / "_compaction.json").exists()
    assert len(outcomes) >= 4  # killed before, during the writes, during the deletes, at the last step

    # A run after a compaction killed halfway through its deletes renders nothing: every image is still done.
    fs, root = filesystem(str(output))
    with pytest.raises(Killed):
        compaction.compact(DyingStorage(fs, steps // 2), root)
    summary = render(make_job(str(rendered / "m.parquet"), str(output), str(tiny_model), batch_size=1),
                     progress=False)
    assert (summary.images_rendered, summary.images_already_done) == (0, len(ROWS))
    assert verify_output(str(output)).problems == 0


def test_a_run_compacts_the_ledger_once_small_parts_pile_up_and_rolls_old_runs_into_the_history(
        rendered, output, tiny_model, monkeypatch):
    monkeypatch.setattr(compaction, "AUTO_PARTS", 4)
    monkeypatch.setattr(run_records, "RUNS_KEPT", 1)
    earlier = sorted(p.name for p in (output / "runs").iterdir())
    manifest = write_manifest(output.parent / "more.parquet", ROWS + [
        {"id": f"new{i}", "prompt": f"a new kettle {i}", "width": 64, "height": 64, "steps": 2} for i in range(3)])
    summary = render(make_job(str(manifest), str(output), str(tiny_model), batch_size=1, commit_seconds=0),
                     progress=False)
    assert (summary.images_rendered, summary.complete) == (3, True)
    assert len(parts(output)) == 1 and "-c00000" in parts(output)[0].name
    assert len(rows_by_key(output)) == len(ROWS) + 3
    assert verify_output(str(output)).problems == 0
    assert sorted(p.name for p in (output / "runs").iterdir()) == [summary.run_id, "history.parquet"]
    assert pq.read_table(output / "runs" / "history.parquet").column("run_id").to_pylist() == earlier
    assert json.loads((output / "summary.json").read_text())["run_id"] == summary.run_id
    again = render(make_job(str(manifest), str(output), str(tiny_model), batch_size=1), progress=False)
    assert (again.images_rendered, again.images_already_done) == (0, len(ROWS) + 3)


def test_compact_command_says_what_it_merged_and_refuses_what_is_not_its_own(output, tmp_path, capsys):
    count = len(parts(output))
    done = call_cli(capsys, "compact", str(output))
    assert done.returncode == 0, done.stderr
    assert f"merged {count} metadata parts into 1 ({count} -> 1 parts, {len(ROWS)} rows)" in done.stdout
    assert "nothing to compact" in call_cli(capsys, "compact", str(output)).stdout

    other = tmp_path / "not-an-output"
    other.mkdir()
    refused = call_cli(capsys, "compact", str(other))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "not a fluxbatch OUTPUT" in refused.stderr

    fs, root = filesystem(str(output))
    with hold(fs, root, "20261205T000000-abcdef"):  # a driver rendering into it
        busy = call_cli(capsys, "compact", str(output))
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and "20261205T000000-abcdef" in busy.stderr


def test_each_keys_last_row_is_found_as_a_dict_would_find_it_for_digests_and_for_any_other_keys():
    """`ledger.last_row_indices` tells keys apart by their first 16 hex digits and compares whole keys only on a
    tie: keys sharing a prefix, keys that are not digests, sliced and chunked columns all keep the right rows."""
    import hashlib
    import random

    def expected(keys: list[str]) -> list[int] | None:
        last = {key: index for index, key in enumerate(keys)}
        return None if len(last) == len(keys) else sorted(last.values())

    rng = random.Random(7)
    for trial in range(200):
        keys = [hashlib.md5(str(rng.randint(0, 25)).encode()).hexdigest() for _ in range(rng.randint(0, 40))]
        if trial % 3 == 1:  # one prefix, many keys: only the whole key tells them apart
            keys = [keys[0][:16] + key[16:] for key in keys]
        if trial % 5 == 2:  # a foreign part's keys: any length
            keys = [key[: rng.randint(1, 40)] for key in keys]
        half = len(keys) // 2
        column = pa.chunked_array([pa.array(keys[:half], pa.string()), pa.array(keys[half:], pa.string())],
                                  pa.string())
        found = ledger.last_row_indices(column)
        assert (None if found is None else found.to_pylist()) == expected(keys), keys
    keys = pa.array([hashlib.md5(str(i % 9).encode()).hexdigest() for i in range(50)]).slice(7, 30)
    found = ledger.last_row_indices(keys)
    assert found.to_pylist() == expected(keys.to_pylist())


def test_compact_command_on_s3_merges_the_parts_with_batched_deletes_and_verify_stays_clean(
        output, s3_env, bucket, capsys):
    fs, _ = filesystem(f"s3://{bucket}/out")
    fs.fs.put(str(output), f"{bucket}/out", recursive=True)
    before = rows_by_key(output)
    count = len(parts(output))

    done = call_cli(capsys, "compact", f"s3://{bucket}/out")

    assert done.returncode == 0, done.stderr
    assert f"merged {count} metadata parts into 1" in done.stdout
    left = [p for p in fs.find(f"{bucket}/out/metadata")]
    assert len(left) == 1 and left[0].endswith("-c00000.parquet")
    table = ledger.read_table(fs, f"{bucket}/out", "metadata")
    assert {row["key"]: row["prompt"] for row in table.to_pylist()} == {k: r["prompt"] for k, r in before.items()}
    assert verify_output(f"s3://{bucket}/out").problems == 0


def test_a_killed_compactions_new_part_emptied_by_a_later_run_brings_no_merged_part_back(output, monkeypatch):
    """The journal marks the merge complete before any merged part is deleted: a later run retiring every row of
    one new part (and so deleting it) leaves the merged parts dead, and no key is lost."""
    monkeypatch.setattr(compaction, "PART_ROWS", 4)
    before = rows_by_key(output)
    fs, root = filesystem(str(output))
    count = len(parts(output))
    with pytest.raises(Killed):  # journal, 4 new parts, journal complete, one merged part deleted
        compaction.compact(DyingStorage(fs, 1 + 4 + 1 + 1), root)
    emptied = output / "metadata" / json.loads((output / "metadata" / "_compaction.json").read_text())["written"][-1]
    # A later run re-renders the keys of the last new part: its rows supersede those, settle empties that part.
    later = pq.read_table(emptied)
    pq.write_table(later, output / "metadata" / "part-29991231T000000-abcdef-00000.parquet")
    ledger.rewrite_part(fs, root, str(emptied), lambda table: pa.array([True] * table.num_rows))
    assert not emptied.exists()

    assert rows_by_key(output) == before
    compaction.compact(fs, root)
    assert rows_by_key(output) == before and len(parts(output)) < count
    assert verify_output(str(output)).problems == 0


def test_compaction_leaves_parquet_files_it_did_not_name_where_they_are(output):
    fs, root = filesystem(str(output))
    names = [p.name for p in parts(output)]
    foreign = output / "metadata" / "backup.parquet"  # sorts before every part
    shutil.copy(parts(output)[0], foreign)
    late = output / "metadata" / "zz-export.parquet"  # sorts after every part
    shutil.copy(parts(output)[1], late)
    compaction.compact(fs, root)
    assert foreign.exists() and late.exists()
    assert sorted(p.name for p in parts(output)) == sorted(["backup.parquet", "zz-export.parquet", *names])


def test_parts_rewritten_by_another_tool_are_verified_and_compacted(output):
    """A part rewritten by polars (keys as large_string) and a row whose size another tool nulled: verify still
    hashes that row's image and names it when it was altered; compaction merges the part."""
    first = parts(output)[0]
    table = pq.read_table(first)
    table = table.set_column(table.schema.get_field_index("key"), "key", table.column("key").cast(pa.large_string()))
    table = table.set_column(table.schema.get_field_index("bytes"), "bytes", pa.nulls(table.num_rows, pa.int64()))
    pq.write_table(table, first)
    assert verify_output(str(output)).problems == 0
    image = next((output / "images").rglob(Path(table.column("image_uri")[0].as_py()).name))
    image.write_bytes(image.read_bytes()[:-1] + b"\0")  # altered in place, its size unchanged (PNG ends 0x82)
    check = verify_output(str(output))
    assert list(check.checks[0].altered) == [table.column("key")[0].as_py()]

    fs, root = filesystem(str(output))
    count = len(parts(output))
    assert (compaction.compact(fs, root).merged, len(parts(output))) == (count, 1)
    assert len(rows_by_key(output)) == len(ROWS)


def test_verify_beside_a_compaction_that_merges_the_part_it_is_reading_starts_again_and_is_clean(output, monkeypatch):
    """`fluxbatch verify` holds no lease: a compaction may delete a part between verify's listing and its read."""
    fs, root = filesystem(str(output))
    read_part = ledger.read_part
    merged = []

    def compacting_first(*args, **kwargs):
        if not merged:
            merged.append(None)  # the compaction reads parts through here too: once
            monkeypatch.setattr(ledger, "read_part", read_part)
            merged[0] = compaction.compact(fs, root)  # the part about to be read goes away
        return read_part(*args, **kwargs)

    monkeypatch.setattr(ledger, "read_part", compacting_first)
    check = verify_output(str(output))
    assert merged[0].merged > 1
    assert check.problems == 0 and check.checks[0].parts == 1 and check.checks[0].rows == len(ROWS)
