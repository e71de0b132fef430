"""Retention of run records (pipeline/store/run_records.py `retain`): the last runs keep their folders, older
ones become rows of runs/history.parquet; nothing fluxbatch did not write is removed, a kill loses no run."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux_worker.storage import filesystem
from pipeline.store import run_records
from schemas import RunSummary
from tests.test_compaction import DyingStorage, Killed


def write_runs(out: Path, count: int) -> list[str]:
    """`count` finished runs' folders, a day apart, each with its summary and one actor's cold-start record."""
    fs, root = filesystem(str(out))
    run_ids = []
    for day in range(count):
        started = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
        run_id = started.strftime("%Y%m%dT%H%M%S") + f"-{day:06x}"
        summary = RunSummary(output=str(out), run_id=run_id, model_id="tiny", started_at=started,
                             images_expected=10, images_rendered=day, images_total_done=10)
        fs.write_bytes(f"{root}/runs/{run_id}/summary.json", summary.model_dump_json().encode())
        fs.write_bytes(f"{root}/runs/{run_id}/actors/node-1-{100 + day}.json", b"{}")
        run_ids.append(run_id)
    return run_ids


def history(out: Path) -> list[dict]:
    return pq.read_table(out / "runs" / "history.parquet").to_pylist()


def test_runs_older_than_the_last_kept_become_history_rows_and_their_folders_go(tmp_path):
    out = tmp_path / "out"
    run_ids = write_runs(out, 5)
    mine = out / "runs" / run_ids[0] / "notes.txt"  # an operator's file in a run folder
    mine.write_text("why this run was started")
    fs, root = filesystem(str(out))

    assert run_records.retain(fs, root, kept=2) == 3

    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted([run_ids[0], *run_ids[3:], "history.parquet"])
    assert [p.relative_to(out / "runs" / run_ids[0]).as_posix() for p in (out / "runs" / run_ids[0]).rglob("*")] \
        == ["notes.txt"]  # only the operator's file is left of that folder
    rows = history(out)
    assert [row["run_id"] for row in rows] == run_ids[:3]
    assert [row["images_rendered"] for row in rows] == [0, 1, 2]
    assert all(row["complete"] for row in rows)
    assert RunSummary.model_validate_json(rows[1]["summary"]).run_id == run_ids[1]

    assert run_records.retain(fs, root, kept=2) == 1  # the operator's file keeps that folder: listed again
    assert [row["run_id"] for row in history(out)] == run_ids[:3]  # but its run is not added twice


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_retention_killed_at_any_step_loses_no_run_and_writes_none_twice(tmp_path, budget):
    out = tmp_path / "out"
    run_ids = write_runs(out, 4)
    fs, root = filesystem(str(out))
    with pytest.raises(Killed):
        run_records.retain(DyingStorage(fs, budget), root, kept=1)
    kept = {p.name for p in (out / "runs").iterdir() if p.name != "history.parquet"}
    recorded = {row["run_id"] for row in history(out)} if (out / "runs" / "history.parquet").exists() else set()
    assert kept | recorded == set(run_ids)

    run_records.retain(fs, root, kept=1)
    assert [row["run_id"] for row in history(out)] == run_ids[:3]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted([run_ids[3], "history.parquet"])
