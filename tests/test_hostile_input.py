"""Manifests written by someone else: every malformed file or row is refused with a message naming the
row and the field, the job goes on with the rest, and nothing is ever written outside OUTPUT."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.manifest import ManifestError, read_manifest
from pipeline.plan import image_key
from schemas import MANIFEST_COLUMNS, ModelLimits

TINY_LIMITS = ModelLimits(min_side=64, max_side=1024)  # what `fluxbatch model build --size tiny` declares
ADAPTERS = {"style", "ink"}


def exact(text: str) -> str:
    return re.escape(text)


@dataclass
class Case:
    """One hostile manifest: its files, and the failures expected as (file, row, field, reason pattern)."""

    name: str
    files: dict[str, Any]  # file name -> pa.Table, or raw bytes
    failures: list[tuple[str, int | None, str | None, str]]
    valid: int = 0
    stage: str = "validate"
    extra: dict[str, Any] = field(default_factory=dict)


def row(name: str, table: pa.Table, column: str | None, reason: str, at: int = 0, valid: int = 0) -> Case:
    return Case(name, {"m.parquet": table}, [("m.parquet", at, column, reason)], valid=valid)


def prompt_and(**columns: Any) -> pa.Table:
    """A one-row table: a good prompt plus the given columns, each an Arrow array or a Python value."""
    data: dict[str, Any] = {"prompt": pa.array(["a red cat"])}
    for name, value in columns.items():
        data[name] = value if isinstance(value, pa.Array) else pa.array([value])
    return pa.table(data)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


GOOD = parquet_bytes(pa.table({"prompt": ["a cat"] * 50, "id": [f"r{i}" for i in range(50)]}))
UTF8_BROKEN = pa.table({"prompt": pa.array([b"a \xff\xfe cat"], pa.binary()).view(pa.string())})
DUPLICATE_COLUMNS = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"])
HUGE = "x" * 102_400

CASES = [
    # prompt
    row("null prompt", pa.table({"prompt": pa.array([None], pa.string())}), "prompt",
        exact("prompt must be text, got null")),
    row("empty prompt", pa.table({"prompt": [""]}), "prompt", exact("prompt is empty")),
    row("blank prompt", pa.table({"prompt": [" \t\n "]}), "prompt", exact("prompt is empty")),
    row("integer prompt", pa.table({"prompt": [42]}), "prompt", exact("prompt must be text, got int")),
    row("100 KB prompt", pa.table({"prompt": [HUGE]}), "prompt",
        exact("prompt is 102400 characters; at most 4000 are allowed")),
    row("NUL in prompt", pa.table({"prompt": ["a\x00cat"]}), "prompt",
        exact("prompt contains control characters (only tab and newline are allowed)")),
    row("terminal escape in prompt", pa.table({"prompt": ["\x1b[31mred\x1b[0m"]}), "prompt",
        exact("prompt contains control characters (only tab and newline are allowed)")),
    row("bytes prompt", pa.table({"prompt": pa.array([b"\xff\xfe"], pa.binary())}), "prompt",
        exact("prompt must be text, got bytes")),
    # width / height
    row("width not a multiple of 16", prompt_and(width=70), "width", exact("width must be a multiple of 16, got 70")),
    row("huge width", prompt_and(width=65536), "width",
        exact("width must be between 64 and 1024 for this model, got 65536")),
    row("zero height", prompt_and(height=0), "height",
        exact("height must be between 64 and 1024 for this model, got 0")),
    row("negative width", prompt_and(width=-16), "width",
        exact("width must be between 64 and 1024 for this model, got -16")),
    row("fractional width", prompt_and(width=64.5), "width", exact("width must be an integer, got 64.5")),
    row("NaN height", prompt_and(height=float("nan")), "height", exact("height must be an integer, got nan")),
    row("width as text", prompt_and(width="64"), "width", exact("width must be an integer, got str")),
    row("width as a list", prompt_and(width=pa.array([[64, 64]])), "width",
        exact("width must be an integer, got list")),
    row("width as a struct", prompt_and(width=pa.array([{"w": 64}])), "width",
        exact("width must be an integer, got dict")),
    row("width as a boolean", prompt_and(width=True), "width", exact("width must be an integer, got a boolean")),
    # steps, guidance, seed, num_images
    row("negative steps", prompt_and(steps=-3), "steps", exact("steps must be between 1 and 200, got -3")),
    row("zero steps", prompt_and(steps=0), "steps", exact("steps must be between 1 and 200, got 0")),
    row("absurd steps", prompt_and(steps=10**12), "steps", exact("steps must be between 1 and 200, got 1000000000000")),
    row("NaN guidance", prompt_and(guidance=float("nan")), "guidance",
        exact("guidance must be a finite number, got nan")),
    row("infinite guidance", prompt_and(guidance=float("inf")), "guidance",
        exact("guidance must be a finite number, got inf")),
    row("negative guidance", prompt_and(guidance=-1.0), "guidance",
        exact("guidance must be between 0 and 30.0, got -1.0")),
    row("guidance as text", prompt_and(guidance="3.5"), "guidance", exact("guidance must be a number, got str")),
    row("negative seed", prompt_and(seed=-1), "seed",
        exact("seed must be an unsigned 64-bit integer (0 to 2**64-1), got -1")),
    row("seed beyond 64 bits", prompt_and(seed=1e30), "seed",
        r"seed must be an unsigned 64-bit integer \(0 to 2\*\*64-1\), got 1000000000000000019884624838656"),
    row("zero images", prompt_and(num_images=0), "num_images", exact("num_images must be between 1 and 64, got 0")),
    row("a million images", prompt_and(num_images=10**6), "num_images",
        exact("num_images must be between 1 and 64, got 1000000")),
    # output_format, model
    row("unknown format", prompt_and(output_format="gif"), "output_format",
        exact("output_format must be one of png, jpeg, webp; got 'gif'")),
    row("100 KB format", prompt_and(output_format=HUGE), "output_format",
        r"output_format must be one of png, jpeg, webp; got 'x{300,}\.\.\."),
    row("other model", prompt_and(model="other/model"), "model",
        exact("row asks for model 'other/model', but this job renders 'tiny'; split the manifest per model")),
    row("model as a number", prompt_and(model=3), "model",
        exact("model must be a non-empty preset name or path, or null for the job's model")),
    # id
    row("empty id", prompt_and(id=""), "id", exact("id is empty; leave the column null to derive an id from the row")),
    row("300-character id", prompt_and(id="i" * 300), "id", exact("id is 300 characters; at most 256 are allowed")),
    row("newline in id", prompt_and(id="a\nb"), "id", exact("id contains control characters")),
    row("fractional id", prompt_and(id=1.5), "id", exact("id must be text or an integer, got float")),
    Case("duplicate id", {"m.parquet": pa.table({"prompt": ["a", "b"], "id": ["same", "same"]})},
         [("m.parquet", 1, "id", r"duplicate: id 'same' as row 0 of .*m\.parquet")], valid=1),
    Case("duplicate id in another file",
         {"a.parquet": pa.table({"prompt": ["a"], "id": ["x"]}), "b.parquet": pa.table({"prompt": ["b"], "id": ["x"]})},
         [("b.parquet", 0, "id", r"duplicate: id 'x' as row 0 of .*a\.parquet")], valid=1),
    Case("same row twice without ids", {"m.parquet": pa.table({"prompt": ["a cat", "a cat"]})},
         [("m.parquet", 1, None, r"duplicate: the same render parameters as row 0 of .*m\.parquet")], valid=1),
    # adapters
    row("undeclared adapter", prompt_and(adapters=pa.array([[{"name": "ghost", "scale": 1.0}]])), "adapters",
        exact("adapter 'ghost' is not declared in the job's model.adapters")),
    row("adapters as text", prompt_and(adapters="style"), "adapters",
        exact("adapters must be a list of {name, scale} entries")),
    row("NaN adapter scale", prompt_and(adapters=pa.array([[{"name": "style", "scale": float("nan")}]])), "adapters",
        exact("adapters.0.scale: adapter scale must be a finite number in [-10, 10], got nan")),
    row("adapter named twice",
        prompt_and(adapters=pa.array([[{"name": "ink", "scale": 1.0}, {"name": "ink", "scale": 0.5}]])),
        "adapters", exact("an adapter is named twice")),
    row("nine adapters", prompt_and(adapters=pa.array([[{"name": f"a{i}", "scale": 1.0} for i in range(9)]])),
        "adapters", exact("at most 8 adapters per row, got 9")),
    row("adapter name as a list", prompt_and(adapters=pa.array([[{"name": ["style"], "scale": 1.0}]])), "adapters",
        exact("adapters.0.name: Input should be a valid string")),
    row("adapter pointing at a file", prompt_and(adapters=pa.array([[{"name": "style", "path": "/etc/passwd"}]])),
        "adapters", exact("adapters.0.path is not a known field")),
    Case("three bad fields in one row", {"m.parquet": pa.table({"prompt": [""], "width": [70], "steps": [-1]})},
         [("m.parquet", 0, "prompt", exact("prompt is empty")),
          ("m.parquet", 0, "width", exact("width must be a multiple of 16, got 70")),
          ("m.parquet", 0, "steps", exact("steps must be between 1 and 200, got -1"))]),
    # rows that look hostile but are fine: their keys are hashes, so they render inside OUTPUT
    Case("ids that look like paths", {"m.parquet": pa.table({
        "prompt": ["a", "b", "c", "d"], "id": ["../../escape", "/etc/passwd", "C:\\Windows\\x", "images/../../up"]})},
         [], valid=4),
    Case("unicode prompt", {"m.parquet": pa.table({"prompt": ["猫 \u202eRTL\u202c 🐈 e\u0301"]})}, [], valid=1),
    Case("largest uint64 seed", {"m.parquet": prompt_and(seed=pa.array([2**64 - 1], pa.uint64()))}, [], valid=1),
    Case("dictionary-encoded prompt", {"m.parquet": pa.table({"prompt": pa.array(["a", "b"]).dictionary_encode()})},
         [], valid=2),
    Case("integer ids", {"m.parquet": pa.table({"prompt": ["a", "b"], "id": [7, 8]})}, [], valid=2),
    Case("zero rows", {"m.parquet": pa.table({"prompt": pa.array([], pa.string())})}, []),
    Case("extra column of another type in each file",
         {"a.parquet": pa.table({"prompt": ["a"], "shop": [3]}),
          "b.parquet": pa.table({"prompt": ["b"], "shop": ["x"]})},
         [], valid=2, extra={"shop": pa.string()}),
    Case("extra column named like an output column", {"m.parquet": pa.table({"prompt": ["a"], "key": ["k"],
                                                                             "manifest_key": ["m"]})},
         [], valid=1, extra={"manifest_key": pa.string(), "manifest_manifest_key": pa.string()}),
    # whole files
    Case("no prompt column", {"m.parquet": pa.table({"text": ["a"], "width": [64]})},
         [("m.parquet", None, None, exact("no 'prompt' column; the file has: 'text', 'width'"))], stage="read"),
    Case("corrupt file", {"m.parquet": b"\x00garbage\xff" * 100},
         [("m.parquet", None, None, r"not a readable Parquet file \(900 bytes\): .+")], stage="read"),
    Case("truncated file", {"m.parquet": GOOD[: len(GOOD) // 2]},
         [("m.parquet", None, None, r"not a readable Parquet file \(\d+ bytes\): .+")], stage="read"),
    Case("empty file", {"m.parquet": b""},
         [("m.parquet", None, None, exact("the file is empty (0 bytes), not a Parquet file"))], stage="read"),
    Case("CSV named .parquet", {"m.parquet": b"prompt,width\na cat,64\n"},
         [("m.parquet", None, None, r"not a readable Parquet file \(22 bytes\): Parquet magic bytes not found.*")],
         stage="read"),
    Case("repeated column", {"m.parquet": DUPLICATE_COLUMNS},
         [("m.parquet", None, None, exact("column 'prompt' appears more than once; every column name must be unique"))],
         stage="read"),
    Case("text that is not UTF-8", {"m.parquet": UTF8_BROKEN},
         [("m.parquet", None, "prompt", r"column 'prompt' \(string\) cannot be read: 'utf-8' codec can't decode.*")],
         stage="read"),
    Case("a bad file beside a good one", {"bad.parquet": b"nope", "good.parquet": pa.table({"prompt": ["a"]})},
         [("bad.parquet", None, None, r"not a readable Parquet file \(4 bytes\): .+")], valid=1, stage="read"),
]


def write_files(folder: Path, files: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            pq.write_table(content, folder / name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_manifest_is_refused_row_by_row_with_the_field_and_reason(tmp_path, case):
    write_files(tmp_path / "in", case.files)
    failures: list = []
    manifest = read_manifest(str(tmp_path / "in"), limits=TINY_LIMITS, model_name="tiny", adapter_names=ADAPTERS,
                             sink=failures.append)

    got = sorted(((Path(f.source).name, f.row, f.field, f.reason) for f in failures), key=str)
    want = sorted(case.failures, key=str)
    assert len(got) == len(want), got
    for (g_file, g_row, g_field, g_reason), (w_file, w_row, w_field, w_pattern) in zip(got, want):
        assert (g_file, g_row, g_field) == (w_file, w_row, w_field)
        assert re.fullmatch(w_pattern, g_reason, flags=re.S), g_reason
        assert len(g_reason) <= 400
    assert all(f.stage == ("read" if f.row is None else "validate") for f in failures)
    assert manifest.failures.total == len(failures)
    assert manifest.failures.rows == len({(f.source, f.row) for f in failures})
    assert len(manifest.valid_rows()) == case.valid
    for name, arrow_type in case.extra.items():
        assert {f.name: f.type for f in manifest.extra_fields}[name] == arrow_type


def test_case_table_covers_at_least_forty_distinct_malformed_inputs():
    assert len({c.name for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("target", ["glob/*.parquet", "empty-folder", "missing.parquet"])
def test_manifest_that_names_no_file_stops_the_job_with_a_message(tmp_path, target):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "empty-folder" / "notes.txt").write_text("not a manifest")
    (tmp_path / "glob").mkdir()
    url = str(tmp_path / target)
    expected = {"glob/*.parquet": f"no files match the manifest glob {url!r}",
                "empty-folder": f"the manifest folder {url!r} holds no .parquet files",
                "missing.parquet": f"no manifest at {url!r}"}[target]
    with pytest.raises(ManifestError, match=re.escape(expected)):
        read_manifest(url)


# -- property: whatever a cell holds, the reader answers with a row or with messages, never a crash ------------

CELL = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x20), max_size=5),
    st.binary(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.lists(st.fixed_dictionaries({"name": st.sampled_from(["style", "ink", "ghost", ""]),
                                     "scale": st.floats(allow_nan=True)}), max_size=3),
)
ROW = st.fixed_dictionaries({}, optional={name: CELL for name in MANIFEST_COLUMNS})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=ROW, prompt=st.one_of(CELL, st.just("a red cat")))
def test_any_row_values_yield_a_valid_row_or_messages_naming_the_field(tmp_path, values, prompt):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": pa.array([prompt]), **{k: pa.array([v]) for k, v in values.items()}}), path)

    failures: list = []
    manifest = read_manifest(str(path), limits=TINY_LIMITS, model_name="tiny", adapter_names=ADAPTERS,
                             sink=failures.append)

    assert len(manifest.valid_rows()) + bool(failures) == 1
    assert manifest.failures.rows == bool(failures)
    for failure in failures:
        assert failure.stage == "validate" and failure.row == 0
        assert failure.field in {"prompt", *values}, failure
        assert failure.reason and len(failure.reason) <= 400
        assert "pydantic" not in failure.reason and "Traceback" not in failure.reason
    for item in manifest.valid_rows():
        request = item.request
        assert request.prompt.strip() and len(request.prompt) <= 4000
        for side in (request.width, request.height):
            assert side is None or (side % 16 == 0 and 64 <= side <= 1024)
        assert request.steps is None or 1 <= request.steps <= 200
        assert request.guidance is None or 0 <= request.guidance <= 30
        assert request.seed is None or 0 <= request.seed < 2**64
        assert 1 <= request.num_images <= 64


@given(request_id=st.text(min_size=1, max_size=300), variant=st.integers(min_value=0, max_value=63))
def test_any_request_id_gives_a_key_that_is_a_plain_file_name(request_id, variant):
    key = image_key(request_id, variant)
    assert re.fullmatch(r"[0-9a-f]{32}", key)
