"""bench_fleet.py runs at a tiny size (2 stand-in replicas, 0.05 s per image) on the session's Ray cluster, so the
fleet benchmark keeps working as the driver changes."""

from __future__ import annotations

import pytest

from benchmarks.bench_fleet import main

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_fleet_bench_commits_every_image_once_and_reports_its_columns(capsys):
    (row,) = main(["--replicas", "2", "--seconds", "0.05", "--work", "0.4"])

    assert row["committed"] == f"{row['images']}/{row['images']}"  # every image in the ledger once, with its file
    assert row["actors"] >= 1 and 0 < row["GPU-busy"] <= 1
    assert row["img/s committed"] > 0 and row["driver cores"] > 0 and row["driver peak RSS MiB"] > 0
    assert "| GPU-busy |" in capsys.readouterr().out.splitlines()[0]
