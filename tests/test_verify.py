"""`fluxbatch verify OUTPUT [--repair]`, and the run's own check that every metadata part is readable.

One OUTPUT is rendered once per module (six images in several metadata parts, one bad row so a failure part
exists); each test damages its own copy of it as an operator or a crash would, and checks what the user sees.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_worker.storage import filesystem
from pipeline import render
from tests.conftest import write_manifest
from tests.helpers import make_job
from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("ray_cluster", "stand_in_renderer")

ROWS = [{"id": f"r{i}", "prompt": f"a lamp number {i}", "width": 64, "height": 64, "steps": 2} for i in range(6)]
BAD_ROW = {"id": "bad", "prompt": "odd width", "width": 70, "height": 64, "steps": 2}


def _foreign_parquet(_: bytes) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "score": [0.5]}), sink)
    return sink.getvalue()


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not Parquet": lambda data: b"key,image_uri\nabc,/tmp/x.png\n",
    "foreign Parquet without key": _foreign_parquet,
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_model, ray_cluster, stand_in_renderer) -> Path:
    """A finished run: six images committed in several parts (`commit_seconds=0`), a failure part for the bad row."""
    folder = tmp_path_factory.mktemp("verify")
    manifest = write_manifest(folder / "m.parquet", ROWS + [BAD_ROW])
    job = make_job(str(manifest), str(folder / "out"), str(tiny_model), batch_size=2, commit_seconds=0)
    summary = render(job, progress=False)
    assert (summary.images_rendered, summary.invalid_rows) == (6, 1)
    assert len(list((folder / "out" / "metadata").glob("*.parquet"))) >= 2
    return folder


@pytest.fixture
def output(rendered, tmp_path) -> Path:
    """This test's own copy of the rendered OUTPUT (its manifest beside it as m.parquet)."""
    shutil.copytree(rendered, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out"


def parts(out: Path) -> list[Path]:
    return sorted((out / "metadata").glob("*.parquet"))


def ledger_keys(out: Path) -> list[str]:
    return [k for p in parts(out) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]


def images(out: Path) -> list[Path]:
    return sorted((out / "images").rglob("*.png"))


def quarantined(out: Path) -> list[str]:
    """What repair moved aside, as paths relative to the quarantine folder of its run."""
    return sorted(str(p.relative_to(stamp)) for stamp in (out / "_quarantine").iterdir()
                  for p in stamp.rglob("*") if p.is_file())


def rerun(out: Path, tiny_model: Path, manifest: Path | None = None):
    manifest = manifest or out.parent / "m.parquet"
    return render(make_job(str(manifest), str(out), str(tiny_model), batch_size=2), progress=False)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_metadata_part_stops_the_run_in_one_line_and_repair_lets_the_next_run_render_its_keys(
        kind, rendered, output, tiny_model, capsys):
    bad = parts(output)[0]
    lost = pq.read_table(bad, columns=["key"]).column("key").to_pylist()
    bad.write_bytes(CORRUPTIONS[kind](bad.read_bytes()))
    failure_parts = sorted((output / "failures").iterdir())
    assert failure_parts  # the bad row's, from the previous run

    run = call_cli(capsys, "render", str(output.parent / "m.parquet"), str(output), "--model", str(tiny_model),
                   "--no-progress")

    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and str(bad) in run.stderr
    assert f"fluxbatch verify {output} --repair" in run.stderr
    assert sorted((output / "failures").iterdir()) == failure_parts  # nothing deleted before the check

    check = call_cli(capsys, "verify", str(output))
    assert check.returncode == 1
    assert "unreadable part: 1" in check.stdout and str(bad) in check.stdout

    repair = call_cli(capsys, "verify", str(output), "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert not bad.exists()
    assert f"metadata/{bad.name}" in quarantined(output)
    assert not set(lost) & set(ledger_keys(output))

    summary = rerun(output, tiny_model)
    assert (summary.images_rendered, summary.images_failed) == (len(lost), 0)
    assert call_cli(capsys, "verify", str(output)).returncode == 0
    assert sorted(ledger_keys(output)) == sorted(ledger_keys(rendered / "out"))


def test_images_a_killed_driver_never_committed_are_reported_as_orphans_and_repair_moves_them_aside(
        output, tiny_model, capsys):
    # As if the driver died before committing its last part, and the user then dropped those rows.
    last = parts(output)[-1]
    table = pq.read_table(last, columns=["key", "request_id"])
    orphan_keys, dropped_ids = table.column("key").to_pylist(), set(table.column("request_id").to_pylist())
    last.unlink()
    edited = write_manifest(output.parent / "edited.parquet", [r for r in ROWS if r["id"] not in dropped_ids])

    check = call_cli(capsys, "verify", str(output))

    assert check.returncode == 1
    assert f"orphan image: {len(orphan_keys)}" in check.stdout
    assert orphan_keys[0] in check.stdout
    repair = call_cli(capsys, "verify", str(output), "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    moved = quarantined(output)
    assert sorted(Path(p).stem for p in moved) == sorted(orphan_keys)
    assert all(p.startswith("images/") for p in moved)
    assert call_cli(capsys, "verify", str(output)).returncode == 0
    # The edited manifest's images are all there: nothing to render, and nothing comes back.
    assert rerun(output, tiny_model, edited).images_planned == 0
    assert len(images(output)) == 6 - len(orphan_keys)


def test_a_part_copied_under_another_name_is_reported_and_repaired_to_one_row_per_key(output, capsys):
    first = parts(output)[0]
    shutil.copy(first, output / "metadata" / "part-zzz-copy.parquet")
    keys_before = set(ledger_keys(output))

    check = call_cli(capsys, "verify", str(output))

    copied = pq.read_table(first, columns=["key"]).column("key").to_pylist()
    assert check.returncode == 1
    assert f"duplicate key: {len(copied)}" in check.stdout
    assert call_cli(capsys, "verify", str(output), "--repair").returncode == 0
    keys = ledger_keys(output)
    assert len(keys) == len(set(keys)) and set(keys) == keys_before
    assert call_cli(capsys, "verify", str(output)).returncode == 0
    assert len(images(output)) == 6  # no image moved


def test_a_missing_and_an_altered_image_are_reported_repaired_and_rendered_again(output, tiny_model, capsys):
    missing, altered = images(output)[:2]
    original = {p: p.read_bytes() for p in (missing, altered)}
    missing.unlink()
    altered.write_bytes(original[altered][:-10] + b"0123456789")  # same size, other bytes

    check = call_cli(capsys, "verify", str(output))

    assert check.returncode == 1
    assert "missing image: 1" in check.stdout and missing.stem in check.stdout
    assert "altered image: 1" in check.stdout and altered.stem in check.stdout
    assert call_cli(capsys, "verify", str(output), "--repair").returncode == 0
    assert not {missing.stem, altered.stem} & set(ledger_keys(output))
    assert [p for p in quarantined(output) if p.startswith("images/")] == [str(altered.relative_to(output))]
    assert call_cli(capsys, "verify", str(output)).returncode == 0

    assert rerun(output, tiny_model).images_rendered == 2
    assert {p: p.read_bytes() for p in (missing, altered)} == original  # the same bytes as the first time
    assert call_cli(capsys, "verify", str(output)).returncode == 0


def test_verify_checks_every_version_folder(output, capsys):
    version = output / "_versions" / "2"
    version.mkdir(parents=True)
    for name in ("_job.json", "metadata", "images"):
        (shutil.copytree if (output / name).is_dir() else shutil.copy)(output / name, version / name)
    bad = parts(version)[0]
    bad.write_bytes(b"")

    check = call_cli(capsys, "verify", str(output))

    assert check.returncode == 1
    assert str(bad) in check.stdout and "unreadable part: 1" in check.stdout
    assert call_cli(capsys, "verify", str(output), "--repair").returncode == 0
    assert f"_versions/2/metadata/{bad.name}" in quarantined(output)
    assert call_cli(capsys, "verify", str(output)).returncode == 0


def test_verify_of_a_folder_that_is_no_output_is_one_line_and_moves_nothing(tmp_path, capsys):
    (tmp_path / "images" / "ab").mkdir(parents=True)
    (tmp_path / "images" / "ab" / "holiday.png").write_bytes(b"mine")

    result = call_cli(capsys, "verify", str(tmp_path), "--repair")

    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path} is not a fluxbatch OUTPUT (no _job.json); nothing checked"
    assert (tmp_path / "images" / "ab" / "holiday.png").read_bytes() == b"mine"


def test_verify_and_repair_on_s3(output, tiny_model, s3_env, bucket, capsys):
    fs, _ = filesystem(f"s3://{bucket}")
    target = f"s3://{bucket}/out"
    fs.fs.put(str(output), f"{bucket}/out", recursive=True)
    bad, other = (f"{bucket}/out/metadata/{p.name}" for p in (parts(output)[0], parts(output)[-1]))
    fs.write_bytes(bad, b"")
    gone = pq.read_table(output / "metadata" / Path(other).name).column("key").to_pylist()[0]
    fs.rm_file(next(p for p in fs.find(f"{bucket}/out/images") if gone in p))

    run = call_cli(capsys, "render", str(output.parent / "m.parquet"), target, "--model", str(tiny_model),
                   "--no-progress")
    assert run.returncode == 2 and f"s3://{bad}" in run.stderr and "Traceback" not in run.stderr

    check = call_cli(capsys, "verify", target)
    assert check.returncode == 1
    assert "unreadable part: 1" in check.stdout and f"s3://{bad}" in check.stdout
    assert "orphan image:" in check.stdout  # the images the unreadable part listed
    assert "missing image: 1" in check.stdout and gone in check.stdout

    assert call_cli(capsys, "verify", target, "--repair").returncode == 0
    assert not fs.exists(bad)
    assert any(p.endswith(f"metadata/{Path(bad).name}") for p in fs.find(f"{bucket}/out/_quarantine"))
    assert call_cli(capsys, "verify", target).returncode == 0
