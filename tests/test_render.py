"""Render a Parquet manifest to images and metadata on a real local Ray cluster, locally and on S3."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline import render
from pipeline.ledger import JobMismatchError
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, make_job, metadata

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROWS = [
    {"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "num_images": 2, "shop": "north", "price": 9.5},
    {"id": "dog", "prompt": "a blue dog", "width": 96, "height": 64, "num_images": 1, "shop": "south", "price": 3.0},
    {"id": "owl", "prompt": "an owl at night", "width": 64, "height": 64, "num_images": 1, "shop": "east",
     "price": 1.25},
]


def test_manifest_renders_images_with_one_metadata_row_each(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    summary = render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)

    assert (summary.images_expected, summary.images_rendered, summary.images_failed) == (4, 4, 0)
    table = assert_images_match_metadata(str(out))
    assert sorted(table.column("request_id").to_pylist()) == ["cat", "cat", "dog", "owl"]
    for row in table.to_pylist():
        with Image.open(row["image_uri"]) as image:
            assert image.size == (row["width"], row["height"])
    for name in ("_job.json", "summary.json", "_SUCCESS"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["images_rendered"] == 4


def test_extra_manifest_columns_are_carried_to_the_metadata_untouched(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)

    table = metadata(str(out))
    assert table.schema.field("price").type == "double"
    by_variant = {(r["request_id"], r["variant"]): (r["shop"], r["price"]) for r in table.to_pylist()}
    assert by_variant == {("cat", 0): ("north", 9.5), ("cat", 1): ("north", 9.5), ("dog", 0): ("south", 3.0),
                          ("owl", 0): ("east", 1.25)}


def test_same_row_renders_same_bytes_twice_and_whatever_its_batch(tmp_path, tiny_model):
    alone = write_manifest(tmp_path / "alone.parquet", [ROWS[2]])
    crowd = write_manifest(tmp_path / "crowd.parquet", [
        {"id": f"other-{i}", "prompt": f"filler prompt {i}", "width": 64, "height": 64} for i in range(5)
    ] + [ROWS[2]])
    shas = []
    for name, manifest, batch in [("a", alone, 1), ("b", alone, 1), ("c", crowd, 6)]:
        out = tmp_path / name
        render(make_job(str(manifest), str(out), str(tiny_model), batch_size=batch), progress=False)
        rows = {r["request_id"]: r for r in metadata(str(out)).to_pylist()}
        shas.append(rows["owl"]["sha256"])
    assert shas[0] == shas[1] == shas[2]


def test_second_run_over_the_same_output_renders_nothing_new(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model))
    render(job, progress=False)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    again = render(job, progress=False)

    assert (again.images_planned, again.images_rendered, again.images_already_done) == (0, 0, 4)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert metadata(str(out)).num_rows == 4


def test_rerun_after_adding_rows_renders_only_the_new_ones(tmp_path, tiny_model):
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "m1.parquet", ROWS[:2])
    render(make_job(str(first), str(out), str(tiny_model)), progress=False)
    second = write_manifest(tmp_path / "m2.parquet", ROWS)

    summary = render(make_job(str(second), str(out), str(tiny_model)), progress=False)

    assert (summary.images_already_done, summary.images_rendered) == (3, 1)
    assert sorted(assert_images_match_metadata(str(out)).column("request_id").to_pylist()) == [
        "cat", "cat", "dog", "owl"]


def test_bad_rows_are_listed_with_reasons_and_good_rows_render(tmp_path, tiny_model):
    rows = ROWS + [
        {"id": "odd", "prompt": "odd width", "width": 70, "height": 64, "num_images": 1, "shop": "x", "price": 0.0},
        {"id": "empty", "prompt": "   ", "width": 64, "height": 64, "num_images": 1, "shop": "x", "price": 0.0},
        {"id": "cat", "prompt": "same id again", "width": 64, "height": 64, "num_images": 1, "shop": "x",
         "price": 0.0},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    summary = render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)

    assert summary.images_rendered == 4
    assert summary.invalid_rows == 3
    bad = {(r["row"], r["field"]): r["reason"] for r in failures(str(out)).to_pylist()}
    assert bad[(3, "width")] == "width must be a multiple of 16, got 70"
    assert bad[(4, "prompt")] == "prompt is empty"
    assert bad[(5, "id")].startswith("duplicate: id 'cat' as row 0 of ")
    assert_images_match_metadata(str(out))


def test_formats_png_jpeg_webp_are_written_as_asked(tmp_path, tiny_model):
    rows = [{"id": f"r-{fmt}", "prompt": "a lamp", "width": 64, "height": 64, "output_format": fmt}
            for fmt in ("png", "jpg", "webp")]
    out = tmp_path / "out"
    render(make_job(str(write_manifest(tmp_path / "m.parquet", rows)), str(out), str(tiny_model)), progress=False)
    table = assert_images_match_metadata(str(out))
    for row in table.to_pylist():
        with Image.open(row["image_uri"]) as image:
            assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[row["output_format"]]


def test_rerun_with_other_render_parameters_is_refused_with_the_difference(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    out = tmp_path / "out"
    render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)
    other = make_job(str(manifest), str(out), str(tiny_model), defaults={"steps": 7})
    with pytest.raises(JobMismatchError, match=r"defaults.steps was None, now 7"):
        render(other, progress=False)


def test_manifest_on_s3_renders_to_s3(tmp_path, tiny_model, s3_env, bucket):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    local = write_manifest(tmp_path / "m.parquet", ROWS)
    fs.put(str(local), f"{bucket}/in/manifest.parquet")
    out = f"s3://{bucket}/runs/one"
    summary = render(make_job(f"s3://{bucket}/in/manifest.parquet", out, str(tiny_model)), progress=False)

    assert summary.images_rendered == 4
    table = assert_images_match_metadata(out)
    assert all(uri.startswith(f"s3://{bucket}/runs/one/images/") for uri in table.column("image_uri").to_pylist())
    png = fs.cat_file(table.column("image_uri")[0].as_py())
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    job_file = fs.cat_file(f"{bucket}/runs/one/_job.json").decode()
    assert "testing-secret-never-logged" not in job_file
    assert render(make_job(f"s3://{bucket}/in/manifest.parquet", out, str(tiny_model)),
                  progress=False).images_rendered == 0


def test_storage_options_reach_the_workers_without_environment_variables(tmp_path, tiny_model, s3_server, bucket,
                                                                          monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    options = {"key": "testing-key-id", "secret": "testing-secret-never-logged",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    out = f"s3://{bucket}/opts"
    job = make_job(str(manifest), out, str(tiny_model))
    job.output.storage_options = options
    summary = render(job, progress=False)
    assert summary.images_rendered == 2
    assert_images_match_metadata(out, options)
