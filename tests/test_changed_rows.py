"""A row edited under the same id after its image was committed: refused by default, re-rendered on request.

One output serves the whole module: a first run; the same manifest with one row's prompt, another's steps and a
third's format edited, run through `fluxbatch render` (refused); the same with `--rerender-changed` in-process
(re-rendered); and once more unchanged (nothing to do). The tests below only read what those runs left.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import render
from pipeline.store.changed_rows import RENDER_FIELDS, compare
from schemas.records import ADAPTERS_TYPE
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, error_lines, make_job, metadata, session_cluster_env
from tests.own_ray import REPO

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter

ROWS = [
    {"id": "apple", "prompt": "a green apple", "width": 64, "height": 64, "steps": 2},
    {"id": "boat", "prompt": "a red boat", "width": 64, "height": 64, "steps": 2},
    {"id": "cloud", "prompt": "a white cloud", "width": 64, "height": 64, "steps": 2},
    {"id": "drum", "prompt": "a small drum", "width": 64, "height": 64, "steps": 2},
]
EDITED = [ROWS[0], {**ROWS[1], "prompt": "a blue boat at dawn"}, {**ROWS[2], "steps": 3},
          {**ROWS[3], "output_format": "jpeg"}]


def files_under(out: Path) -> dict[str, str]:
    """sha256 of every file under the images, metadata and failures folders, by path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("images", "metadata", "failures") for p in sorted((out / folder).rglob("*"))
            if p.is_file()}


def sha_by_id(out: Path) -> dict[str, str]:
    return {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, ray_cluster, stand_in_renderer):
    """(output, first run's sha256 by id, files before the refused run, the refused run, files after it,
    the --rerender-changed run's summary, the unchanged re-run's summary)."""
    folder = tmp_path_factory.mktemp("changed-rows")
    out = folder / "out"
    first = write_manifest(folder / "first.parquet", ROWS)
    render(make_job(str(first), str(out), str(tiny_model)), progress=False)
    first_sha = sha_by_id(out)
    edited = write_manifest(folder / "edited.parquet", EDITED)

    before = files_under(out)
    refused = subprocess.run(
        [sys.executable, "-m", "tests.stand_in_cli", "render", str(edited), str(out), "--model", str(tiny_model),
         "--no-progress"], cwd=REPO, env=session_cluster_env(ray_cluster), capture_output=True, text=True,
        timeout=600)
    after = files_under(out)

    job = make_job(str(edited), str(out), str(tiny_model))
    rerendered = render(job, rerender_changed=True, progress=False)
    unchanged = render(job, progress=False)
    return out, first_sha, before, refused, after, rerendered, unchanged


def test_rerun_with_edited_rows_is_refused_in_one_line_naming_each_row_and_the_flag(runs):
    out, _, before, refused, after, _, _ = runs
    assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
    lines = error_lines(refused.stderr)  # one line, after the run's phase lines
    assert len(lines) == 1, refused.stderr
    line = lines[0]
    assert "3 rows changed" in line
    assert "row 1 (id 'boat'): prompt" in line and "row 2 (id 'cloud'): steps" in line
    assert "row 3 (id 'drum'): output_format" in line
    assert "edited.parquet" in line and "--rerender-changed" in line
    assert after == before, "the refused run wrote or rendered something"


def test_rerender_changed_renders_exactly_the_edited_rows_again(runs):
    out, first_sha, _, _, _, rerendered, _ = runs
    assert (rerendered.images_expected, rerendered.images_already_done, rerendered.images_rendered,
            rerendered.images_failed) == (4, 1, 3, 0)
    now = sha_by_id(out)
    assert {i for i in now if now[i] != first_sha[i]} == {"boat", "cloud", "drum"}


def test_the_new_ledger_row_supersedes_the_old_one_and_each_key_is_once_on_disk(runs):
    out, *_ = runs
    table = assert_images_match_metadata(str(out))
    by_id = {r["request_id"]: r for r in table.to_pylist()}
    assert (by_id["boat"]["prompt"], by_id["cloud"]["steps"]) == ("a blue boat at dawn", 3)
    # The format changed the image's path: the new file is there, the old one is gone.
    assert by_id["drum"]["image_uri"].endswith(".jpg")
    assert [p.suffix for p in (out / "images").rglob(f"{by_id['drum']['key']}.*")] == [".jpg"]
    # Read every part as it is on disk, without the reader's one-row-per-key: the old rows are gone.
    on_disk = pa.concat_tables(pq.read_table(p, columns=["key"]) for p in sorted((out / "metadata").glob("*.parquet")))
    keys = on_disk.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 4


def test_an_unchanged_rerun_renders_nothing(runs):
    *_, unchanged = runs
    assert (unchanged.images_already_done, unchanged.images_rendered) == (4, 0)


def test_each_render_parameter_is_compared_and_no_adapters_equals_an_empty_list():
    adapters = [[{"name": "style", "scale": 0.8}]] * 2
    committed = pa.table({"key": ["a", "b", "c", "d", "e", "f", "g"], "prompt": ["p"] * 7, "width": [64] * 7,
                          "height": [64] * 7, "steps": [2] * 7, "guidance": [3.5] * 7, "seed": pa.array([7] * 7,
                          pa.uint64()), "max_sequence_length": [256] * 7, "adapters": pa.array(
                          adapters + [None, [], [{"name": "style", "scale": 0.8}], None, None], ADAPTERS_TYPE),
                          "output_format": ["png"] * 7, "candidates": pa.array([None] * 7, pa.int32())})
    edits = {"a": {}, "b": {"adapters": [{"name": "style", "scale": 0.9}]}, "c": {"adapters": []},
             "d": {"adapters": None}, "e": {"adapters": [], "candidates": 4}, "f": {"seed": 8, "output_format": "jpeg"},
             "g": {"guidance": 3.25}}
    rows = committed.to_pylist()
    planned = pa.Table.from_pylist([{**row, **edits[row["key"]]} for row in rows] + [{**rows[0], "key": "new"}],
                                   schema=committed.schema)

    index, fields = compare(planned, committed)

    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    named = [[f for i, f in enumerate(RENDER_FIELDS) if mask >> i & 1] for mask in fields.tolist()]
    assert named == [[], ["adapters"], [], [], ["adapters", "candidates"], ["seed", "output_format"], ["guidance"],
                     []]
