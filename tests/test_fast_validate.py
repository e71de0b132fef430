"""The column checks flag every row pydantic would refuse, and normalize the rows they pass as pydantic does, so
what a manifest yields does not depend on which of the two looked at a row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from flux_worker.presets import ModelPreset
from pipeline.fast_validate import check_file
from pipeline.manifest import read_manifest
from pipeline.plan import plan_images
from schemas import REQUEST_SCHEMA, JobSpec, ModelLimits, RenderRequest, request_id
from schemas.request import WHITESPACE

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


def pydantic_outcome(rows: list[dict]) -> tuple[set[int], list[dict]]:
    """The rows pydantic (and the job's model) refuses, and the others as normalized REQUEST_SCHEMA rows."""
    refused, valid = set(), []
    for index, row in enumerate(rows):
        values = {k: v for k, v in {**GOOD, **row}.items() if k != "shop"}
        try:
            request = RenderRequest.model_validate(values, context={"limits": LIMITS})
        except ValidationError:
            refused.add(index)
            continue
        if request.model not in (None, "job-model"):
            refused.add(index)
            continue
        dumped = request.model_dump(mode="json")
        valid.append({"request_id": request_id(dumped), **dumped, "source": "m", "row": index, "shop": "north"})
    return refused, valid


def test_column_checks_flag_every_row_pydantic_refuses_and_normalize_the_rest_as_pydantic_does(tmp_path):
    table = pq.read_table(write(tmp_path / "m.parquet", ROWS))
    refused, normalized = pydantic_outcome(ROWS)

    checked = check_file(table, "m", LIMITS, "job-model", ["shop"])

    assert refused == set(checked.flagged.tolist()) == set(range(4, len(ROWS) - 2))
    # The good rows pass, and the last two, repeats of rows 0 and 1 that the manifest refuses afterwards.
    assert checked.valid.to_pylist() == normalized
    assert [row["row"] for row in normalized] == [0, 1, 2, 3, len(ROWS) - 2, len(ROWS) - 1]


def test_manifest_refuses_each_bad_row_with_pydantics_words_and_keeps_the_rest(tmp_path):
    got = []
    manifest = read_manifest(write(tmp_path / "m.parquet", ROWS), limits=LIMITS, model_name="job-model",
                             sink=got.append)

    refused = {f.row for f in got}
    assert refused == set(range(4, len(ROWS))), "every bad row, and only those, is refused"
    assert manifest.requests.column("row").to_pylist() == [0, 1, 2, 3]
    assert manifest.requests.schema == pa.schema(list(REQUEST_SCHEMA) + [pa.field("shop", pa.string())])
    for failure in got:
        if failure.reason.startswith("duplicate"):
            continue
        values = {k: v for k, v in {**GOOD, **ROWS[failure.row]}.items() if k != "shop"}
        if failure.reason.endswith("split the manifest per model"):
            continue
        with pytest.raises(ValidationError) as caught:
            RenderRequest.model_validate(values, context={"limits": LIMITS})
        assert failure.reason in str(caught.value), failure


def test_a_column_of_a_type_the_checks_do_not_cover_sends_every_row_to_pydantic(tmp_path):
    schema = SCHEMA.set(SCHEMA.get_field_index("width"), pa.field("width", pa.string()))
    rows = [{**row, "width": None if row.get("width") is None else str(row["width"])} for row in ROWS]
    url = write(tmp_path / "m.parquet", rows, schema)

    checked = check_file(pq.read_table(url), url, LIMITS, "job-model", ["shop"])
    got = []
    manifest = read_manifest(url, limits=LIMITS, model_name="job-model", sink=got.append)

    assert checked.valid.num_rows == 0 and checked.flagged.tolist() == list(range(len(rows)))
    assert {f.row for f in got} == {1} | set(range(4, len(ROWS))), "row 1's width is now text"
    assert {f.reason for f in got if f.field == "width"} == {"width must be an integer, got str"}
    assert manifest.requests.column("row").to_pylist() == [0, 2, 3]


def test_rows_passed_by_the_columns_or_by_pydantic_plan_the_same_images(tmp_path):
    (tmp_path / "columns").mkdir()
    (tmp_path / "pydantic").mkdir()
    by_columns = read_manifest(write(tmp_path / "columns" / "m.parquet", ROWS), limits=LIMITS,
                               model_name="job-model")
    # A dictionary-encoded prompt is a type the column checks do not cover: every row meets pydantic.
    table = pq.read_table(tmp_path / "columns" / "m.parquet")
    table = table.set_column(table.column_names.index("prompt"), "prompt", table.column("prompt").dictionary_encode())
    pq.write_table(table, tmp_path / "pydantic" / "m.parquet")
    by_pydantic = read_manifest(str(tmp_path / "pydantic" / "m.parquet"), limits=LIMITS, model_name="job-model")
    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "o"}, "model": {"name": "job-model"}})

    plans = [plan_images(m, job, PRESET, committed=None).table.drop_columns(["source"])
             for m in (by_columns, by_pydantic)]

    assert plans[0].equals(plans[1])
    assert plans[0].num_rows == 3 + 1 + 1 + 1


