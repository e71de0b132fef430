"""What the render tests check again and again: the output layout of a run."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pyarrow as pa

from flux_worker.storage import filesystem
from pipeline.store import ledger
from schemas import JobSpec
from tests.own_ray import REPO


def session_cluster_env(ray: Any) -> dict[str, str]:
    """Environment for a `fluxbatch` subprocess that drives this test session's Ray cluster, not one of its own."""
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def make_job(manifest: str, output: str, model: str, **fields: Any) -> JobSpec:
    data: dict[str, Any] = {"manifest": manifest, "output": {"uri": output}, "model": {"name": model}}
    data.update(fields)
    return JobSpec.model_validate(data)


def metadata(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = filesystem(output, storage_options)
    table = ledger.read_table(fs, root, "metadata")
    assert table is not None, f"no metadata parts under {output}"
    return table


def failures(output: str, storage_options: dict | None = None) -> pa.Table | None:
    fs, root = filesystem(output, storage_options)
    return ledger.read_table(fs, root, "failures")


def assert_images_match_metadata(output: str, storage_options: dict | None = None) -> pa.Table:
    """Every metadata row points at an existing image with its recorded bytes, and every image has a row."""
    fs, root = filesystem(output, storage_options)
    table = metadata(output, storage_options)
    # The reader keeps one row per key, so "no key twice" is checked on the parts as they are on disk.
    keys = [key for part in ledger.parts(fs, f"{root}/metadata")
            for key in ledger.read_part(fs, root, part, ["key"]).column("key").to_pylist()]
    assert len(keys) == len(set(keys)), "a key appears twice in the metadata parts"
    files = {p for p in fs.find(f"{root}/images")}
    recorded = set()
    for row in table.to_pylist():
        _, path = filesystem(row["image_uri"], storage_options)
        data = fs.read_bytes(path)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
        recorded.add(path)
    assert files == recorded, f"images without metadata: {sorted(files - recorded)[:3]}"
    return table


def error_lines(stderr: str) -> list[str]:
    """stderr less a run's phase lines (`fluxbatch: ...`, pipeline/progress.py): what a refusal says."""
    return [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("fluxbatch: ")]
