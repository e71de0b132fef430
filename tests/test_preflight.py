"""Mistakes users made, each refused by the pre-flight on the driver (pipeline/preflight.py): exit 2, one line on
stderr naming the thing at fault, no traceback, no `_job.json` written, and Ray never started.

Each test runs `fluxbatch render` through `jobs.cli.main` in this process. "Ray never started" is checked by a
tripwire on `pipeline.run._ensure_ray`, the one place a render starts or joins Ray (a session cluster another
test module started may already be up in this process, so `ray.is_initialized()` alone would not tell).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from schemas import ModelSpec
from tests.conftest import free_port, write_manifest
from tests.test_cli import call_cli


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the render gets as far as starting (or joining) Ray."""
    import pipeline.run

    def tripwire(*_: object, **__: object) -> None:
        raise AssertionError("the render started Ray: the mistake was not caught by the pre-flight")

    monkeypatch.setattr(pipeline.run, "_ensure_ray", tripwire)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AWS_*, HF_* or RAY_ADDRESS from the machine running the tests; an empty hub cache of our own."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "HF_")) or name in ("RAY_ADDRESS", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # A hub nobody answers for: no test may reach the network.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_manifest(tmp_path / "prompts" / "m.parquet",
                          [{"id": "a", "prompt": "a cat", "width": 64, "height": 64, "steps": 2}])


def refused(capsys, *args: str) -> str:
    """Run `fluxbatch render ARGS`; assert it is refused as the pre-flight refuses; returns the error line."""
    result = call_cli(capsys, "render", *args, "--no-progress")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, result.stderr  # one line, maybe a hint
    return lines[0]


