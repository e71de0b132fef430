"""Nothing silent: a run that exits 0 has every committed image on disk as its row records, and a refusal leaves
OUTPUT byte-identical. Driver behaviour, so the renders use the stand-in renderer (tests/stand_in.py), never torch.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import render
from pipeline.cluster.resources import ClusterTooSmallError
from pipeline.plan import MixedFormatsError
from pipeline.store.changed_rows import ChangedRowsError
from pipeline.store.verify import verify_output
from schemas import JobSpec
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, make_job, metadata, session_cluster_env
from tests.own_ray import REPO
from tests.stand_in import stand_in

ROWS = [{"id": name, "prompt": f"a {name}", "width": 64, "height": 64, "steps": 2}
        for name in ("apple", "boat", "cloud", "drum")]
EDITED = [ROWS[0], {**ROWS[1], "prompt": "a blue boat at dawn"}, {**ROWS[2], "steps": 3},
          {**ROWS[3], "output_format": "jpeg"}]


def run(manifest: Path, out: Path, model: Path, **options):
    return render(make_job(str(manifest), str(out), str(model)), progress=False, renderer_class=stand_in(), **options)


def tree(out: Path) -> dict[str, str]:
    """Every file under `out` (and every folder, as None), by path: what "byte-identical" compares."""
    if not out.exists():
        return {}
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(out.rglob("*"))}


def assert_clean(out: Path) -> None:
    result = verify_output(str(out))
    assert result.problems == 0, result.report()
    assert_images_match_metadata(str(out))


def success(out: Path) -> dict:
    return json.loads((out / "_SUCCESS").read_text())


# -- a changed row never overwrites a committed image ----------------------------------------------------


@pytest.mark.parametrize("point", ["render", "commit", "settle", "retire", "rows"])
def test_a_rerender_changed_run_killed_at_any_point_leaves_every_row_matching_its_image_and_the_next_run_clean(
        point, tmp_path, tiny_model, ray_cluster):
    first = write_manifest(tmp_path / "first.parquet", ROWS)
    edited = write_manifest(tmp_path / "edited.parquet", EDITED)
    out = tmp_path / "out"
    run(first, out, tiny_model)
    original = {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()}

    killed = subprocess.run([sys.executable, "-m", "tests.stand_in_cli", "--kill-at", point, "render", str(edited),
                             str(out), "--model", str(tiny_model), "--rerender-changed", "--commit-seconds", "0",
                             "--no-progress"], cwd=REPO, env=session_cluster_env(ray_cluster),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, f"not killed at {point}: {killed.returncode}\n{killed.stderr[-3000:]}"
    # Whatever the moment, each key's row names an image that is the one it records (old or new).
    for row in metadata(str(out)).to_pylist():
        data = Path(row["image_uri"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], (point, row["request_id"])

    # The operator runs the same command again: it finishes the job, and exit 0 means every image is right.
    again = run(edited, out, tiny_model, rerender_changed=True)
    assert again.succeeded and success(out)["complete"]
    assert_clean(out)
    now = {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()}
    assert now["apple"] == original["apple"] and all(now[i] != original[i] for i in ("boat", "cloud", "drum"))


def test_a_changed_row_renders_to_a_path_of_its_own_and_the_old_image_goes_once_the_new_row_commits(
        tmp_path, tiny_model, ray_cluster):
    first = write_manifest(tmp_path / "first.parquet", ROWS)
    edited = write_manifest(tmp_path / "edited.parquet", EDITED)
    out = tmp_path / "out"
    run(first, out, tiny_model)
    before = {r["request_id"]: r["image_uri"] for r in metadata(str(out)).to_pylist()}
    original = {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()}

    summary = run(edited, out, tiny_model, rerender_changed=True)

    after = {r["request_id"]: r["image_uri"] for r in metadata(str(out)).to_pylist()}
    assert summary.images_rendered == 3 and after["apple"] == before["apple"]
    for request_id in ("boat", "cloud", "drum"):
        assert after[request_id] != before[request_id]
        assert summary.run_id in Path(after[request_id]).name  # <key>.<run id>.<ext>
        assert not Path(before[request_id]).exists()
    assert_clean(out)
    # And back: the original rows render the original images again, to paths of their own.
    back = run(first, out, tiny_model, rerender_changed=True)
    assert back.succeeded and back.images_rendered == 3
    assert_clean(out)
    assert {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()} == original


# -- every run ends by checking the committed images -------------------------------------------------------


def test_deleted_and_altered_images_are_rendered_again_by_the_next_run(tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    run(manifest, out, tiny_model)
    rows = {r["request_id"]: r for r in metadata(str(out)).to_pylist()}
    Path(rows["apple"]["image_uri"]).unlink()  # a lifecycle rule, a user, a failed sync
    Path(rows["boat"]["image_uri"]).write_bytes(b"edited by hand")

    summary = run(manifest, out, tiny_model)

    assert summary.images_rendered == 2 and summary.images_already_done == 2
    assert summary.succeeded and success(out)["complete"]
    assert_clean(out)
    assert {r["request_id"]: r["sha256"] for r in metadata(str(out)).to_pylist()} == \
        {i: r["sha256"] for i, r in rows.items()}  # the same renders as before
    # The hand-edited file is not deleted: it is moved aside, under this run's id.
    aside = list((out / "_quarantine" / summary.run_id).rglob("*.png"))
    assert [p.read_bytes() for p in aside] == [b"edited by hand"]


def test_a_committed_image_missing_whose_row_left_the_manifest_makes_the_run_exit_non_zero_naming_it(
        tmp_path, tiny_model, ray_cluster, capsys):
    out = tmp_path / "out"
    run(write_manifest(tmp_path / "m.parquet", ROWS), out, tiny_model)
    gone = {r["request_id"]: r for r in metadata(str(out)).to_pylist()}["drum"]
    Path(gone["image_uri"]).unlink()

    summary = run(write_manifest(tmp_path / "fewer.parquet", ROWS[:3]), out, tiny_model)

    assert summary.images_missing == 1 and not summary.complete and not summary.succeeded  # exit 1
    assert summary.images_total_done == 3  # the manifest's three are there; the missing one is not its
    assert success(out)["complete"] is False
    record = json.loads((out / "summary.json").read_text())  # the first run's said "complete": rewritten
    assert record["images_missing"] == 1 and record["complete"] is False
    assert list(record["failures_by_reason"]) == ["committed image missing"]
    report = (out / "report.html").read_text()
    assert "<p class='outcome bad'><b>exit 1: 1 committed images are missing or altered" in report
    rows = failures(str(out)).to_pylist()
    assert [(r["stage"], r["key"]) for r in rows] == [("check", gone["key"])]
    assert gone["image_uri"] in rows[0]["reason"]


def test_an_image_a_killed_run_never_committed_is_retired_by_the_next_run(tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    run(manifest, out, tiny_model)
    key = metadata(str(out)).column("key")[0].as_py()
    orphan = out / "images" / key[:2] / f"{key}.20260101T000000-abcdef.png"
    orphan.write_bytes(b"never committed")
    user_file = out / "images" / key[:2] / "notes.txt"  # not a name fluxbatch writes: never touched
    user_file.write_text("mine")

    summary = run(manifest, out, tiny_model)

    assert summary.succeeded and not orphan.exists() and user_file.read_text() == "mine"
    assert verify_output(str(out)).problems == 0


# -- a refusal changes nothing -------------------------------------------------------------------------------


def test_a_refusal_of_changed_rows_leaves_output_byte_identical_success_file_included(tmp_path, tiny_model,
                                                                                        ray_cluster):
    out = tmp_path / "out"
    run(write_manifest(tmp_path / "m.parquet", ROWS), out, tiny_model)
    bad_and_edited = [*EDITED, {"id": "bad", "prompt": "", "width": 64, "height": 64}]  # a bad row too
    before = tree(out)
    assert "_SUCCESS" in before

    with pytest.raises(ChangedRowsError):
        run(write_manifest(tmp_path / "edited.parquet", bad_and_edited), out, tiny_model)

    assert tree(out) == before


def test_a_job_refused_for_gpus_leaves_no_output_folder(tmp_path, tiny_model, ray_cluster, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "deep" / "out"
    job = make_job(str(write_manifest(tmp_path / "m.parquet", ROWS)), str(out), str(tiny_model), gpus_per_replica=8)

    with pytest.raises(ClusterTooSmallError):
        render(job, progress=False, renderer_class=stand_in())

    assert not (tmp_path / "deep").exists()


def test_webdataset_of_mixed_formats_is_refused_in_one_line_and_output_is_left_as_it_was(
        tmp_path, tiny_model, ray_cluster):
    out = tmp_path / "out"
    job = JobSpec.model_validate({"manifest": str(write_manifest(tmp_path / "m.parquet", EDITED)),
                                  "output": {"uri": str(out), "layout": "webdataset"},
                                  "model": {"name": str(tiny_model)}})

    with pytest.raises(MixedFormatsError) as refused:
        render(job, progress=False, renderer_class=stand_in())

    message = str(refused.value)
    assert "\n" not in message and "jpeg, png" in message and "row 3" in message and "hf-parquet" in message
    assert tree(out) == {}


def test_an_edited_image_is_moved_aside_never_deleted_even_when_the_run_restoring_it_is_killed_while_settling(
        tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    run(manifest, out, tiny_model)
    edited = Path(metadata(str(out)).to_pylist()[0]["image_uri"])
    edited.write_bytes(edited.read_bytes() + b"retouched")
    retouched = edited.read_bytes()

    for point in ("retire", "rows"):  # killed before anything is retired, then between the images and the rows
        killed = subprocess.run([sys.executable, "-m", "tests.stand_in_cli", "--kill-at", point, "render",
                                 str(manifest), str(out), "--model", str(tiny_model), "--no-progress"], cwd=REPO,
                                env=session_cluster_env(ray_cluster), capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-3000:]
    summary = run(manifest, out, tiny_model)

    assert summary.succeeded
    assert_clean(out)
    aside = [p.read_bytes() for p in (out / "_quarantine").rglob("*.png")]
    assert aside == [retouched]


def test_a_copied_output_whose_rows_name_the_old_folder_packs_reports_and_restores_from_its_own_images(
        tmp_path, tiny_model, ray_cluster):
    import shutil

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    first, copy = tmp_path / "first", tmp_path / "copy"
    job = JobSpec.model_validate({"manifest": str(manifest), "model": {"name": str(tiny_model)},
                                  "output": {"uri": str(first), "layout": "webdataset"}})
    render(job, progress=False, renderer_class=stand_in())
    shutil.copytree(first, copy)
    shutil.move(first, tmp_path / "elsewhere")  # the rows name images that are no longer there
    Path(str(metadata(str(copy)).to_pylist()[0]["image_uri"]).replace(str(first), str(copy))).unlink()
    for shard in (copy / "webdataset").glob("*.tar"):
        shard.unlink()  # packing reads every image again

    summary = render(job.model_copy(update={"output": job.output.model_copy(update={"uri": str(copy)})}),
                     progress=False, renderer_class=stand_in())

    assert summary.succeeded and summary.images_rendered == 1
    assert verify_output(str(copy)).problems == 0
    assert "no preview" not in (copy / "report.html").read_text()
    assert len(list((copy / "webdataset").glob("*.tar"))) == 1


def test_a_refused_run_of_a_version_folder_leaves_outputs_lease_as_it_found_it(tmp_path, tiny_model, ray_cluster):
    import time

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    run(manifest, out, tiny_model)
    second = make_job(str(manifest), str(out), str(tiny_model), defaults={"steps": 3})
    render(second, new_version=True, progress=False, renderer_class=stand_in())
    now = time.time()  # a driver on another machine, killed long ago: its lease is stale, so runs take it over
    (out / "_lease.json").write_text(json.dumps(
        {"host": "gone", "pid": 1, "run_id": "20261201T080000-c0ffee", "machine": "other", "started_at": now - 900,
         "renewed_at": now - 600, "expires_after": 60.0}))
    before = tree(out)

    with pytest.raises(ChangedRowsError):
        render(second.model_copy(update={"manifest": str(write_manifest(tmp_path / "e.parquet", EDITED))}),
               progress=False, renderer_class=stand_in())

    assert tree(out) == before


def test_a_job_that_wrote_into_output_puts_its_file_back_only_when_the_render_was_refused(tmp_path):
    from flux_worker.storage import filesystem
    from jobs.refusal import restored_on_refusal
    from schemas.errors import FluxbatchError

    fs, root = filesystem(str(tmp_path))
    (tmp_path / "manifest.parquet").write_bytes(b"the previous manifest")
    for refused, kept in ((True, b"the previous manifest"), (False, b"the new manifest")):
        error = FluxbatchError("stopped")
        error.refused = refused
        with pytest.raises(FluxbatchError), restored_on_refusal(fs, root, ["manifest.parquet"]):
            (tmp_path / "manifest.parquet").write_bytes(b"the new manifest")
            raise error
        assert (tmp_path / "manifest.parquet").read_bytes() == kept
        (tmp_path / "manifest.parquet").write_bytes(b"the previous manifest")