def test_resume_skips_done_keys(tmp_path):
    manifest = read_manifest(write(tmp_path / "m.parquet", ROWS), limits=LIMITS, model_name="job-model")
    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "o"}, "model": {"name": "job-model"}})
    first = plan_images(manifest, job, PRESET, committed=None)
    committed = first.table.slice(0, 4)  # as the ledger holds them: the same keys and render parameters
    done = set(committed.column("key").to_pylist())

    again = plan_images(manifest, job, PRESET, committed=committed)

    assert (again.expected, again.already_done, again.table.num_rows) == (6, 4, 2)
    assert not done & set(again.table.column("key").to_pylist())


def test_text_blank_to_the_validators_is_blank_to_the_column_checks():
    texts = [c * 2 for c in WHITESPACE] + [f"{c}x{c}" for c in WHITESPACE]
    rows = [{"prompt": text, "id": text, "model": text, "output_format": None} for text in texts]
    rows += [{"prompt": "p", "id": None, "model": None, "output_format": f"{c}JPG{c}"} for c in WHITESPACE]

    checked = check_file(pa.Table.from_pylist(rows), "m", LIMITS, None, [])

    refused = set()
    for index, row in enumerate(rows):
        try:
            RenderRequest.model_validate(row)
        except ValidationError:
            refused.add(index)
    assert set(range(len(WHITESPACE))) <= refused == set(checked.flagged.tolist())
    formats = checked.valid.filter(pc.greater_equal(checked.valid.column("row"), len(texts)))
    assert formats.column("output_format").to_pylist() == ["jpeg"] * len(WHITESPACE)


@pytest.mark.parametrize("row", [
    {"prompt": "p", "width": 512, "guidance": 4.0, "seed": 3, "num_images": 2, "output_format": "jpeg"},
    {"prompt": "p", "model": "m", "steps": 9, "guidance": None, "seed": None, "num_images": 1, "output_format": None},
    {"prompt": "p", "width": 512.0, "guidance": 4, "output_format": " JPG "},
])
def test_a_row_passed_by_the_columns_has_the_request_id_pydantic_gives_it(row):
    request = RenderRequest.model_validate(row, context={"limits": LIMITS})
    checked = check_file(pa.Table.from_pylist([row]), "m", LIMITS, None, [])

    assert checked.valid.column("request_id").to_pylist() == [request_id(request.model_dump(mode="json"))]


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "p"}, "h-fc2c43cf4f56e63dcafb5ec6"),
    ({"prompt": "p", "width": 512, "guidance": 4.0, "seed": 3, "num_images": 2, "output_format": "jpg"},
     "h-9746e64acd4a633fc8884059"),
    ({"prompt": "猫", "adapters": [{"name": "ink", "scale": 0.7}], "seed": 2**64 - 1}, "h-1b9dc4101040975c55192044"),
])
def test_a_row_without_an_id_keeps_the_request_id_of_earlier_versions(row, expected):
    # Images already in an OUTPUT are found by these ids; the values were computed by the code before issue 17.
    assert request_id(RenderRequest.model_validate(row).model_dump(mode="json")) == expected


