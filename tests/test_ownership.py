"""fluxbatch touches only what it wrote, and never reads an OUTPUT as a manifest (issue 14).

Temp files have one exact name and are swept only in fluxbatch's own folders; an OUTPUT holding someone
else's files is refused unless the user says so; a folder manifest skips every OUTPUT under it and a glob that
would read one is refused; a full disk stops the run with one line and leaves no temp file behind.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from flux_worker.storage import NoSpaceLeftError, filesystem
from jobs.cli import main
from pipeline import render
from pipeline.manifest import ManifestError, list_manifest_files
from pipeline.store.ownership import ForeignOutputError, remove_partial_files
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, make_job, metadata, session_cluster_env

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter

ROWS = [{"id": f"r{i}", "prompt": f"a lamp number {i}", "width": 64, "height": 64} for i in range(3)]
# Names a user may well keep; the old sweep deleted any name holding ".tmp-" anywhere under OUTPUT.
USER_FILES = {
    "Documents/thesis.tmp-final.docx": b"my thesis, final version",
    "backup.tmp-2024.tar": b"a backup",
    "Documents/drafts/notes.tmp-1234-deadbeef": b"looks like an old temp name, is not ours",
    "data.csv.fluxbatch-tmp-42-deadbeef": b"our temp pattern, but not a name fluxbatch writes at the top",
}


def tree_digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".fluxbatch-tmp-" in p.name]


def put_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


# -- temp files ----------------------------------------------------------------------------------------


def test_a_failing_write_leaves_no_temp_file_and_raises(tmp_path):
    fs, root = filesystem(str(tmp_path))
    with pytest.raises(TypeError):
        fs.write_bytes(f"{root}/images/ab/x.png", "text, not bytes")  # fails inside the open temp file
    assert not (tmp_path / "images" / "ab" / "x.png").exists()
    assert list((tmp_path / "images" / "ab").iterdir()) == []


def test_partial_file_sweep_removes_only_fluxbatch_temp_names_in_its_own_folders(tmp_path):
    put_user_files(tmp_path)
    ours = ["images/ab/abcd.png.fluxbatch-tmp-77-0badf00d", "metadata/part-1.parquet.fluxbatch-tmp-77-12345678",
            "failures/part-1.parquet.fluxbatch-tmp-8-abcdef01", "runs/r1/summary.json.fluxbatch-tmp-9-00000000",
            "summary.json.fluxbatch-tmp-77-ffffffff", "_job.json.fluxbatch-tmp-7-00000001",
            "_write-test.fluxbatch-tmp-7-00000002"]
    kept = [*USER_FILES,
            "images/ab/abcd.png.tmp-77-0badf00d",  # not our pattern, even in our folder
            "images/ab/abcd.png.fluxbatch-tmp-77-0badf00d.bak",  # pattern not at the end
            "Documents/x.png.fluxbatch-tmp-77-0badf00d",  # our pattern, but not our folder
            "_versions/2/images/ab/abcd.png.fluxbatch-tmp-77-0badf00d"]  # another version's run sweeps its own
    for name in ours + kept[len(USER_FILES):]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    fs, root = filesystem(str(tmp_path))

    assert remove_partial_files(fs, root) == len(ours)

    assert [name for name in ours if (tmp_path / name).exists()] == []
    assert [name for name in kept if not (tmp_path / name).exists()] == []
    assert remove_partial_files(fs, f"{root}/_versions/2") == 1


def test_user_files_with_tmp_in_their_names_survive_a_rerun(tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    job = make_job(str(manifest), str(out), str(tiny_model))
    render(job, progress=False)
    put_user_files(out)
    before = tree_digests(out, list(USER_FILES))
    key = metadata(str(out)).column("key")[0].as_py()
    leftover = out / "images" / key[:2] / f"{key}.png.fluxbatch-tmp-4242-0badf00d"  # a killed writer's
    leftover.write_bytes(b"half an image")

    summary = render(job, progress=False)

    assert summary.images_already_done == 3
    assert tree_digests(out, list(USER_FILES)) == before
    assert not leftover.exists()


# -- an OUTPUT that holds someone else's files -----------------------------------------------------------


def test_non_empty_foreign_output_is_refused_in_one_line_without_the_flag(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "home"
    put_user_files(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    with pytest.raises(ForeignOutputError, match="--allow-non-empty-output"):
        render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)
    code = main(["render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(out) in err and "_job.json" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written, not even _job.json


def test_non_empty_foreign_output_with_the_flag_renders_and_leaves_the_foreign_files_byte_identical(
        tmp_path, tiny_model, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "home"
    put_user_files(out)
    before = tree_digests(out, list(USER_FILES))
    job = make_job(str(manifest), str(out), str(tiny_model))

    first = render(job, allow_non_empty_output=True, progress=False)
    second = render(job, progress=False)  # now OUTPUT has fluxbatch's _job.json: no flag needed

    assert (first.images_rendered, second.images_already_done) == (3, 3)
    assert_images_match_metadata(str(out))
    assert tree_digests(out, list(USER_FILES)) == before


def test_a_folder_holding_only_a_user_file_named_like_a_temp_file_is_refused_and_the_file_kept(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "home"
    out.mkdir()
    (out / "data.csv.fluxbatch-tmp-42-deadbeef").write_bytes(b"the user's data")

    with pytest.raises(ForeignOutputError, match="data.csv.fluxbatch-tmp-42-deadbeef"):
        render(make_job(str(manifest), str(out), str(tiny_model)), progress=False)

    assert [p.name for p in out.iterdir()] == ["data.csv.fluxbatch-tmp-42-deadbeef"]


def test_foreign_output_holding_a_folder_fluxbatch_writes_is_refused_even_with_the_flag(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "home"
    write_manifest(out / "metadata" / "mine.parquet", [{"prompt": "not a ledger"}])

    with pytest.raises(ForeignOutputError, match="metadata"):
        render(make_job(str(manifest), str(out), str(tiny_model)), allow_non_empty_output=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["metadata"]


def test_s3_prefix_holding_objects_without_a_job_file_is_refused(s3_env, bucket, tmp_path, tiny_model):
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="renders/report.pdf", Body=b"someone's report")
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)

    with pytest.raises(ForeignOutputError, match=f"s3://{bucket}/renders"):
        render(make_job(str(manifest), f"s3://{bucket}/renders", str(tiny_model)), progress=False)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["renders/report.pdf"]


def test_s3_prefix_emptied_by_another_driver_between_two_requests_is_not_called_a_file(s3_env, bucket):
    """CI saw it: two drivers started together; one's write-test object made the prefix exist, it was deleted
    before the other asked whether the prefix is a folder, and the other was told OUTPUT is a file."""
    import boto3

    from pipeline.store.ownership import refuse_foreign_output

    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="out/_write-test.fluxbatch-tmp-17465-73033a3b", Body=b"")
    fs, root = filesystem(f"s3://{bucket}/out")

    def then_the_other_driver_deletes_its_object(ask):
        def asked(path):
            found = ask(path)
            if path == root:  # after our first question about the prefix itself
                s3.delete_object(Bucket=bucket, Key="out/_write-test.fluxbatch-tmp-17465-73033a3b")
                fs.fs.invalidate_cache()
            return found
        return asked

    for name in ("exists", "isfile", "isdir"):
        setattr(fs, name, then_the_other_driver_deletes_its_object(getattr(fs, name)))
    refuse_foreign_output(fs, root)  # an empty prefix: nothing to refuse

    s3.put_object(Bucket=bucket, Key="out", Body=b"a real object named like the prefix")
    with pytest.raises(ForeignOutputError, match="is a file, not a folder"):
        refuse_foreign_output(*filesystem(f"s3://{bucket}/out"))


def test_output_another_driver_starts_writing_between_two_requests_is_left_to_the_lease(tmp_path):
    """The other order of the same race: our `_job.json` question came just before the winning driver wrote
    it, our listing just after. The folder is fluxbatch's; the lease, not a "not empty" refusal, decides."""
    from pipeline.store.ownership import refuse_foreign_output

    out = tmp_path / "out"
    fs, root = filesystem(str(out))
    asked = fs.exists

    def absent_then_the_other_driver_writes(path):
        found = asked(path)
        if path.endswith("/_job.json"):
            (out / "images" / "2b").mkdir(parents=True)
            for name in ("_lease.json", "_job.json", "images/2b/2b70.png"):
                (out / name).write_bytes(b"{}")
        return found

    fs.exists = absent_then_the_other_driver_writes
    refuse_foreign_output(fs, root)


