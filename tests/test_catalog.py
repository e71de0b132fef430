"""Catalog assets: stable paths per (sku, aspect, variant), re-rendering only the products that changed."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.catalog import ProductTableError, catalog_manifest, read_products, run_catalog, sku_folder
from schemas.catalog import CatalogSpec, aspect_size
from tests.helpers import assert_images_match_metadata

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter

PRODUCTS = [
    {"sku": "LAMP-1", "title": "brass desk lamp", "category": "lamps", "attributes": {"color": "gold"}},
    {"sku": "LAMP-2", "title": "paper lantern", "category": "lamps", "attributes": {"color": "white"}},
    {"sku": "CHAIR-1", "title": "lounge chair", "category": "chairs", "attributes": {"color": "green"}},
    {"sku": "MUG/7 blue", "title": "speckled mug", "category": "kitchen", "attributes": {"color": "blue"}},
    {"sku": "TENT-1", "title": "orange tent", "category": "outdoor", "attributes": {"color": "orange"}},
]
TEMPLATES = {"lamps": "studio photo of a {color} {title}", "*": "product photo of {title} ({category}), {attributes}"}


def write_products(path, rows, when="2026-01-01"):
    stamp = datetime.fromisoformat(when).replace(tzinfo=timezone.utc)
    table = pa.Table.from_pylist([{**r, "attributes": json.dumps(r["attributes"]), "updated_at": stamp}
                                  for r in rows])
    pq.write_table(table, path)
    return str(path)


def make_spec(products: str, out: str, model: str = "flux.1-schnell", **fields) -> CatalogSpec:
    data = {"products": products, "templates": TEMPLATES, "aspects": ["1:1", "3:4"], "size": 80, "variants": 1,
            "output": {"uri": out}, "model": {"name": model}, "render": {"batch_size": 4}}
    data.update(fields)
    return CatalogSpec.model_validate(data)


def test_aspects_keep_the_area_in_multiples_of_16():
    assert aspect_size("1:1", 1024) == (1024, 1024)
    assert aspect_size("16:9", 1024) == (1360, 768)
    assert aspect_size("3:4", 80) == (64, 96)
    with pytest.raises(ValueError, match="must be W:H"):
        aspect_size("wide", 1024)


def test_unsafe_skus_get_a_hashed_folder_and_safe_ones_keep_their_name():
    assert sku_folder("LAMP-1") == "LAMP-1"
    for sku in ("MUG/7 blue", "../etc", "..", ".hidden", "a" * 65):
        folder = sku_folder(sku)
        assert folder.startswith("sku-") and "/" not in folder and folder == sku_folder(sku)


def test_request_ids_change_with_render_parameters_only(tmp_path):
    first = make_spec(write_products(tmp_path / "a.parquet", PRODUCTS), str(tmp_path))
    edited = [dict(r) for r in PRODUCTS]
    edited[1]["title"] = "round paper lantern"
    second = make_spec(write_products(tmp_path / "b.parquet", edited, when="2026-02-02"), str(tmp_path))

    ids = [{(r["sku"], r["aspect"]): r["id"] for r in catalog_manifest(s, read_products(s)[0])[0].to_pylist()}
           for s in (first, second)]
    changed = {sku for (sku, _), request_id in ids[0].items() if ids[1][(sku, _)] != request_id}
    assert changed == {"LAMP-2"}


def test_bad_product_rows_and_missing_templates_are_refused_with_their_reason(tmp_path):
    rows = PRODUCTS[:2] + [
        {"sku": "LAMP-1", "title": "dup", "category": "lamps", "attributes": {"color": "red"}},
        {"sku": "X-1", "title": "  ", "category": "lamps", "attributes": {}},
        {"sku": "X-2", "title": "no colour", "category": "lamps", "attributes": {}},
    ]
    spec = make_spec(write_products(tmp_path / "p.parquet", rows), str(tmp_path),
                     templates={"lamps": TEMPLATES["lamps"]})
    products, failures, count = read_products(spec)
    _, assets, refused = catalog_manifest(spec, products)
    reasons = {(f.row, f.field): f.reason for f in failures + refused}

    assert count == 5 and {a.sku for a in assets} == {"LAMP-1", "LAMP-2"}
    assert reasons[(2, "sku")] == "duplicate: sku 'LAMP-1' as row 0"
    assert reasons[(3, "title")] == "title must be non-empty text of at most 1000 characters"
    assert reasons[(4, "category")] == "the template for category 'lamps' uses {color}, which this product's " \
        "attributes lack"

    no_default = make_spec(write_products(tmp_path / "q.parquet", PRODUCTS[2:3]), str(tmp_path),
                           templates={"lamps": "x"})
    assert catalog_manifest(no_default, read_products(no_default)[0])[2][0].reason == \
        "no template for category 'chairs' and no '*' template"
    pq.write_table(pa.table({"sku": ["a"], "name": ["b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ProductTableError, match="has no 'title' column"):
        read_products(make_spec(str(tmp_path / "bad.parquet"), str(tmp_path)))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_catalog_rerun_after_changing_two_skus_renders_exactly_those_two(tmp_path, tiny_model):
    out = tmp_path / "out"
    spec = make_spec(write_products(tmp_path / "v1.parquet", PRODUCTS), str(out), str(tiny_model))
    report, summary = run_catalog(spec, progress=False)
    assert (summary.images_rendered, report.assets_published) == (10, 10)
    assert report.skus_new == sorted(p["sku"] for p in PRODUCTS)
    live = {p: p.read_bytes() for p in (out / "catalog").glob("*/*/*.png")}
    assert len(live) == 10
    assert (out / "catalog" / "LAMP-1" / "3x4" / "0.png").is_file()
    assert (out / "catalog" / sku_folder("MUG/7 blue") / "1x1" / "0.png").is_file()
    untouched = out / "catalog" / "LAMP-1" / "1x1" / "0.png"
    untouched_mtime = untouched.stat().st_mtime_ns

    edited = [dict(r) for r in PRODUCTS[:4]]  # TENT-1 is gone
    edited[1]["title"] = "round paper lantern"  # LAMP-2: new prompt
    edited[2]["attributes"] = {"color": "red"}  # CHAIR-1: new prompt
    edited[3]["attributes"] = {"color": "blue"}  # MUG: same parameters, only updated_at moves
    spec = make_spec(write_products(tmp_path / "v2.parquet", edited, when="2026-03-03"), str(out), str(tiny_model))
    report, summary = run_catalog(spec, progress=False)

    assert summary.images_rendered == 4
    assert report.skus_changed == ["CHAIR-1", "LAMP-2"] and report.skus_new == []
    assert report.skus_removed == ["TENT-1"] and report.skus_unchanged == 2
    assert (report.assets_published, report.previous_versions_kept) == (4, 4)
    assert untouched.stat().st_mtime_ns == untouched_mtime
    for sku in ("LAMP-2", "CHAIR-1"):
        for aspect in ("1x1", "3x4"):
            stable = out / "catalog" / sku / aspect / "0.png"
            kept = list((out / "catalog" / "_previous" / sku / aspect / "0").glob("*.png"))
            assert [p.read_bytes() for p in kept] == [live[stable]]
            assert stable.read_bytes() != live[stable]
    index = json.loads((out / "catalog" / "_index.json").read_text())["assets"]
    assert "TENT-1/1x1/0" not in index and index["LAMP-2/1x1/0"]["path"] == "catalog/LAMP-2/1x1/0.png"
    metadata = {r["key"]: r for r in assert_images_match_metadata(str(out)).to_pylist()}
    assert metadata[index["CHAIR-1/3x4/0"]["key"]]["prompt"] == "product photo of lounge chair (chairs), color: red"
    assert json.loads((out / "catalog" / "_runs" / f"{report.run_id}.json").read_text())["skus_removed"] == ["TENT-1"]

    again, summary = run_catalog(spec, progress=False)
    assert (summary.images_rendered, again.assets_published, again.skus_unchanged) == (0, 0, 4)
    assert again.skus_changed == again.skus_removed == []


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_cli_catalog_run_publishes_and_prints_the_report(tmp_path, tiny_model, capsys):
    import yaml

    from jobs.cli import main

    out = tmp_path / "out"
    spec = make_spec(write_products(tmp_path / "p.parquet", PRODUCTS[:1]), str(out), str(tiny_model),
                     aspects=["1:1"])
    spec_file = tmp_path / "catalog.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))

    assert main(["catalog", "run", str(spec_file), "--no-progress"]) == 0

    printed = capsys.readouterr().out
    assert "1 products: 1 new, 0 changed, 0 unchanged, 0 removed, 0 failed, 0 refused; 1 images rendered, " \
        "1 published, 0 previous versions kept" in printed
    assert (out / "catalog" / "LAMP-1" / "1x1" / "0.png").is_file()


def test_a_catalog_run_refused_for_gpus_writes_no_manifest_and_leaves_no_output_folder(tmp_path, tiny_model,
                                                                                        ray_cluster, monkeypatch):
    from pipeline.cluster.resources import ClusterTooSmallError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session's own cluster: 4 fake GPUs, never grows
    out = tmp_path / "out"
    spec = make_spec(write_products(tmp_path / "p.parquet", PRODUCTS[:1]), str(out), str(tiny_model),
                     aspects=["1:1"], render={"batch_size": 4, "gpus_per_replica": 8})

    with pytest.raises(ClusterTooSmallError):
        run_catalog(spec, progress=False)

    assert not out.exists()


def test_a_catalog_run_while_another_driver_holds_the_output_leaves_its_manifest_alone(tmp_path, tiny_model,
                                                                                         ray_cluster):
    import time

    from pipeline.store.lease import LeaseHeldError

    out = tmp_path / "out"
    spec = make_spec(write_products(tmp_path / "p.parquet", PRODUCTS[:1]), str(out), str(tiny_model),
                     aspects=["1:1"])
    run_catalog(spec, progress=False)
    now = time.time()  # a driver on another machine, renewing its lease: it is reading manifest.parquet
    (out / "_lease.json").write_text(json.dumps(
        {"host": "render-node-7", "pid": 4242, "run_id": "20261201T080000-c0ffee", "machine": "other-machine",
         "started_at": now - 5, "renewed_at": now, "expires_after": 60.0}))
    before = (out / "manifest.parquet").read_bytes()
    edited = make_spec(write_products(tmp_path / "p2.parquet", [{**PRODUCTS[0], "title": "a new lamp"}]), str(out),
                       str(tiny_model), aspects=["1:1"])

    with pytest.raises(LeaseHeldError, match="render-node-7"):
        run_catalog(edited, progress=False)

    assert (out / "manifest.parquet").read_bytes() == before
