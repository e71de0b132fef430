"""Publish a catalog run: copy each finished image to its stable path, keep what it replaces, update the index.

The index (OUTPUT/catalog/_index.json) says which key is live at each path. A path whose key is unchanged is
left alone; a changed one has its live file copied to _previous/ first, then the new image written over it
in one put. An image that failed to render leaves the old one live. SKUs gone from the product table are
reported and dropped from the index; their files stay where storefronts may still link them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flux_worker.storage import Storage
from jobs.catalog import Asset
from pipeline.store import ledger
from schemas.catalog import CatalogReport
from schemas.layout import CATALOG, METADATA, committed_image_path

INDEX = f"{CATALOG}/_index.json"


def read_index(fs: Storage, root: str) -> dict[str, dict[str, Any]]:
    """The live assets by path id (`<sku>/<aspect>/<variant>`), empty before the first publish."""
    path = f"{root}/{INDEX}"
    if not fs.exists(path):
        return {}
    return json.loads(fs.read_bytes(path))["assets"]


def _finished(fs: Storage, root: str, keys: set[str]) -> dict[str, dict[str, Any]]:
    """The ledger's rows for `keys`: where each finished image is and its sha256."""
    table = ledger.read_table(fs, root, METADATA)
    if table is None:
        return {}
    table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string())))
    return {row["key"]: row for row in table.select(["key", "image_uri", "sha256"]).to_pylist()}


def publish(fs: Storage, root: str, assets: list[Asset], done_before: set[str],
            report: CatalogReport, current_skus: set[str]) -> None:
    """Bring every stable path up to this run's image, fill the report's SKU lists, and write the index."""
    index = read_index(fs, root)
    finished = _finished(fs, root, {a.key for a in assets})
    known_skus = {entry["sku"] for entry in index.values()}
    republished: set[str] = set()
    failed: set[str] = set()
    by_sku: dict[str, list[Asset]] = defaultdict(list)
    live: dict[str, dict[str, Any]] = {}
    for asset in assets:
        by_sku[asset.sku].append(asset)
        old = index.get(asset.path_id)
        record = finished.get(asset.key)
        if record is None:
            failed.add(asset.sku)
            if old is not None:
                live[asset.path_id] = old
            continue
        if old is not None and old["key"] == asset.key and fs.exists(f"{root}/{old['path']}"):
            live[asset.path_id] = old
            continue
        live[asset.path_id] = _replace(fs, root, asset, record, old, report)
        republished.add(asset.sku)
    rendered = {a.sku for a in assets if a.key not in done_before and a.key in finished}
    report.skus_new = sorted(s for s in republished | rendered if s not in known_skus)
    report.skus_changed = sorted(s for s in republished | rendered if s in known_skus)
    report.skus_failed = sorted(failed)
    report.skus_unchanged = len([s for s in by_sku if s not in republished | rendered | failed])
    report.skus_removed = sorted(known_skus - current_skus)
    # A refused product row keeps its live images: it is a data problem to fix, not a removal.
    for path_id, entry in index.items():
        if entry["sku"] in current_skus and entry["sku"] not in by_sku:
            live.setdefault(path_id, entry)
    document = {"assets": dict(sorted(live.items())), "updated_at": datetime.now(timezone.utc).isoformat(),
                "run_id": report.run_id}
    fs.write_bytes(f"{root}/{INDEX}", (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def _replace(fs: Storage, root: str, asset: Asset, record: dict[str, Any],
             old: dict[str, Any] | None, report: CatalogReport) -> dict[str, Any]:
    """Keep the live file (if any) under _previous/, then write the new image to the stable path."""
    ext = record["image_uri"].rsplit(".", 1)[-1]
    path = f"{CATALOG}/{asset.path_id}.{ext}"
    if old is not None and fs.exists(f"{root}/{old['path']}"):
        old_ext = old["path"].rsplit(".", 1)[-1]
        kept = f"{root}/{CATALOG}/_previous/{asset.path_id}/{report.run_id}.{old_ext}"
        fs.write_bytes(kept, fs.read_bytes(f"{root}/{old['path']}"))
        report.previous_versions_kept += 1
        if old["path"] != path:  # the format changed: the old name must not stay live
            fs.rm_file(f"{root}/{old['path']}")
    data = fs.read_bytes(committed_image_path(root, record["key"], record["image_uri"]))  # a moved OUTPUT too
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise RuntimeError(f"image {record['image_uri']} does not match the sha256 in its metadata row; "
                           "delete it and re-run to render it again")
    fs.write_bytes(f"{root}/{path}", data)
    report.assets_published += 1
    return {"sku": asset.sku, "aspect": asset.aspect, "variant": asset.variant, "key": asset.key, "path": path,
            "sha256": record["sha256"], "published_at": datetime.now(timezone.utc).isoformat()}