# -- manifest discovery never reads an OUTPUT ------------------------------------------------------------


def test_output_inside_the_manifest_folder_run_twice_renders_nothing_new(tmp_path, tiny_model, ray_cluster):
    prompts = tmp_path / "prompts"
    write_manifest(prompts / "m.parquet", ROWS)
    job = make_job(str(prompts), str(prompts / "out"), str(tiny_model))

    first = render(job, progress=False)
    second = render(job, progress=False)

    assert (first.manifest_files, first.images_rendered) == (1, 3)
    assert (second.manifest_files, second.manifest_rows, second.images_rendered) == (1, 3, 0)
    assert metadata(str(prompts / "out")).num_rows == 3


def test_folder_manifest_skips_every_output_under_it_and_this_jobs_output_before_it_has_a_job_file(tmp_path):
    prompts = tmp_path / "prompts"
    write_manifest(prompts / "a.parquet", ROWS)
    write_manifest(prompts / "more" / "b.parquet", ROWS)
    write_manifest(prompts / "old-run" / "metadata" / "part-1.parquet", ROWS)
    (prompts / "old-run" / "_job.json").write_text("{}")
    write_manifest(prompts / "new-run" / "failures" / "part-1.parquet", ROWS)  # no _job.json yet

    found = list_manifest_files(str(prompts), output=str(prompts / "new-run"))

    assert found == [str(prompts / "a.parquet"), str(prompts / "more" / "b.parquet")]


