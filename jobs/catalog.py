"""`fluxbatch catalog run SPEC.yaml`: product images at stable paths, re-rendered only when a product changed.

A product table row becomes one manifest row per aspect (`variants` images each). Its request id is a hash
of (sku, aspect, prompt, size, seed), so the ledger's resume does the incremental work: a product whose
prompt did not change keeps its keys and renders nothing; an edited one gets new keys and renders again.
After the render, jobs/catalog_publish.py copies each image to its stable path.

    OUTPUT/catalog/<sku>/<aspect>/<variant>.png      the live image a storefront links (e.g. AB-12/4x5/0.png)
    OUTPUT/catalog/_previous/<sku>/<aspect>/<variant>/<run id>.png   each replaced version
    OUTPUT/catalog/_index.json                        what is live: sku, aspect, variant -> key, path, sha256
    OUTPUT/catalog/_runs/<run id>.json                 the run's report (new, changed, removed, failed SKUs)

The <sku> folder is the SKU itself when it is short and made of letters, digits, '.', '_' and '-', and a hash
of it otherwise, so no product text can name a path outside OUTPUT/catalog.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import filesystem
from pipeline.plan import image_key
from pipeline.references import check_references, default_roots
from schemas import FailureRecord, JobSpec, RunSummary
from schemas.catalog import DEFAULT_TEMPLATE, CatalogReport, CatalogSpec, aspect_size
from schemas.errors import FluxbatchError, first_line
from schemas.job_template import template_fields
from schemas.layout import CATALOG, JOB_MANIFEST
from schemas.records import REFERENCES_TYPE

MANIFEST_NAME = JOB_MANIFEST  # OUTPUT/manifest.parquet (schemas/layout.py)
REQUIRED_COLUMNS = ("sku", "title", "category")
SAFE_SKU = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_TEXT = 1000


class ProductTableError(FluxbatchError, ValueError):
    """The product table cannot be read, or lacks a required column."""


@dataclass(frozen=True)
class Product:
    row: int
    sku: str
    title: str
    category: str
    attributes: dict[str, str]
    updated_at: Any
    reference_images: tuple[str, ...] = ()  # product photos; relative paths are relative to the product table


@dataclass(frozen=True)
class Asset:
    """One image a storefront links: its stable place (`path_id`) and the key that renders it this run."""

    sku: str
    aspect: str
    variant: int
    path_id: str  # <sku folder>/<aspect folder>/<variant>, under OUTPUT/catalog/
    key: str


def sku_folder(sku: str) -> str:
    """The SKU as a folder name when it is safe as one, else `sku-` and a hash of it."""
    if SAFE_SKU.match(sku) and ".." not in sku:
        return sku
    return "sku-" + hashlib.blake2b(sku.encode(), digest_size=8).hexdigest()


def aspect_folder(aspect: str) -> str:
    return aspect.replace(":", "x")


def read_products(spec: CatalogSpec) -> tuple[list[Product], list[FailureRecord], int]:
    """Every valid product row, a failure (row, field, reason) for each refused one, and the row count."""
    fs, path = filesystem(spec.products, spec.storage_options)
    try:
        table = pq.read_table(pa.BufferReader(fs.read_bytes(path)))
    except (OSError, pa.ArrowException) as error:
        raise ProductTableError(f"cannot read the product table {spec.products!r}: {first_line(error)}") \
            from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ProductTableError(f"the product table {spec.products!r} has no {missing[0]!r} column; it needs "
                                f"{', '.join(REQUIRED_COLUMNS)} (attributes, updated_at optional)")
    products: list[Product] = []
    failures: list[FailureRecord] = []
    seen: dict[str, int] = {}
    now = datetime.now(timezone.utc)
    for index, values in enumerate(table.to_pylist()):
        checked = _check_product(index, values, seen)
        if isinstance(checked, Product):
            products.append(checked)
            continue
        field, reason, sku = checked
        failures.append(FailureRecord(stage="validate", source=spec.products, row=index, field=field,
                                      request_id=sku, reason=reason, at=now))
    return products, failures, table.num_rows


def _check_product(index: int, values: dict[str, Any],
                   seen: dict[str, int]) -> Product | tuple[str, str, str | None]:
    """The product, or (field, reason, sku) saying why the row is refused."""
    sku = values.get("sku")
    sku = str(sku) if isinstance(sku, int) and not isinstance(sku, bool) else sku
    if not isinstance(sku, str) or not sku.strip() or len(sku) > 256 or not sku.isprintable():
        return "sku", "sku must be printable text of 1 to 256 characters", None
    if sku in seen:
        return "sku", f"duplicate: sku {sku!r} as row {seen[sku]}", sku
    seen[sku] = index
    texts = {}
    for field in ("title", "category"):
        value = values.get(field)
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
            return field, f"{field} must be non-empty text of at most {MAX_TEXT} characters", sku
        texts[field] = value.strip()
    attributes = _attributes(values.get("attributes"))
    if isinstance(attributes, str):
        return "attributes", attributes, sku
    photos = values.get("reference_images")
    photos = () if photos is None else (photos,) if isinstance(photos, str) else photos
    if not isinstance(photos, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in photos):
        return "reference_images", "reference_images must be an image URL or a list of them", sku
    return Product(index, sku, texts["title"], texts["category"], attributes, values.get("updated_at"),
                   tuple(photos))


def _attributes(value: Any) -> dict[str, str] | str:
    """Attributes as {name: text} from a struct, a map, a JSON object text or null; a reason when unusable."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return "attributes must be a JSON object, a struct or a map"
    if isinstance(value, list):  # Arrow maps arrive as [(name, value), ...]
        value = dict(value)
    if not isinstance(value, dict):
        return "attributes must be a JSON object, a struct or a map"
    return {str(k): str(v) for k, v in value.items() if v is not None}


