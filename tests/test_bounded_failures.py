"""Failures stream to their parts as they occur, so memory stays bounded however many rows are bad; a run
with an invalid row, a failed image or no valid row exits 1; a run that stops early keeps the previous
run's failure parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as manifest_module
from pipeline import render
from pipeline.manifest import read_manifest
from schemas import ModelLimits
from tests.helpers import failures, make_job, session_cluster_env
from tests.own_ray import REPO
from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter

MILLION = 1_000_000
# The bound docs/guarantees.md states for `fluxbatch validate`, whatever share of the rows is bad: the
# interpreter and its libraries (~130 MB) plus at most 6x the manifest as Arrow tables (its columns and the
# column checks' masks). Measured: 295 MB for these 1M rows (31 MB as Arrow); keeping every failure took 1.9 GB.
LIBRARIES_MB = 200  # measured 130 MB; room for other library versions
ARROW_FACTOR = 6


def wide_rows(path: Path, count: int) -> Path:
    """`count` rows, each refused for one reason: width 1000 is not a multiple of 16."""
    pq.write_table(pa.table({"id": pa.array([f"r{i}" for i in range(count)]),
                             "prompt": pa.repeat(pa.scalar("a red cat"), count),
                             "width": pa.repeat(pa.scalar(1000, pa.int64()), count)}), path)
    return path


# Runs a command and prints its peak RSS (kB) last on stderr. A small process of its own: a child forked from
# the test process would count the test's memory (torch and all) as its own until it execs.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_validate(manifest: Path) -> tuple[int, int, str, float]:
    """`fluxbatch validate MANIFEST` as its own process: exit code, stdout lines, stderr, peak RSS in MB."""
    process = subprocess.Popen([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "jobs.cli", "validate",
                                str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    lines, first = 0, ""
    for line in process.stdout:  # counted as they come: the test must not hold a million lines either
        first = first or line
        lines += 1
    stderr = process.stderr.read()
    process.wait()
    assert first.startswith(f"{manifest} row 0 (id 'r0'): field 'width': width must be a multiple of 16"), first
    *messages, peak_kb = stderr.strip().splitlines()
    return process.returncode, lines, "\n".join(messages), int(peak_kb) / 1024


@pytest.mark.slow
def test_validate_of_a_million_invalid_rows_prints_each_within_the_stated_memory_bound(tmp_path):
    manifest = wide_rows(tmp_path / "wide.parquet", MILLION)

    code, lines, stderr, peak_mb = run_validate(manifest)

    assert code == 1
    assert lines == MILLION
    assert f"1 file(s), {MILLION} rows: 0 valid (0 images), {MILLION} bad" in stderr
    bound_mb = LIBRARIES_MB + ARROW_FACTOR * pq.read_table(manifest).nbytes / 2**20
    assert peak_mb < bound_mb, f"validate peaked at {peak_mb:.0f} MB, over its bound of {bound_mb:.0f} MB"


def test_rows_checked_in_small_chunks_fail_as_the_rows_checked_in_one(tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "prompt": "a cat", "width": 64, "steps": 4} for i in range(12)]
    rows[1]["width"] = 65  # one fault
    rows[2].update(width=70, steps=0)  # two faults of one row: one invalid row
    rows[4]["id"] = "r0"  # a repeated id, found among the rows the columns passed
    rows[7].update(id="r2")  # an invalid row's id is not taken: this one is valid
    rows[8].update(id="r3", steps=0)  # invalid: its id, repeating r3's, is not checked
    rows[10].update(width=80.5)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    limits = ModelLimits(min_side=64, max_side=1024)

    def read(chunk_rows: int) -> tuple[list[tuple], int, dict[str, int]]:
        monkeypatch.setattr(manifest_module, "CHUNK_ROWS", chunk_rows)
        got: list = []
        manifest = read_manifest(str(path), limits=limits, sink=got.append)
        return [(f.row, f.field, f.reason) for f in got], manifest.failures.rows, dict(manifest.failures.by_reason)

    in_chunks = read(2)
    in_one = read(10_000)

    assert in_chunks == in_one
    listed, invalid_rows, by_reason = in_chunks
    # The rows' own failures in row order, then the repeated ids in row order (pipeline/manifest.py refuse_repeats).
    assert [row for row, _, _ in listed] == [1, 2, 2, 8, 10, 4]
    assert invalid_rows == 5
    assert by_reason == {"validate:width": 3, "validate:steps": 2, "validate:id": 1}


def test_render_of_a_manifest_with_no_valid_row_exits_1_and_writes_the_failure_parts(tmp_path, tiny_model, capsys):
    manifest = wide_rows(tmp_path / "wide.parquet", 3000)
    out = tmp_path / "out"

    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress")

    assert result.returncode == 1, result.stderr[-2000:]
    assert "0 rendered, 0 already done, 0 failed, 3000 bad rows; 0/0 images" in result.stdout
    table = failures(str(out))
    assert table.num_rows == 3000 and set(table.column("field").to_pylist()) == {"width"}
    assert sorted(p.name.split("-")[-2] for p in (out / "failures").iterdir()) == ["validate"]


def test_render_of_an_empty_manifest_exits_1(tmp_path, tiny_model, capsys):
    manifest = wide_rows(tmp_path / "empty.parquet", 0)

    result = call_cli(capsys, "render", str(manifest), str(tmp_path / "out"), "--model", str(tiny_model),
                      "--no-progress")

    assert result.returncode == 1, result.stderr[-2000:]
    assert "exit 1: no valid row in the manifest, so nothing was rendered" in result.stdout


@pytest.mark.slow
def test_driver_killed_mid_run_keeps_the_previous_runs_failure_parts(tmp_path, tiny_model, ray_cluster):
    manifest = wide_rows(tmp_path / "m.parquet", 10)
    out = tmp_path / "out"
    render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)
    before = {p.name for p in (out / "failures").iterdir()}
    assert before and failures(str(out)).num_rows == 10

    # The same bad rows and 30 good ones; the driver is SIGKILLed once its own failure parts are written.
    rows = pq.read_table(manifest).to_pylist() + [{"id": f"ok{i}", "prompt": "a lamp", "width": 64}
                                                  for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    command = [sys.executable, "-m", "tests.stand_in_cli", "render", str(manifest), str(out), "--model",
               str(tiny_model), "--no-progress", "--replicas", "1", "--batch-size", "1", "--cpus-per-replica", "1"]
    driver = subprocess.Popen(command, cwd=REPO, env=session_cluster_env(ray_cluster), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while driver.poll() is None and not {p.name for p in (out / "failures").iterdir()} - before:
            time.sleep(0.02)
        assert driver.poll() is None, f"the run ended before it could be killed:\n{driver.stderr.read()[-3000:]}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    after = {p.name for p in (out / "failures").iterdir()}
    assert before < after, "the previous run's failure parts were removed by a run that did not finish"


def test_finished_run_replaces_the_previous_runs_failure_parts_with_its_own(tmp_path, tiny_model):
    out = tmp_path / "out"
    render(make_job(str(wide_rows(tmp_path / "a.parquet", 10)), str(out), str(tiny_model)), progress=False)
    first = {p.name for p in (out / "failures").iterdir()}

    summary = render(make_job(str(wide_rows(tmp_path / "a.parquet", 4)), str(out), str(tiny_model)),
                     progress=False)

    names = {p.name for p in (out / "failures").iterdir()}
    assert names and not names & first
    assert all(summary.run_id in name for name in names)
    assert failures(str(out)).num_rows == 4
