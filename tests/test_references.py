"""Rows rendered from reference images (FLUX.1 Kontext): checked on the driver inside the job's roots, part of the
image's key (a replaced photo renders anew), recorded with their sha256; hostile references are failure rows."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from flux_worker.presets import resolve_preset
from flux_worker.references import MAX_REFERENCE_BYTES
from flux_worker.storage import Storage, filesystem
from pipeline import render
from pipeline.manifest import read_manifest
from pipeline.plan import plan_images
from pipeline.references import check_manifest
from schemas import RenderOptions
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, make_job, metadata

pytestmark = pytest.mark.usefixtures("ray_cluster")


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def kontext_model(tmp_path_factory) -> Path:
    from flux_worker.model_build import build_model

    return build_model(tmp_path_factory.mktemp("models") / "kontext", "tiny", family="flux.1-kontext")


def test_kontext_is_a_preset_and_a_built_folder_is_recognised_by_its_pipeline_class(kontext_model):
    preset = resolve_preset("flux.1-kontext-dev")
    assert (preset.source, preset.steps, preset.guidance) == ("black-forest-labs/FLUX.1-Kontext-dev", 28, 2.5)
    assert (preset.min_references, preset.max_references) == (1, 1)
    (kontext_model / "fluxbatch_preset.json").rename(kontext_model.parent / "preset.json")
    try:  # without the built model's own preset file: its model_index.json names FluxKontextPipeline
        found = resolve_preset(str(kontext_model))
    finally:
        (kontext_model.parent / "preset.json").rename(kontext_model / "fluxbatch_preset.json")
    assert (found.family, found.steps, found.min_references) == ("flux.1-kontext", 28, 1)


def test_references_on_a_text_only_model_and_none_on_kontext_are_failure_rows_naming_the_field(tmp_path, tiny_model,
                                                                                                kontext_model):
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "with", "prompt": "the cup on a beach", "reference_images": ["cup.png"]},
        {"id": "without", "prompt": "a cup", "reference_images": []},
    ])
    for model, refused in ((tiny_model, "with"), (kontext_model, "without")):
        found = []
        result = read_manifest(str(manifest), limits=resolve_preset(str(model)).limits, sink=found.append)
        assert [(f.request_id, f.field) for f in found] == [(refused, "reference_images")]
        assert result.requests.column("id").to_pylist() == [{"with": "without", "without": "with"}[refused]]
    assert "renders from text alone" in read_manifest_reason(manifest, tiny_model)
    assert "needs 1 image URL" in read_manifest_reason(manifest, kontext_model)


def read_manifest_reason(manifest: Path, model: Path) -> str:
    found = []
    read_manifest(str(manifest), limits=resolve_preset(str(model)).limits, sink=found.append)
    return found[0].reason


@pytest.fixture
def hostile(tmp_path):
    """A manifest folder (the default root) with one good photo and one row per hostile reference."""
    root = tmp_path / "shop"
    outside = tmp_path / "elsewhere"
    (root / "photos" / "folder.png").mkdir(parents=True)
    outside.mkdir()
    (root / "photos" / "good.png").write_bytes(png((10, 200, 10)))
    (root / "photos" / "empty.png").write_bytes(b"")
    (root / "photos" / "truncated.png").write_bytes(png((1, 2, 3), (64, 64))[:60])
    (root / "photos" / "text.png").write_text("not an image at all\n")
    (root / "photos" / "bomb.png").write_bytes(png_header(50_000, 50_000))
    with open(root / "photos" / "huge.png", "wb") as handle:  # sparse: listed as too big, never read
        handle.truncate(MAX_REFERENCE_BYTES + 1)
    (outside / "secret.png").write_bytes(png((9, 9, 9)))
    os.symlink(outside / "secret.png", root / "photos" / "link.png")
    cases = {
        "good": "photos/good.png",
        "missing": "photos/nothing-here.png",
        "folder": "photos/folder.png",
        "empty": "photos/empty.png",
        "truncated": "photos/truncated.png",
        "text": "photos/text.png",
        "bomb": "photos/bomb.png",
        "huge": "photos/huge.png",
        "dotdot": "photos/../../elsewhere/secret.png",
        "symlink": "photos/link.png",
        "passwd": "/etc/passwd",
        "absolute-outside": str(outside / "secret.png"),
        "bucket": "s3://no-such-bucket-fluxbatch/photo.png",
    }
    rows = [{"id": name, "prompt": f"the product, {name}", "reference_images": [url]} for name, url in cases.items()]
    return write_manifest(root / "manifest.parquet", rows), root, outside


REASONS = {
    "missing": "no such file",
    "folder": "a folder, not an image file",
    "empty": "empty file (0 bytes)",
    "truncated": "does not decode",
    "text": "not a PNG, JPEG, WEBP image",
    "bomb": "refused without decoding",
    "huge": f"at most {MAX_REFERENCE_BYTES} are allowed",
    "dotdot": "'..' is not allowed",
    "symlink": "points outside the reference roots",
    "passwd": "outside the reference roots",
    "absolute-outside": "outside the reference roots",
    "bucket": "outside the reference roots",
}


def test_hostile_references_are_failure_rows_with_their_reason_and_nothing_outside_the_root_is_touched(
        hostile, kontext_model, monkeypatch):
    manifest_path, root, outside = hostile
    touched: list[str] = []
    original = Storage.retry

    def recording(self, action, what):  # every listing and read of a Storage goes through retry
        touched.append(what)
        return original(self, action, what)

    monkeypatch.setattr(Storage, "retry", recording)
    job = make_job(str(manifest_path), str(root.parent / "out"), str(kontext_model))
    found = []
    manifest = read_manifest(str(manifest_path), limits=resolve_preset(str(kontext_model)).limits)
    touched.clear()  # the manifest's own reading
    check_manifest(manifest, job, sink=found.append)

    reasons = {f.request_id: f for f in found}
    assert set(reasons) == set(REASONS)
    for name, expected in REASONS.items():
        failure = reasons[name]
        assert expected in failure.reason, (name, failure.reason)
        assert failure.field == "reference_images" and failure.row is not None
        assert failure.source.endswith("manifest.parquet") and "reference_images[0]" in failure.reason
    assert manifest.requests.column("id").to_pylist() == ["good"]
    good = manifest.requests.column("reference_images").to_pylist()[0][0]
    assert good["url"] == str((root / "photos" / "good.png").resolve())
    assert len(good["sha256"]) == 64
    assert manifest.failures.rows == len(REASONS)
    # One listing of the photos folder, one read of each file the listing allowed; nothing outside the root.
    assert sum(what.startswith("list ") for what in touched) == 1
    read = sorted(Path(what.split(" ", 1)[1]).name for what in touched if what.startswith("read "))
    assert read == ["bomb.png", "good.png", "text.png", "truncated.png"]
    assert not [what for what in touched if str(outside) in what or "passwd" in what or "no-such-bucket" in what]


def test_validate_prints_each_bad_reference_with_its_row_and_a_root_given_on_the_command_line_is_used(
        hostile, kontext_model, capsys):
    """`fluxbatch validate` says what `render` would refuse, references included, and writes nothing."""
    from jobs.cli import main

    manifest_path, root, outside = hostile
    assert main(["validate", str(manifest_path), "--model", str(kontext_model)]) == 1
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert len(lines) == len(REASONS)
    for name, expected in REASONS.items():
        line, = [line for line in lines if f"(id {name!r})" in line]
        assert line.startswith(f"{manifest_path} row ") and "field 'reference_images':" in line, line
        assert expected in line, line
    assert f"{len(REASONS) + 1} rows: 1 valid (1 images), {len(REASONS)} bad" in printed.err

    # The photo outside the default root is fine once its folder is a root.
    rows = [{"id": "outside", "prompt": "the product", "reference_images": [str(outside / "secret.png")]}]
    write_manifest(root / "one.parquet", rows)
    assert main(["validate", str(root / "one.parquet"), "--model", str(kontext_model)]) == 1
    assert "outside the reference roots" in capsys.readouterr().out
    assert main(["validate", str(root / "one.parquet"), "--model", str(kontext_model),
                 "--reference-root", str(outside)]) == 0
    assert capsys.readouterr().out == ""


def test_a_row_renders_the_same_bytes_alone_and_in_a_batch_of_eight(tmp_path, kontext_model):
    from flux_worker.loading import load_pipeline
    from flux_worker.renderer import Renderer
    from schemas import ModelSpec

    (tmp_path / "photo.png").write_bytes(png((200, 120, 40)))
    rows = [{"id": f"r{i}", "prompt": f"the photo, variant {i}", "width": 64, "height": 64,
             "reference_images": ["photo.png"]} for i in range(8)]
    manifest_path = write_manifest(tmp_path / "m.parquet", rows)
    job = make_job(str(manifest_path), str(tmp_path / "out"), str(kontext_model), batch_invariant=True)
    preset = resolve_preset(str(kontext_model))
    manifest = read_manifest(str(manifest_path), limits=preset.limits)
    check_manifest(manifest, job)
    planned = plan_images(manifest, job, preset, None).table
    pipeline = load_pipeline(ModelSpec(name=str(kontext_model)))
    renderer = Renderer({"name": str(kontext_model)}, RenderOptions(output_uri=str(tmp_path / "out")),
                        pipeline=pipeline)
    batch = renderer(planned)
    first = planned.filter(pa.compute.equal(planned.column("request_id"), "r3"))
    alone = Renderer({"name": str(kontext_model)}, RenderOptions(output_uri=str(tmp_path / "alone")),
                     pipeline=pipeline)(first)
    by_key = dict(zip(batch.column("key").to_pylist(), batch.column("sha256").to_pylist()))
    assert batch.column("error").null_count == 8
    assert alone.column("sha256").to_pylist() == [by_key[first.column("key")[0].as_py()]]


def test_kontext_rows_with_local_and_s3_references_render_resume_and_rerender_exactly_a_replaced_photo(
        tmp_path, kontext_model, s3_env, bucket):
    shop = tmp_path / "shop"
    (shop / "photos").mkdir(parents=True)
    (shop / "photos" / "mug.png").write_bytes(png((200, 30, 30)))
    (shop / "photos" / "lamp.png").write_bytes(png((30, 30, 200), (40, 56)))
    store, _ = filesystem(f"s3://{bucket}")
    store.write_bytes(f"{bucket}/photos/vase.png", png((30, 200, 30)))
    rows = [
        {"id": "mug-beach", "prompt": "the mug on a beach", "reference_images": ["photos/mug.png"]},
        {"id": "mug-snow", "prompt": "the mug in snow", "reference_images": [str(shop / "photos" / "mug.png")]},
        {"id": "lamp", "prompt": "the lamp at night", "reference_images": ["photos/lamp.png"]},
        {"id": "vase", "prompt": "the vase in a garden", "reference_images": [f"s3://{bucket}/photos/vase.png"]},
    ]
    manifest_path = write_manifest(shop / "manifest.parquet", [{**r, "width": 64, "height": 64} for r in rows])
    out = tmp_path / "out"
    job = make_job(str(manifest_path), str(out), str(kontext_model), batch_size=4,
                   reference_roots=[str(shop), f"s3://{bucket}/photos"])

    first = render(job, progress=False)
    assert (first.images_rendered, first.images_failed, first.invalid_rows) == (4, 0, 0)
    table = assert_images_match_metadata(str(out))
    refs = {row["request_id"]: row["reference_images"] for row in table.to_pylist()}
    assert refs["vase"][0]["url"] == f"s3://{bucket}/photos/vase.png"
    assert refs["mug-beach"] == refs["mug-snow"]  # one photo, named relative and absolute
    old_mug = refs["mug-beach"][0]["sha256"]

    assert render(job, progress=False).images_rendered == 0

    (shop / "photos" / "mug.png").write_bytes(png((250, 250, 0)))  # the product photo is replaced
    third = render(job, progress=False)
    assert (third.images_rendered, third.images_already_done) == (2, 2)
    new_mug = hashlib.sha256((shop / "photos" / "mug.png").read_bytes()).hexdigest()
    rows = metadata(str(out)).to_pylist()
    assert sorted(r["request_id"] for r in rows if r["reference_images"][0]["sha256"] == new_mug) == [
        "mug-beach", "mug-snow"]
    assert new_mug != old_mug and len(rows) == 6  # the images of the old photo stay, under their own keys
    assert failures(str(out)) is None or failures(str(out)).num_rows == 0


@pytest.mark.usefixtures("stand_in_for_this_test")  # which keys render again, not what the model makes of a photo
def test_catalog_rerenders_exactly_the_product_whose_photo_and_the_one_whose_prompt_changed(tmp_path, kontext_model):
    from jobs.catalog import run_catalog
    from jobs.catalog_publish import read_index
    from tests.test_catalog import make_spec, write_products

    shop = tmp_path / "shop"
    (shop / "photos").mkdir(parents=True)
    products = []
    for index, sku in enumerate(("MUG-1", "LAMP-1", "VASE-1")):
        (shop / "photos" / f"{sku}.png").write_bytes(png((60 * index, 100, 200 - 60 * index)))
        products.append({"sku": sku, "title": f"product {sku}", "category": "home", "attributes": {"c": "x"},
                         "reference_images": [f"photos/{sku}.png"]})
    out = tmp_path / "out"
    spec = make_spec(write_products(shop / "products.parquet", products), str(out), str(kontext_model),
                     aspects=["1:1"], size=64)
    report, summary = run_catalog(spec, progress=False)
    assert (summary.images_rendered, report.skus_new) == (3, ["LAMP-1", "MUG-1", "VASE-1"])
    fs, root = filesystem(str(out))
    before = read_index(fs, root)
    vase = fs.read_bytes(f"{root}/{before['VASE-1/1x1/0']['path']}")

    (shop / "photos" / "MUG-1.png").write_bytes(png((255, 255, 0)))  # a new product photo
    products[1]["title"] = "brass product LAMP-1"  # a new prompt
    spec = make_spec(write_products(shop / "products.parquet", products), str(out), str(kontext_model),
                     aspects=["1:1"], size=64)
    report, summary = run_catalog(spec, progress=False)
    after = read_index(fs, root)
    assert (summary.images_rendered, report.skus_changed) == (2, ["LAMP-1", "MUG-1"])
    assert {path_id: entry["path"] for path_id, entry in after.items()} == \
        {path_id: entry["path"] for path_id, entry in before.items()}  # stable paths stay stable
    assert after["VASE-1/1x1/0"] == before["VASE-1/1x1/0"]
    assert fs.read_bytes(f"{root}/{after['VASE-1/1x1/0']['path']}") == vase
    assert after["MUG-1/1x1/0"]["sha256"] != before["MUG-1/1x1/0"]["sha256"]


@pytest.mark.parametrize("family", ["flux.2-klein", "flux.2"])
def test_flux2_rows_pass_their_references_to_the_pipeline(tmp_path, family):
    """A FLUX.2 row with references renders other pixels than the same prompt without them, and two rows that name
    the same photo once relative and once absolute render the same bytes."""
    from flux_worker.model_build import build_model

    model = build_model(tmp_path / "model", "tiny", family=family)
    shop = tmp_path / "shop"
    (shop / "photos").mkdir(parents=True)
    (shop / "photos" / "mug.png").write_bytes(png((200, 30, 30)))
    (shop / "photos" / "lamp.png").write_bytes(png((30, 30, 200), (40, 56)))
    rows = [
        {"id": "plain", "prompt": "a mug on a table", "reference_images": None},
        {"id": "mug", "prompt": "a mug on a table", "reference_images": ["photos/mug.png"]},
        {"id": "mug-again", "prompt": "a mug on a table", "reference_images": [str(shop / "photos" / "mug.png")]},
        {"id": "both", "prompt": "a mug on a table", "reference_images": ["photos/mug.png", "photos/lamp.png"]},
    ]
    manifest = write_manifest(shop / "manifest.parquet",
                              [{**r, "width": 64, "height": 64, "steps": 2, "seed": 5} for r in rows])
    out = tmp_path / "out"

    summary = render(make_job(str(manifest), str(out), str(model), batch_size=1), progress=False)

    assert (summary.images_rendered, summary.images_failed, summary.invalid_rows) == (4, 0, 0)
    table = assert_images_match_metadata(str(out))
    digest = {row["request_id"]: row["sha256"] for row in table.to_pylist()}
    assert digest["mug"] == digest["mug-again"]
    assert len({digest["plain"], digest["mug"], digest["both"]}) == 3