# -- one verdict from both paths, at and across every rule's boundary ----------------------------------------
# The values each field takes: each rule's limits, one step inside and one outside, and the values that are
# not numbers or text at all. A rule loosened or tightened on one side only (pydantic's or the column checks')
# makes some row here get two verdicts.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from schemas.request import MAX_GUIDANCE, MAX_ID_CHARS, MAX_IMAGES_PER_ROW, MAX_PROMPT_CHARS, MAX_STEPS  # noqa: E402

SIDES = [None, LIMITS.min_side - 16, LIMITS.min_side, LIMITS.min_side + 1, LIMITS.min_side + 16,
         LIMITS.max_side - 16, LIMITS.max_side, LIMITS.max_side + 16, 0, -16, 512.0, 512.5, float("nan"),
         float("inf")]
BOUNDARIES = {
    "id": [None, "", "a", "i" * MAX_ID_CHARS, "i" * (MAX_ID_CHARS + 1), "tab\tin", "new\nline", " padded "],
    "prompt": [None, "", " ", "\u3000", "p", "p" * MAX_PROMPT_CHARS, "p" * (MAX_PROMPT_CHARS + 1), "tab\tok",
               "line\nok", "bell\x07", "del\x7f", "  spaced  "],
    "model": [None, "job-model", " job-model ", "other", " "],
    "width": SIDES,
    "height": SIDES,
    "steps": [None, 0, 1, MAX_STEPS, MAX_STEPS + 1, -1],
    "guidance": [None, 0.0, -0.0, -0.1, MAX_GUIDANCE, MAX_GUIDANCE + 0.1, float("nan"), float("inf"), 3],
    "seed": [None, 0, -1, 2**63 - 1],
    "num_images": [None, 0, 1, MAX_IMAGES_PER_ROW, MAX_IMAGES_PER_ROW + 1, -1],
    "output_format": [None, "png", "jpeg", "jpg", " JPG ", "webp", "gif", "", "PNG"],
}
BOUNDARY_ROWS = st.fixed_dictionaries({field: st.sampled_from(values) for field, values in BOUNDARIES.items()})


def test_each_rules_boundary_alone_gets_one_verdict_from_both_paths(tmp_path):
    # One row per (field, value), the other fields good: a rule moved on one side only is caught by its own row.
    rows = [{"id": f"{field}-{index}", **({field: value} if field != "id" else {"id": value})}
            for field, values in BOUNDARIES.items() for index, value in enumerate(values)]
    refused, normalized = pydantic_outcome(rows)

    checked = check_file(pq.read_table(write(tmp_path / "m.parquet", rows)), "m", LIMITS, "job-model", ["shop"])

    flagged = set(checked.flagged.tolist())
    assert flagged == refused, [rows[i] for i in refused ^ flagged]
    assert checked.valid.to_pylist() == normalized


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(BOUNDARY_ROWS, min_size=1, max_size=12))
def test_rows_at_and_across_every_rules_boundary_get_one_verdict_from_both_paths(rows, tmp_path):
    rows = [{**row, "id": f"{row['id']}-{index}" if row["id"] else row["id"]} for index, row in enumerate(rows)]
    refused, normalized = pydantic_outcome(rows)

    checked = check_file(pq.read_table(write(tmp_path / "m.parquet", rows)), "m", LIMITS, "job-model", ["shop"])

    # Every row pydantic refuses is flagged (pydantic then writes its message), and the rows the columns pass are
    # the rows pydantic passes, normalized alike. Flagged rows pydantic accepts are fine: pydantic has the last word.
    assert refused <= set(checked.flagged.tolist())
    passed = {row["row"]: row for row in checked.valid.to_pylist()}
    assert {row["row"]: row for row in normalized if row["row"] in passed} == passed
    assert set(passed) | set(checked.flagged.tolist()) == set(range(len(rows)))
