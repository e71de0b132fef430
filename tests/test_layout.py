"""One module owns the OUTPUT layout (schemas/layout.py): whatever fluxbatch does to an OUTPUT, every file it
leaves there is a path the layout describes. Driver behaviour: the stand-in renderer, no torch."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import render
from pipeline.store.verify import verify_output
from schemas import JobSpec
from schemas.layout import describes
from tests.helpers import metadata

pytestmark = pytest.mark.usefixtures("stand_in_renderer")

ROWS = [{"id": f"r{i}", "prompt": f"a kite number {i}", "width": 64, "height": 64} for i in range(4)]


def job(manifest: Path, out: Path, model: Path, layout: str = "files", **fields) -> JobSpec:
    return JobSpec.model_validate({"manifest": str(manifest), "model": {"name": str(model)}, "batch_size": 2,
                                   "output": {"uri": str(out), "layout": layout, "shard_size": 2}, **fields})


def test_every_file_an_output_holds_after_every_kind_of_run_is_one_the_layout_describes(tmp_path, tiny_model,
                                                                                          ray_cluster):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"id": "bad", "prompt": "", "width": 64, "height": 64}]), manifest)
    out = tmp_path / "out"
    for layout in ("files", "webdataset", "hf-parquet"):
        render(job(manifest, out, tiny_model, layout), progress=False)
    render(job(manifest, out, tiny_model, defaults={"steps": 3}), new_version=True, progress=False)  # _versions/2
    rows = metadata(str(out)).to_pylist()
    Path(rows[0]["image_uri"]).unlink()  # rendered again under a revision name
    Path(rows[1]["image_uri"]).write_bytes(b"edited")  # moved aside into _quarantine/<run id>/
    render(job(manifest, out, tiny_model), progress=False)
    key = rows[2]["key"]
    (out / "images" / key[:2] / f"{key}.20260101T000000-abcdef.png").write_bytes(b"orphan")
    verify_output(str(out), repair=True)  # moved aside into _quarantine/<repair id>/

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [name for name in files if not describes(name)] == []
    # Every kind of thing was made, so the check above covered it.
    for made in ("_job.json", "_SUCCESS", "summary.json", "report.html", "webdataset/.stats.json", "hf/00000.parquet",
                 "_versions/2/_job.json"):
        assert made in files, made
    for prefix in ("images/", "metadata/part-", "failures/part-", "runs/", "_quarantine/", "webdataset/.stats/"):
        assert any(name.startswith(prefix) for name in files), prefix
    for part in ("/actors/", ".png"):
        assert any(part in name for name in files), part
    assert sum(name.startswith("_quarantine/") for name in files) >= 2  # a run's and a repair's
    assert any(re.fullmatch(r"images/../[0-9a-f]{32}\.[0-9]{8}T[0-9]{6}-[0-9a-f]{6}\.png", name) for name in files)


def test_the_layout_does_not_describe_files_it_never_writes():
    for name in ("notes.txt", "images/ab/notes.txt", "images/ab/cd0123456789abcdef0123456789abcd.png",
                 "metadata/part-x.parquet", "data.csv.fluxbatch-tmp-42-deadbeef", "_versions/x/_job.json",
                 "runs/20260101T000000-abcdef/other.json"):
        assert not describes(name), name