def product_prompt(spec: CatalogSpec, product: Product) -> str:
    """The product's prompt from its category's template; a ValueError names what the product lacks."""
    template = spec.templates.get(product.category, spec.templates.get(DEFAULT_TEMPLATE))
    if template is None:
        raise ValueError(f"no template for category {product.category!r} and no {DEFAULT_TEMPLATE!r} template")
    values = {"sku": product.sku, "title": product.title, "category": product.category,
              "attributes": ", ".join(f"{k}: {v}" for k, v in sorted(product.attributes.items())),
              **{k: v for k, v in product.attributes.items() if k.isidentifier()}}
    lacking = [name for name in template_fields(template) if name not in values]
    if lacking:
        raise ValueError(f"the template for category {product.category!r} uses {{{lacking[0]}}}, "
                         "which this product's attributes lack")
    return template.format(**values)


def catalog_manifest(spec: CatalogSpec, products: list[Product], photos: dict[str, list[dict[str, str]]] | None = None,
                     ) -> tuple[pa.Table, list[Asset], list[FailureRecord]]:
    """One manifest row per (product, aspect), the assets they render, and the products refused.

    `photos`: each product's checked reference images by SKU (`product_photos`), absolute URL and sha256."""
    rows: list[dict[str, Any]] = []
    assets: list[Asset] = []
    failures: list[FailureRecord] = []
    photos = photos or {}
    for product in products:
        try:
            prompt = product_prompt(spec, product)
        except ValueError as error:
            failures.append(FailureRecord(stage="validate", source=spec.products, row=product.row,
                                          request_id=product.sku, field="category", reason=str(error),
                                          at=datetime.now(timezone.utc)))
            continue
        for aspect in spec.aspects:
            width, height = aspect_size(aspect, spec.size)
            seed = _seed(spec.seed, product.sku, aspect)
            fields = [product.sku, aspect, prompt, width, height, seed]
            # Photos only when given: the ids (and so the keys) of products without photos stay what they were.
            fields += [[ref["url"] for ref in photos[product.sku]]] if photos.get(product.sku) else []
            params = json.dumps(fields, ensure_ascii=False)
            # Variants are left out, so adding one renders only the new variant.
            request_id = "cat-" + hashlib.blake2b(params.encode(), digest_size=12).hexdigest()
            references = photos.get(product.sku) or []
            rows.append({"id": request_id, "prompt": prompt, "width": width, "height": height, "seed": seed,
                         "num_images": spec.variants, "reference_images": [ref["url"] for ref in references],
                         "sku": product.sku, "aspect": aspect})
            folder = f"{sku_folder(product.sku)}/{aspect_folder(aspect)}"
            # The key covers the photos' sha256, as the planner's does: a replaced photo is a changed asset.
            shas = [ref["sha256"] for ref in references]
            assets += [Asset(product.sku, aspect, v, f"{folder}/{v}", image_key(request_id, v, shas))
                       for v in range(spec.variants)]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("seed", pa.int64()), ("num_images", pa.int32()),
                        ("reference_images", pa.list_(pa.string())), ("sku", pa.string()), ("aspect", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema), assets, failures


