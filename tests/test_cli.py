"""The command line as a user runs it: validate, model build, render, demo.

`fluxbatch demo` runs as its own process (interpreter, imports, its own Ray cluster), as `make demo` does; the
other commands run through `jobs.cli.main` in this process, which prints and returns the same exit status,
and a render joins the test session's Ray cluster instead of starting one more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flux_worker.loading import UnsafeWeightsError, load_pipeline
from jobs.cli import main
from schemas import ModelSpec
from tests.conftest import write_manifest

FLUXBATCH = [sys.executable, "-m", "jobs.cli"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`fluxbatch ARGS` as a separate process."""
    return subprocess.run([*FLUXBATCH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def call_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`fluxbatch ARGS` through `jobs.cli.main` in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fluxbatch", *args], code, out, err)


def test_validate_prints_each_bad_row_with_its_reason_and_exits_1(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "ok", "prompt": "a cat", "width": 64, "steps": 4},
        {"id": "bad-w", "prompt": "a cat", "width": 65, "steps": 4},
        {"id": "bad-s", "prompt": "a cat", "width": 64, "steps": -3},
    ])
    result = call_cli(capsys, "validate", str(manifest), "--model", str(tiny_model))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{manifest} row 1 (id 'bad-w'): field 'width': width must be a multiple of 16, got 65",
        f"{manifest} row 2 (id 'bad-s'): field 'steps': steps must be between 1 and 200, got -3",
    ]
    assert "3 rows: 1 valid (1 images), 2 bad" in result.stderr


def test_validate_of_a_clean_manifest_exits_0(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a cat"}])
    assert call_cli(capsys, "validate", str(manifest), "--model", str(tiny_model)).returncode == 0


def test_missing_manifest_is_one_line_error_not_a_traceback(tmp_path, tiny_model, capsys):
    result = call_cli(capsys, "validate", str(tmp_path / "nope.parquet"), "--model", str(tiny_model))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no manifest at '{tmp_path / 'nope.parquet'}'"


def test_a_storage_option_without_a_value_is_a_usage_error_naming_the_flag(tmp_path, capsys):
    for command in (["render", "m.parquet", str(tmp_path / "out")], ["synthesize", "spec.yaml"]):
        result = call_cli(capsys, *command, "--storage-option", "region")

        assert result.returncode == 2
        assert "argument --storage-option: 'region': expected key=value" in result.stderr
        assert "Traceback" not in result.stderr


def test_model_build_writes_a_pipeline_diffusers_loads(tmp_path, capsys):
    from diffusers import FluxPipeline

    result = call_cli(capsys, "model", "build", str(tmp_path / "m"), "--size", "tiny")
    assert result.returncode == 0, result.stderr
    pipe = FluxPipeline.from_pretrained(tmp_path / "m")
    image = pipe("a cat", width=64, height=64, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert not list((tmp_path / "m").rglob("*.bin"))


def test_pickle_weights_are_refused_with_a_message(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    torch.save({"w": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pickle-format checkpoint; fluxbatch loads safetensors only"):
        load_pipeline(ModelSpec(name=str(folder)))
    with pytest.raises(UnsafeWeightsError, match="not a .safetensors file"):
        load_pipeline(ModelSpec(name=str(tiny_model), adapters={"style": str(tmp_path / "style.pt")}))


@pytest.mark.usefixtures("stand_in_for_this_test")  # the command around the driver, not the model
def test_render_command_renders_and_a_second_run_renders_nothing(tmp_path, tiny_model, ray_cluster, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat", "width": 64, "height": 64}])
    out = tmp_path / "out"
    first = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 rendered, 0 already done, 0 failed, 0 bad rows; 1/1 images" in first.stdout
    second = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress")
    assert second.returncode == 0
    assert "0 rendered, 1 already done" in second.stdout


@pytest.mark.slow
def test_demo_renders_images_that_match_the_metadata_one_for_one(tmp_path):
    result = run_cli("demo", str(tmp_path / "demo-out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo-out"
    table = pq.read_table(out / "metadata")
    files = sorted(p for p in (out / "images").rglob("*") if p.is_file())
    assert sorted(Path(u) for u in table.column("image_uri").to_pylist()) == files
    assert len(files) == 13
    failures = pq.read_table(out / "failures").to_pylist()
    assert {(f["field"], f["reason"]) for f in failures} == {
        ("width", "width must be a multiple of 16, got 250"), ("prompt", "prompt is empty")}
    assert "13 rendered, 0 already done, 0 failed, 2 bad rows; 13/13 images" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("exit 0: the demo's 2 bad rows are refused on purpose")