def no_job_file(output: Path) -> bool:
    return not (output / "_job.json").exists()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_mistyped_hub_id_is_one_line_with_did_you_mean(tmp_path, manifest, capsys):
    out = tmp_path / "out"
    line = refused(capsys, str(manifest), str(out), "--model", "black-forest-labs/FLUX.1-dvv")
    assert "'black-forest-labs/FLUX.1-dvv'" in line and "not in the local Hugging Face cache" in line
    assert "cannot be reached" in line  # the hub of clean_env answers nobody
    assert "did you mean 'black-forest-labs/FLUX.1-dev'?" in line
    assert no_job_file(out)


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_hub_id_not_cached_with_hf_hub_offline_is_refused_without_asking_the_hub(tmp_path, manifest, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    line = refused(capsys, str(manifest), str(out), "--model", "flux.1-dev")  # a preset: its hub id is not cached
    assert "'black-forest-labs/FLUX.1-dev'" in line and "HF_HUB_OFFLINE is set" in line
    assert str(tmp_path / "hf-cache") in line
    assert no_job_file(out)


def fake_cached_model(cache: Path, repo_id: str) -> None:
    """A hub cache entry as huggingface_hub lays it out: refs/main -> a snapshot holding model_index.json."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123456789abcdef")
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_near_miss_of_a_cached_hub_id_is_suggested_and_the_cached_id_passes(tmp_path, manifest, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_cached_model(tmp_path / "hf-cache", "acme/flux-tiny")
    line = refused(capsys, str(manifest), str(tmp_path / "out"), "--model", "acme/flux-tiyn")
    assert "did you mean 'acme/flux-tiny'?" in line
    from pipeline import preflight

    assert preflight.check_model(ModelSpec(name="acme/flux-tiny")).source == "acme/flux-tiny"


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_near_miss_preset_name_is_suggested(tmp_path, manifest, capsys):
    line = refused(capsys, str(manifest), str(tmp_path / "out"), "--model", "flux.1-schnel")
    assert "'flux.1-schnel' is not a preset" in line and "did you mean 'flux.1-schnell'?" in line


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_model_folder_with_pickle_weights_only_is_refused_on_the_driver(tmp_path, manifest, tiny_model, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    out = tmp_path / "out"
    line = refused(capsys, str(manifest), str(out), "--model", str(folder))
    assert "is a pickle-format checkpoint; fluxbatch loads safetensors only" in line and str(folder) in line
    assert no_job_file(out)


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_model_folder_of_another_pipeline_class_is_refused(tmp_path, manifest, tiny_model, capsys):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    line = refused(capsys, str(manifest), str(tmp_path / "out"), "--model", str(folder))
    assert "names the pipeline class 'StableDiffusionPipeline'" in line and "FluxPipeline" in line


def test_the_pipeline_classes_checked_are_the_ones_loading_uses():
    from flux_worker import loading
    from flux_worker.weights import PIPELINE_CLASSES

    assert loading.FluxPipeline.__name__ in PIPELINE_CLASSES


def job_with_adapter(tmp_path: Path, model: Path, adapter: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"name": str(model), "adapters": {"style": adapter}}}))  # YAML reads JSON
    return job


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_adapter_that_is_not_a_safetensors_file_is_refused_on_the_driver(tmp_path, manifest, tiny_model, capsys):
    out = tmp_path / "out"
    line = refused(capsys, str(manifest), str(out), "--job", str(job_with_adapter(tmp_path, tiny_model, "/etc/passwd")))
    assert line == "error: adapter 'style': /etc/passwd is not a .safetensors file; fluxbatch loads no pickles"
    # Named .safetensors, but something else inside (here a copy of a text file).
    renamed = tmp_path / "style.safetensors"
    renamed.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    line = refused(capsys, str(manifest), str(out), "--job", str(job_with_adapter(tmp_path, tiny_model, str(renamed))))
    assert f"adapter 'style': {renamed} is not a safetensors file" in line
    assert no_job_file(out)


def test_a_real_safetensors_adapter_passes_the_check(tmp_path):
    from safetensors.numpy import save_file

    from flux_worker.weights import check_adapter

    save_file({"lora.down.weight": np.zeros((4, 8), np.float32)}, str(tmp_path / "style.safetensors"))
    assert check_adapter("style", str(tmp_path / "style.safetensors")) == tmp_path / "style.safetensors"


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_wrong_manifest_path_is_refused_and_leaves_no_job_file(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    line = refused(capsys, str(tmp_path / "nope.parquet"), str(out), "--model", str(tiny_model))
    assert line == f"error: no manifest at {str(tmp_path / 'nope.parquet')!r}"
    assert no_job_file(out)


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_output_that_is_a_file_or_inside_a_file_is_refused(tmp_path, manifest, tiny_model, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = refused(capsys, str(manifest), str(file), "--model", str(tiny_model))
    assert f"OUTPUT {file} is a file, not a folder" in line
    line = refused(capsys, str(manifest), str(file / "run"), "--model", str(tiny_model))
    assert f"OUTPUT {file / 'run'} cannot be written" in line and "Not a directory" in line
    assert file.read_text() == "mine"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into; as root (who passes permission bits) made immutable with chattr."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root, and this file system cannot make a folder immutable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_read_only_output_is_refused_in_one_line(manifest, tiny_model, read_only_folder, capsys):
    line = refused(capsys, str(manifest), str(read_only_folder), "--model", str(tiny_model))
    assert f"OUTPUT {read_only_folder} cannot be written" in line
    assert "ermission denied" in line or "not permitted" in line
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_job_file_that_is_not_json_is_named_in_one_line(tmp_path, manifest, tiny_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{not json")
    line = refused(capsys, str(manifest), str(out), "--model", str(tiny_model))
    assert f"{out / '_job.json'} is not JSON" in line
    assert (out / "_job.json").read_text() == "{not json"


# --- S3 ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_aws_credentials(clean_env, s3_server, tmp_path, monkeypatch):
    """The moto endpoint, and nothing boto could take credentials from: no variables, empty config files."""
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no metadata service lookup either
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.usefixtures("no_aws_credentials", "no_ray")
def test_s3_output_without_credentials_is_one_line(manifest, tiny_model, bucket, capsys):
    line = refused(capsys, str(manifest), f"s3://{bucket}/run", "--model", str(tiny_model))
    assert line.startswith(f"error: no AWS credentials to read s3://{bucket}/run")
    assert "AWS_ACCESS_KEY_ID" in line


@pytest.fixture
def s3_credentials(clean_env, s3_env):
    """The moto server's endpoint and credentials, and nothing else from the machine's environment."""


@pytest.mark.usefixtures("s3_credentials", "no_ray")
def test_s3_endpoint_nobody_listens_on_is_one_line(manifest, tiny_model, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    line = refused(capsys, str(manifest), "s3://some-bucket/run", "--model", str(tiny_model))
    assert line.startswith(f"error: cannot reach {dead} to read s3://some-bucket/run")
    assert "AWS_ENDPOINT_URL" in line


@pytest.mark.usefixtures("s3_credentials", "no_ray")
def test_s3_output_bucket_that_does_not_exist_is_named(manifest, tiny_model, capsys):
    line = refused(capsys, str(manifest), "s3://no-such-bucket-here/run", "--model", str(tiny_model))
    assert "bucket 'no-such-bucket-here' does not exist" in line and "s3://no-such-bucket-here/run" in line


@pytest.mark.usefixtures("s3_credentials", "no_ray")
def test_s3_output_the_credentials_may_not_write_says_so_naming_the_url(manifest, tiny_model, bucket, s3_server,
                                                                        capsys):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    line = refused(capsys, str(manifest), f"s3://{bucket}/run", "--model", str(tiny_model))
    assert line.startswith(f"error: OUTPUT s3://{bucket}/run cannot be written: access denied (403 ")
    assert f"to write s3://{bucket}/run/" in line and "may not write there" in line


@pytest.mark.usefixtures("s3_credentials", "no_ray")
def test_s3_manifest_in_a_bucket_that_does_not_exist_is_named(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    line = refused(capsys, "s3://no-such-bucket-here/m.parquet", str(out), "--model", str(tiny_model))
    assert "no-such-bucket-here" in line
    assert no_job_file(out)


# --- the corrected run, and one model however its path is spelled ------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("clean_env")
def test_corrected_run_renders_and_a_model_path_spelled_otherwise_is_the_same_job(
        tmp_path, manifest, tiny_model, ray_cluster, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    out = tmp_path / "out"
    refused(capsys, str(manifest), str(out), "--model", "black-forest-labs/FLUX.1-dvv")  # nothing recorded

    monkeypatch.chdir(tiny_model.parent)
    first = call_cli(capsys, "render", str(manifest), str(out), "--model", f"./{tiny_model.name}", "--no-progress")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("1 rendered, 0 already done")
    again = call_cli(capsys, "render", str(manifest), str(out), "--model", f"{tiny_model}/", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 rendered, 1 already done")

    from flux_worker.presets import local_fingerprint

    recorded = json.loads((out / "_job.json").read_text())
    assert recorded["identity"]["model"]["name"] == local_fingerprint(tiny_model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_revision"] == local_fingerprint(tiny_model)

    # A _job.json written before fingerprints recorded the path as given: it still reads, and still matches.
    recorded["identity"]["model"]["name"] = f"./{tiny_model.name}"
    (out / "_job.json").write_text(json.dumps(recorded))
    old = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress")
    assert old.returncode == 0, old.stderr


def test_hub_cache_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    from flux_worker import hub

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == tmp_path / "cache"