def product_photos(spec: CatalogSpec, products: list[Product], job: JobSpec,
                   ) -> tuple[list[Product], dict[str, list[dict[str, str]]], list[FailureRecord]]:
    """The products whose photos pass the render's own reference checks (pipeline/references.py: inside the job's
    roots, an image within the limits), each one's photos (resolved URL, sha256), and a failure per refused photo.

    Checked here, before the manifest is written, so an asset's key (which covers the photos' sha256) is known
    for publishing, and a product with a bad photo is refused like any other bad product row (its live images
    stay). The render checks the photos again (a second read), as it does any manifest's.
    """
    with_photos = [p for p in products if p.reference_images]
    if not with_photos:
        return products, {}, []
    table = pa.table({
        "request_id": [p.sku for p in with_photos], "source": [spec.products] * len(with_photos),
        "row": pa.array([p.row for p in with_photos], pa.int64()),
        "reference_images": pa.array([[{"url": url, "sha256": None} for url in p.reference_images]
                                      for p in with_photos], REFERENCES_TYPE)})
    failures: list[FailureRecord] = []
    checked = check_references(table, job, failures.append)
    photos = dict(zip(checked.column("request_id").to_pylist(), checked.column("reference_images").to_pylist()))
    refused = {f.request_id for f in failures}
    return [p for p in products if p.sku not in refused], photos, failures


def _seed(seed: int, sku: str, aspect: str) -> int:
    """Fixed per (spec seed, sku, aspect): an edited product keeps its composition noise."""
    digest = hashlib.blake2b(f"{seed}\x1f{sku}\x1f{aspect}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def run_catalog(spec: CatalogSpec, *, new_version: bool = False,
                progress: bool = True) -> tuple[CatalogReport, RunSummary]:
    """Render what changed in the product table, publish it at stable paths, and report by SKU."""
    from jobs.catalog_publish import publish
    from jobs.refusal import restored_on_refusal
    from pipeline import render
    from pipeline.store import ledger
    from pipeline.store.lease import refuse_if_held
    from pipeline.store.ownership import refuse_foreign_output

    started_at = datetime.now(timezone.utc)
    fs, root = filesystem(spec.output.uri, spec.output.storage_options)
    # Before the manifest goes into OUTPUT: render() would then find it there and could not tell it from a user's.
    refuse_foreign_output(fs, root, own={MANIFEST_NAME})
    products, failures, rows = read_products(spec)
    job = spec.job_for(fs.uri(f"{root}/{MANIFEST_NAME}"))
    if not job.reference_roots:  # the manifest is written into OUTPUT: photos default to the product table's place
        job.reference_roots = default_roots(spec.products)
    products, photos, refused = product_photos(spec, products, job)
    failures += refused
    table, assets, refused = catalog_manifest(spec, products, photos)
    failures += refused
    refuse_if_held(fs, root)  # never overwrite the manifest a running driver reads
    with restored_on_refusal(fs, root, [MANIFEST_NAME]):  # a refused render leaves OUTPUT as it was
        fs.write_bytes(f"{root}/{MANIFEST_NAME}", ledger.parquet_bytes(table))
        done_before = ledger.done_keys(fs, root)
        summary = render(job, new_version=new_version, allow_non_empty_output=True, progress=progress)

    # After the render, under its run id: the render's end removes only the parts of earlier runs.
    ledger.write_failures(fs, root, summary.run_id, "catalog", failures)
    report = CatalogReport(run_id=summary.run_id, products=rows,
                           started_at=started_at, images_rendered=summary.images_rendered)
    report.skus_refused = sorted({f.request_id or f"row {f.row}" for f in failures})
    report.problems = [f"{spec.products} row {f.row}: {f.field or 'row'}: {f.reason}" for f in failures]
    # A refused row's SKU still exists: its live images stay, and it is not reported as removed.
    current = {p.sku for p in products} | {f.request_id for f in failures if f.request_id}
    publish(fs, root, assets, done_before, report, current_skus=current)
    report.finished_at = datetime.now(timezone.utc)
    fs.write_bytes(f"{root}/{CATALOG}/_runs/{summary.run_id}.json", (report.model_dump_json(indent=2) + "\n").encode())
    return report, summary
