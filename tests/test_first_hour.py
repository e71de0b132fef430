"""The first hour as a new user lives it: what a run says at its end, `fluxbatch failures`, refusals that need no
cluster made before Ray starts, "did you mean" that never repeats what was typed, builds that print no library noise.

Renders here test the command line around the driver, not the model: the stand-in renderer (tests/stand_in.py)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from jobs.terminal import summary_lines
from schemas import RunSummary
from tests.conftest import write_manifest
from tests.own_ray import OwnRay
from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the command line, not the model

ROWS = [
    {"id": "ok-1", "prompt": "a red cat", "width": 64, "height": 64},
    {"id": "ok-2", "prompt": "a blue dog", "width": 64, "height": 64},
    {"id": "odd-width", "prompt": "a cup", "width": 70, "height": 64},
    {"id": "empty", "prompt": "  ", "width": 64, "height": 64},
]


def render_with_bad_rows(capsys, tmp_path, tiny_model, out: str):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    return call_cli(capsys, "render", str(manifest), out, "--model", str(tiny_model), "--no-progress")


def test_a_run_ends_with_failures_by_reason_as_lines_the_report_and_what_the_exit_code_means(
        tmp_path, tiny_model, ray_cluster, capsys):
    out = str(tmp_path / "out")
    result = render_with_bad_rows(capsys, tmp_path, tiny_model, out)

    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        f"2 rendered, 0 already done, 0 failed, 2 bad rows; 2/2 images in {out}",
        f"failures by reason (`fluxbatch failures {out}` lists each row):",
        "        1  validate:prompt",
        "        1  validate:width",
        f"report: {out}/report.html",
        "exit 1: 2 rows were refused (fix them in the manifest)"]
    assert "{" not in result.stdout  # no Python dict


def test_the_summary_lists_the_top_reasons_then_how_many_more():
    summary = RunSummary(output="s3://b/run", run_id="r", model_id="m", started_at=datetime.now(timezone.utc),
                         images_expected=10,
                         images_planned=10, images_rendered=3, images_failed=7, images_total_done=3,
                         failures_by_reason={f"render:Error{i}": 7 - i for i in range(7)})
    lines = summary_lines(summary)
    assert lines[1] == "failures by reason (`fluxbatch failures s3://b/run` lists each row):"
    assert lines[2:7] == [f"  {7 - i:>7}  render:Error{i}" for i in range(5)]
    assert lines[7] == "  and 2 more reasons (3 failures)"
    assert lines[-1] == "exit 1: 7 of 10 images are not in OUTPUT (a re-run renders what failed)"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_failures_lists_each_failure_row_as_a_table_or_json_with_a_limit(where, tmp_path, tiny_model, ray_cluster,
                                                                          capsys, request):
    if where == "s3":
        request.getfixturevalue("s3_env")
        out = f"s3://{request.getfixturevalue('bucket')}/run"
    else:
        out = str(tmp_path / "out")
    render_with_bad_rows(capsys, tmp_path, tiny_model, out)

    table = call_cli(capsys, "failures", out)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["SOURCE", "ROW", "ID", "FIELD", "REASON"]
    cells = sorted(re.split(r"\s{2,}", row)[1:] for row in rows)  # source, row, id, field, reason
    assert cells == [["2", "odd-width", "width", "width must be a multiple of 16, got 70"],
                     ["3", "empty", "prompt", "prompt is empty"]], rows
    assert all(row.startswith(str(tmp_path / "m.parquet")) for row in rows), rows
    assert table.stderr.strip().endswith("2 failure rows in " + (out if where == "s3" else str(Path(out))))

    as_json = call_cli(capsys, "failures", out, "--json")
    found = json.loads(as_json.stdout)
    assert {(r["id"], r["row"], r["field"]) for r in found} == {("odd-width", 2, "width"), ("empty", 3, "prompt")}
    assert all(r["source"].endswith("m.parquet") and r["stage"] == "validate" for r in found)

    one = call_cli(capsys, "failures", out, "--limit", "1", "--json")
    assert len(json.loads(one.stdout)) == 1
    assert "1 of 2 failure rows" in one.stderr and "--limit 2 shows them all" in one.stderr


def test_failures_of_a_folder_no_run_wrote_is_one_line(tmp_path, capsys):
    result = call_cli(capsys, "failures", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: OUTPUT {tmp_path}: no _job.json there, so no fluxbatch run wrote it"
    bad = call_cli(capsys, "failures", str(tmp_path), "--limit", "0")
    assert bad.returncode == 2 and "--limit" in bad.stderr and "1 or more" in bad.stderr


def test_a_job_file_asking_for_a_gpu_on_a_machine_without_one_is_refused_before_ray_starts(tmp_path, tiny_model):
    """Its own process, as a user runs it: no Ray is running there, so the refusal comes before Ray would start."""
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    job = tmp_path / "job.yaml"
    job.write_text(f"manifest: {manifest}\noutput: {{uri: {tmp_path / 'out'}}}\nmodel: {{name: {tiny_model}}}\n"
                   "gpus_per_replica: 1\n")
    ray = OwnRay()
    try:
        result = ray.run(["render", "--job", str(job)], CUDA_VISIBLE_DEVICES="")
        sessions = list(Path(ray.temp_dir).glob("session_*"))
    finally:
        ray.cleanup()

    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: gpus_per_replica in {job} asks for 1 GPU per replica, but this machine has no GPU (a run without "
        "--ray-address starts its Ray cluster here); set gpus_per_replica 0 to render on CPU, or join a cluster "
        "with GPUs with --ray-address"]
    assert not sessions, "Ray was started before the refusal"
    assert not (tmp_path / "out").exists()


def test_did_you_mean_never_suggests_what_was_typed():
    from flux_worker.presets import did_you_mean

    assert did_you_mean("black-forest-labs/FLUX.1-schnell", ["black-forest-labs/FLUX.1-schnell"]) == ""
    assert did_you_mean("black-forest-labs/flux.1-schnell", ["black-forest-labs/FLUX.1-schnell"]) == ""
    assert did_you_mean("flux.1-schnel", ["flux.1-schnell"]) == "; did you mean 'flux.1-schnell'?"


def test_a_preset_not_in_the_cache_is_named_as_typed_without_a_suggestion_of_itself(monkeypatch, tmp_path):
    from flux_worker.hub import HubUnreachableError
    from pipeline.preflight import check_model
    from schemas import ModelSpec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as error:
        check_model(ModelSpec(name="flux.1-schnell"))
    message = str(error.value)
    assert message.startswith("model 'flux.1-schnell' (black-forest-labs/FLUX.1-schnell on the hub) is not in")
    assert "did you mean" not in message


def test_model_build_prints_its_one_line_and_nothing_from_the_libraries(tmp_path, capfd):
    from jobs.cli import main

    assert main(["model", "build", str(tmp_path / "m")]) == 0
    out, err = capfd.readouterr()
    assert out.strip() == f"wrote a random-weight tiny flux.1 pipeline to {tmp_path / 'm'}"
    assert "Writing model shards" not in err and err.strip() == "", err
