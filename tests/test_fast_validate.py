"""The column-at-a-time manifest check refuses the same rows, with the same words, as the per-row check."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_worker.presets import ModelPreset
from pipeline import manifest as manifest_module
from pipeline.fast_validate import params_request_id
from pipeline.manifest import read_manifest, request_id_of
from pipeline.plan import plan_images
from schemas import JobSpec, ModelLimits, RenderRequest

LIMITS = ModelLimits(min_side=64, max_side=1024)
PRESET = ModelPreset(name="m", source="m", steps=4, guidance=3.5, max_sequence_length=64, width=256, height=256,
                     min_side=64, max_side=1024)
GOOD = {"id": None, "prompt": "a quiet harbour", "model": None, "width": None, "height": None, "steps": None,
        "guidance": None, "seed": None, "num_images": None, "output_format": None, "shop": "north"}
ROWS = [
    {"id": "ok-1", "seed": 7, "num_images": 3},
    {"prompt": "no id, hashed parameters", "width": 512.0, "guidance": 4},
    {"id": "ok-2", "output_format": " JPG ", "model": "job-model", "steps": 28},
    {"id": "ok-3", "prompt": "тихая гавань 静かな港", "seed": 2**62},
    {"id": "empty", "prompt": ""},
    {"id": "blank", "prompt": " \t "},
    {"id": "wide-blank", "prompt": "\u3000\u2028"},
    {"id": "control", "prompt": "bell\x07"},
    {"id": "long", "prompt": "x" * 4001},
    {"id": "null-prompt", "prompt": None},
    {"id": ""},
    {"id": "new\nline"},
    {"id": "i" * 300},
    {"id": "w500", "width": 500},
    {"id": "w4096", "width": 4096},
    {"id": "w-frac", "width": 512.5},
    {"id": "h-nan", "height": float("nan")},
    {"id": "steps0", "steps": 0},
    {"id": "steps201", "steps": 201},
    {"id": "n0", "num_images": 0},
    {"id": "n65", "num_images": 65},
    {"id": "seed-neg", "seed": -1},
    {"id": "g31", "guidance": 31.0},
    {"id": "g-inf", "guidance": float("inf")},
    {"id": "gif", "output_format": "gif"},
    {"id": "other-model", "model": "someone-else"},
    {"id": "blank-model", "model": "  "},
    {"id": "two-faults", "width": 70, "steps": 0},
    {"id": "ok-1", "prompt": "a repeated id"},
    {"prompt": "no id, hashed parameters", "width": 512.0, "guidance": 4},
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("model", pa.string()), ("width", pa.float64()),
                    ("height", pa.float64()), ("steps", pa.int64()), ("guidance", pa.float64()),
                    ("seed", pa.int64()), ("num_images", pa.int64()), ("output_format", pa.string()),
                    ("shop", pa.string())])


def write(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> str:
    pq.write_table(pa.Table.from_pylist([{**GOOD, **row} for row in rows], schema=schema), path)
    return str(path)


def read_both(url: str, monkeypatch) -> tuple:
    """The manifest read by columns and row by row, each with the failures its reader sent to the sink."""
    monkeypatch.setattr(manifest_module, "VECTORIZE_FROM_ROWS", 0)
    by_columns = read_manifest(url, limits=LIMITS, model_name="job-model", sink=(columns_failed := []).append)
    monkeypatch.setattr(manifest_module, "VECTORIZE_FROM_ROWS", 10**12)
    by_rows = read_manifest(url, limits=LIMITS, model_name="job-model", sink=(rows_failed := []).append)
    by_columns.failed, by_rows.failed = columns_failed, rows_failed
    return by_columns, by_rows


def outcome(manifest) -> tuple:
    failures = [(f.source, f.row, f.request_id, f.field, f.reason) for f in manifest.failed]
    valid = [(r.source, r.row, request_id_of(r.request), r.request.model_dump(), r.extras)
             for r in manifest.valid_rows()]
    return failures, valid, manifest.failures.rows, dict(manifest.failures.by_reason)


def test_column_checks_refuse_the_same_rows_with_the_same_messages(tmp_path, monkeypatch):
    by_columns, by_rows = read_both(write(tmp_path / "m.parquet", ROWS), monkeypatch)

    assert not by_rows.tables, "the row path must have run"
    assert [t.num_rows for t in by_columns.tables] == [4], "the good rows must have passed on the column checks"
    assert outcome(by_columns) == outcome(by_rows)
    refused = {f.row for f in by_rows.failed}
    assert refused == set(range(4, len(ROWS))), "every bad row, and only those, is refused"


def test_a_column_of_a_type_the_checks_do_not_cover_falls_back_to_the_row_checks(tmp_path, monkeypatch):
    schema = SCHEMA.set(SCHEMA.get_field_index("width"), pa.field("width", pa.string()))
    rows = [{**row, "width": None if row.get("width") is None else str(row["width"])} for row in ROWS]
    by_columns, by_rows = read_both(write(tmp_path / "m.parquet", rows, schema), monkeypatch)

    assert not by_columns.tables
    assert outcome(by_columns) == outcome(by_rows)


def test_both_paths_plan_the_same_images(tmp_path, monkeypatch):
    by_columns, by_rows = read_both(write(tmp_path / "m.parquet", ROWS), monkeypatch)
    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "o"}, "model": {"name": "job-model"}})

    plans = [plan_images(m, job, PRESET, committed=None) for m in (by_columns, by_rows)]

    assert plans[0].table.equals(plans[1].table)
    assert plans[0].expected == 3 + 1 + 1 + 1 == plans[0].table.num_rows


def test_resume_skips_done_keys_on_the_column_path(tmp_path, monkeypatch):
    by_columns, _ = read_both(write(tmp_path / "m.parquet", ROWS), monkeypatch)
    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "o"}, "model": {"name": "job-model"}})
    first = plan_images(by_columns, job, PRESET, committed=None)
    committed = first.table.slice(0, 4)  # as the ledger holds them: the same keys and render parameters
    done = set(committed.column("key").to_pylist())

    again = plan_images(by_columns, job, PRESET, committed=committed)

    assert (again.expected, again.already_done, again.table.num_rows) == (6, 4, 2)
    assert not done & set(again.table.column("key").to_pylist())


@pytest.mark.parametrize("row", [
    {"prompt": "p", "width": 512, "guidance": 4.0, "seed": 3, "num_images": 2, "output_format": "jpeg"},
    {"prompt": "p", "model": "m", "steps": 9, "guidance": None, "seed": None, "num_images": 1, "output_format": None},
])
def test_parameter_hash_matches_the_request_id_of_a_validated_row(row):
    request = RenderRequest.model_validate(row)
    normalized = {"width": None, "height": None, "steps": None, "model": None, **row}

    assert params_request_id(normalized) == request_id_of(request)
