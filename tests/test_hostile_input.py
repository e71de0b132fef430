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
UTF8_BROKEN_WITH_ID = UTF8_BROKEN.append_column("id", pa.array(["r0"]))
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
    Case("text that is not UTF-8 in a row with an id", {"m.parquet": UTF8_BROKEN_WITH_ID},
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


# The reader once checked files of 2,048 rows or more by columns and shorter ones row by row; every case runs at
# both sizes, the long one padded after its own rows, so the row numbers and messages expected stay the same.
SHORT, LONG = 0, 2_100


def padded(name: str, table: pa.Table, rows: int) -> tuple[pa.Table, bool]:
    """`table` grown to `rows` rows after its own rows, and whether the added rows are valid.

    Added rows hold a prompt unique to the file (and an id, where ids are text) and nulls elsewhere, so they are
    valid. Where the prompt column cannot hold text (integers, bytes), no row can be valid: the file's own rows
    repeat instead.
    """
    at = table.column_names.index("prompt") if "prompt" in table.column_names else None
    if at is not None and pa.types.is_null(table.schema.types[at]):
        table = table.set_column(at, "prompt", table.column(at).cast(pa.string()))
    kind = pa.string() if at is None else table.schema.types[at]
    text = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
        return pa.concat_tables([table] * -(-rows // table.num_rows)).slice(0, rows), False
    count = rows - table.num_rows
    prompts = pa.array([f"padding row {i} of {name}" for i in range(count)], text)
    ids = pa.array([f"padding-{i}-of-{name}" for i in range(count)])  # where ids are text, padding rows have one
    prompts = prompts if text is kind else prompts.dictionary_encode()
    added = pa.Table.from_arrays([prompts if item.name == "prompt" else ids if item.name == "id" and item.type == text
                                  else pa.nulls(count, item.type) for item in table.schema], schema=table.schema)
    return pa.concat_tables([table, added]), True


def at_size(case: Case, rows: int) -> Case:
    """`case` with each of its Parquet tables padded to `rows` rows, expecting what the added rows add."""
    if rows == SHORT:
        return case
    files, failures, valid = {}, list(case.failures), case.valid
    for name, content in case.files.items():
        if isinstance(content, bytes):
            files[name] = content
            continue
        files[name], added_valid = padded(name, content, rows)
        own = content.num_rows
        if not added_valid:  # each repeated row is refused as the row it repeats
            failures += [(name, r, f[2], f[3]) for r in range(own, rows) for f in case.failures
                         if f[0] == name and f[1] == r % own]
        elif not any(f[0] == name and f[1] is None for f in case.failures):  # not refused whole
            valid += rows - own
    return Case(case.name, files, failures, valid=valid, stage=case.stage, extra=case.extra)


@pytest.mark.parametrize("rows", [SHORT, LONG], ids=["as-is", f"{LONG}-rows"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_manifest_is_refused_row_by_row_with_the_field_and_reason(tmp_path, case, rows):
    case = at_size(case, rows)
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
    assert manifest.valid_count == case.valid
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
    check_any_row(tmp_path, values, prompt, SHORT)


# Fewer examples: each writes and reads 2,100 rows, and the rules are the one-row test's (one path for every size).
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=ROW, prompt=st.one_of(CELL, st.just("a red cat")))
def test_any_row_values_in_a_long_file_yield_a_valid_row_or_messages_naming_the_field(tmp_path, values, prompt):
    check_any_row(tmp_path, values, prompt, LONG)


def check_any_row(tmp_path, values, prompt, rows):
    path = tmp_path / "p.parquet"
    table = pa.table({"prompt": pa.array([prompt]), **{k: pa.array([v]) for k, v in values.items()}})
    table, added_valid = padded("p.parquet", table, rows) if rows else (table, True)
    pq.write_table(table, path)

    failures: list = []
    manifest = read_manifest(str(path), limits=TINY_LIMITS, model_name="tiny", adapter_names=ADAPTERS,
                             sink=failures.append)

    # Row 0 is the one drawn; the rest (if any) are valid padding, or its repeats where no prompt can be valid.
    first = [f for f in failures if f.row == 0]
    assert manifest.valid_count + bool(first) == 1 + (table.num_rows - 1 if added_valid else 0)
    assert manifest.failures.rows == (bool(first) if added_valid else table.num_rows)
    for failure in failures:
        assert failure.stage == "validate" and (failure.row == 0 or not added_valid)
        assert (failure.field, failure.reason) in {(f.field, f.reason) for f in first}, failure
        assert failure.field in {"prompt", *values}, failure
        assert failure.reason and len(failure.reason) <= 400
        assert "pydantic" not in failure.reason and "Traceback" not in failure.reason
    for request in manifest.requests.to_pylist():
        assert request["prompt"].strip() and len(request["prompt"]) <= 4000
        for side in (request["width"], request["height"]):
            assert side is None or (side % 16 == 0 and 64 <= side <= 1024)
        assert request["steps"] is None or 1 <= request["steps"] <= 200
        assert request["guidance"] is None or 0 <= request["guidance"] <= 30
        assert request["seed"] is None or 0 <= request["seed"] < 2**64
        assert 1 <= request["num_images"] <= 64


@given(request_id=st.text(min_size=1, max_size=300), variant=st.integers(min_value=0, max_value=63))
def test_any_request_id_gives_a_key_that_is_a_plain_file_name(request_id, variant):
    key = image_key(request_id, variant)
    assert re.fullmatch(r"[0-9a-f]{32}", key)