def test_a_manifest_glob_that_matches_files_inside_an_output_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "prompts"
    write_manifest(prompts / "a.parquet", ROWS)
    write_manifest(prompts / "out" / "metadata" / "part-1.parquet", ROWS)
    (prompts / "out" / "_job.json").write_text("{}")
    glob = f"{prompts}/**/*.parquet"

    with pytest.raises(ManifestError, match="inside the fluxbatch OUTPUT"):
        list_manifest_files(glob)
    with pytest.raises(ManifestError, match="inside the fluxbatch OUTPUT"):  # this job's, before its _job.json
        list_manifest_files(f"{prompts}/*.parquet", output=str(prompts))
    code = main(["validate", glob, "--model", str(tiny_model)])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(prompts / "out") in err
    assert list_manifest_files(f"{prompts}/*.parquet") == [str(prompts / "a.parquet")]


# -- disk full -------------------------------------------------------------------------------------------


def test_a_write_on_a_full_disk_raises_no_space_left_naming_the_path_and_leaves_no_temp_file(small_disk):
    fs, root = filesystem(str(small_disk))
    with pytest.raises(NoSpaceLeftError, match=f"no space left on device writing {small_disk}/images/ab/x.png"):
        fs.write_bytes(f"{root}/images/ab/x.png", b"\0" * 400_000)
    assert temp_files(small_disk) == [] and not (small_disk / "images" / "ab" / "x.png").exists()


@pytest.mark.slow
def test_disk_full_stops_the_run_with_one_line_no_temp_files_and_keeps_what_was_committed(
        tmp_path, tiny_model, ray_cluster, small_disk):
    rows = [{"id": f"n{i}", "prompt": f"noise {i}", "width": 64, "height": 64} for i in range(30)]
    out = small_disk / "out"
    render(make_job(str(write_manifest(tmp_path / "first.parquet", rows[:3])), str(out), str(tiny_model)),
           progress=False)
    committed = {row["key"]: row["sha256"] for row in metadata(str(out)).to_pylist()}
    command = [sys.executable, "-m", "tests.stand_in_cli", "render",
               str(write_manifest(tmp_path / "all.parquet", rows)), str(out), "--model", str(tiny_model),
               "--no-progress"]
    env = {**session_cluster_env(ray_cluster), "FLUXBATCH_WORKER_LOGS": "0"}

    full = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 1, full.stderr[-3000:]
    assert len(errors) == 1 and "no space left on device writing" in errors[0], full.stderr[-3000:]
    assert str(out) in errors[0] and "Traceback" not in full.stderr
    assert temp_files(small_disk) == []
    kept = {row["key"]: row for row in metadata(str(out)).to_pylist()}
    assert committed.items() <= {key: row["sha256"] for key, row in kept.items()}.items()
    for row in kept.values():  # committed images stay, whole
        assert hashlib.sha256(Path(row["image_uri"]).read_bytes()).hexdigest() == row["sha256"]

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(kept)} already done" in again.stdout
    assert assert_images_match_metadata(str(out)).num_rows == 30
    assert temp_files(small_disk) == []
