"""Render a Parquet manifest to images and metadata on a real local Ray cluster, locally and on S3."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline import render
from pipeline.store.ledger import JobMismatchError
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, make_job, metadata

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROWS = [
    {"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "num_images": 2, "shop": "north", "price": 9.5},
    {"id": "dog", "prompt": "a blue dog", "width": 96, "height": 64, "num_images": 1, "shop": "south", "price": 3.0},
    {"id": "owl", "prompt": "an owl at night", "width": 64, "height": 64, "num_images": 1, "shop": "east",
     "price": 1.25},
]
FORMAT_ROWS = [{"id": f"r-{fmt}", "prompt": "a lamp", "width": 64, "height": 64, "output_format": fmt, "shop": "west",
                "price": 0.5} for fmt in ("jpg", "webp")]
BAD_ROWS = [
    {"id": "odd", "prompt": "odd width", "width": 70, "height": 64, "num_images": 1, "shop": "x", "price": 0.0},
    {"id": "empty", "prompt": "   ", "width": 64, "height": 64, "num_images": 1, "shop": "x", "price": 0.0},
    {"id": "cat", "prompt": "same id again", "width": 64, "height": 64, "num_images": 1, "shop": "x", "price": 0.0},
]


FOX = {"id": "fox", "prompt": "a fox", "width": 64, "height": 64, "shop": "north", "price": 2.0}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model, ray_cluster):
    """Two runs into one output that most tests here read: good rows in three formats, extra columns and three
    bad rows; then the same manifest with one row added. Returns (job of the second run, output, summaries).

    Every test below only reads the output, or re-runs it where that renders nothing, so two actor pools
    serve them all.
    """
    folder = tmp_path_factory.mktemp("first-run")
    out = folder / "out"
    first = write_manifest(folder / "m1.parquet", ROWS + FORMAT_ROWS + BAD_ROWS)
    first_summary = render(make_job(str(first), str(out), str(tiny_model), batch_size=8), progress=False)
    longer = write_manifest(folder / "m2.parquet", ROWS + FORMAT_ROWS + BAD_ROWS + [FOX])
    job = make_job(str(longer), str(out), str(tiny_model), batch_size=8)
    return job, out, (first_summary, render(job, progress=False))


def test_manifest_renders_images_with_one_metadata_row_each(first_run):
    _, out, (summary, _) = first_run
    assert (summary.images_expected, summary.images_rendered, summary.images_failed) == (6, 6, 0)
    table = assert_images_match_metadata(str(out))
    assert sorted(table.column("request_id").to_pylist()) == ["cat", "cat", "dog", "fox", "owl", "r-jpg", "r-webp"]
    for row in table.to_pylist():
        with Image.open(row["image_uri"]) as image:
            assert image.size == (row["width"], row["height"])
    for name in ("_job.json", "summary.json", "_SUCCESS"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["images_total_done"] == 7


def test_rerun_after_adding_rows_renders_only_the_new_ones(first_run):
    _, out, (_, summary) = first_run
    assert (summary.images_expected, summary.images_already_done, summary.images_rendered) == (7, 6, 1)
    fox = [r for r in metadata(str(out)).to_pylist() if r["request_id"] == "fox"]
    assert len(fox) == 1 and fox[0]["image_uri"].startswith(str(out / "images"))


def test_extra_manifest_columns_are_carried_to_the_metadata_untouched(first_run):
    _, out, _ = first_run
    table = metadata(str(out))
    assert table.schema.field("price").type == "double"
    by_variant = {(r["request_id"], r["variant"]): (r["shop"], r["price"]) for r in table.to_pylist()}
    assert by_variant == {("cat", 0): ("north", 9.5), ("cat", 1): ("north", 9.5), ("dog", 0): ("south", 3.0),
                          ("owl", 0): ("east", 1.25), ("r-jpg", 0): ("west", 0.5), ("r-webp", 0): ("west", 0.5),
                          ("fox", 0): ("north", 2.0)}


def test_bad_rows_are_listed_with_reasons_and_good_rows_render(first_run):
    _, out, (_, summary) = first_run
    assert summary.invalid_rows == 3
    bad = {(r["row"], r["field"]): r["reason"] for r in failures(str(out)).to_pylist()}
    assert bad[(5, "width")] == "width must be a multiple of 16, got 70"
    assert bad[(6, "prompt")] == "prompt is empty"
    assert bad[(7, "id")].startswith("duplicate: id 'cat' as row 0 of ")
    assert len(bad) == 3


def test_formats_png_jpeg_webp_are_written_as_asked(first_run):
    _, out, _ = first_run
    formats = {}
    for row in metadata(str(out)).to_pylist():
        with Image.open(row["image_uri"]) as image:
            formats[row["output_format"]] = image.format
            assert row["image_uri"].endswith("." + {"png": "png", "jpeg": "jpg", "webp": "webp"}[row["output_format"]])
    assert formats == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def test_same_row_renders_same_bytes_twice_and_whatever_its_batch(tmp_path, tiny_model, first_run):
    # In the first run the owl shared its batch of 8 with five other images; here it renders alone.
    alone = write_manifest(tmp_path / "alone.parquet", [ROWS[2]])
    render(make_job(str(alone), str(tmp_path / "alone"), str(tiny_model), batch_size=1), progress=False)
    sha = {r["request_id"]: r["sha256"] for r in metadata(str(first_run[1])).to_pylist()}
    assert metadata(str(tmp_path / "alone")).column("sha256").to_pylist() == [sha["owl"]]


def test_second_run_over_the_same_output_renders_nothing_new(first_run):
    job, out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.*")}

    again = render(job, progress=False)

    assert (again.images_planned, again.images_rendered, again.images_already_done) == (0, 0, 7)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.*")} == before
    assert metadata(str(out)).num_rows == 7


def test_rerun_with_other_render_parameters_is_refused_with_the_difference(first_run):
    job, _, _ = first_run
    other = job.model_copy(update={"defaults": job.defaults.model_copy(update={"steps": 7})})
    with pytest.raises(JobMismatchError, match=r"defaults.steps was None, now 7"):
        render(other, progress=False)


@pytest.mark.usefixtures("stand_in_for_this_test")  # the storage path, not the model
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


@pytest.mark.usefixtures("stand_in_for_this_test")  # the storage path, not the model
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


def test_workers_get_local_model_and_adapter_paths_absolute_since_a_joined_cluster_runs_elsewhere(tmp_path,
                                                                                                 monkeypatch):
    from pipeline.render_stage import model_for_workers
    from schemas import ModelSpec

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "style.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    local = model_for_workers(ModelSpec(name="models/tiny", adapters={"style": "style.safetensors"}))
    assert (local["name"], local["adapters"]) == (str(tmp_path / "models" / "tiny"),
                                                  {"style": str(tmp_path / "style.safetensors")})
    assert model_for_workers(ModelSpec(name="flux.1-dev"))["name"] == "flux.1-dev"
    assert model_for_workers(ModelSpec(name="black-forest-labs/FLUX.1-dev"))["name"] == "black-forest-labs/FLUX.1-dev"
