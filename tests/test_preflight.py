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
    assert "'flux.1-dev' (black-forest-labs/FLUX.1-dev on the hub)" in line and "HF_HUB_OFFLINE is set" in line
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


# --- job defaults: the rules of a manifest row's value ------------------------------------------------------------


@pytest.fixture
def manifest_without_sizes(tmp_path) -> Path:
    """Rows that leave every default-able column out, so the job's defaults are what renders."""
    return write_manifest(tmp_path / "prompts" / "bare.parquet", [{"id": "a", "prompt": "a cat"}])


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_width_default_not_a_multiple_of_16_is_one_line_naming_the_flag_and_writes_nothing(
        tmp_path, manifest_without_sizes, tiny_model, capsys):
    out = tmp_path / "out"
    line = refused(capsys, str(manifest_without_sizes), str(out), "--model", str(tiny_model), "--width", "1000")
    assert line == "error: --width 1000: width must be a multiple of 16, got 1000"  # a row's words for it
    assert not out.exists()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_default_from_a_job_file_outside_the_models_sizes_names_the_file_and_the_field(
        tmp_path, manifest_without_sizes, tiny_model, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("defaults: {width: 2048}\n")  # a fine size for flux.1-dev, too large for the offline model
    out = tmp_path / "out"
    line = refused(capsys, str(manifest_without_sizes), str(out), "--model", str(tiny_model), "--job", str(job))
    assert line == f"error: {job}: defaults.width: width must be between 64 and 1024 for this model, got 2048"
    assert not out.exists()
    validate = call_cli(capsys, "validate", str(manifest_without_sizes), "--model", str(tiny_model),
                        "--job", str(job))
    assert (validate.returncode, validate.stderr.strip()) == (2, line)  # validate refuses it the same way


@pytest.mark.parametrize(("words", "expected"), [
    (["--height", "48"], "--height 48: height must be between 64 and 1024 for this model, got 48"),
    (["--steps", "0"], "--steps 0: steps must be between 1 and 200, got 0"),
    (["--guidance", "31"], "--guidance 31.0: guidance must be between 0 and 30.0, got 31.0"),
    (["--guidance", "nan"], "--guidance nan: guidance must be a finite number, got nan"),
])
@pytest.mark.usefixtures("clean_env", "no_ray")
def test_every_default_flag_obeys_the_rule_of_the_same_value_in_a_manifest_row(
        tmp_path, manifest_without_sizes, tiny_model, words, expected, capsys):
    out = tmp_path / "out"
    assert refused(capsys, str(manifest_without_sizes), str(out), "--model", str(tiny_model), *words) == (
        f"error: {expected}")
    assert not out.exists()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_default_fields_of_a_job_file_obey_a_rows_rules_jpg_included(tmp_path, manifest_without_sizes, tiny_model,
                                                                     capsys):
    from jobs.cli import build_parser, job_from_args

    job = tmp_path / "job.yaml"
    job.write_text("defaults: {output_format: gif, steps: 500}\n")
    line = refused(capsys, str(manifest_without_sizes), str(tmp_path / "out"), "--model", str(tiny_model),
                   "--job", str(job))
    assert line == (f"error: {job}: defaults.steps: steps must be between 1 and 200, got 500; "
                    "defaults.output_format: output_format must be one of png, jpeg, webp; got 'gif'")
    job.write_text("defaults: {output_format: JPG, steps: 8.0}\n")  # what a row may say, a default may say
    args = build_parser().parse_args(["render", str(manifest_without_sizes), "out", "--job", str(job)])
    assert (job_from_args(args).defaults.output_format.value, job_from_args(args).defaults.steps) == ("jpeg", 8)


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_guidance_default_for_a_step_distilled_model_is_refused_as_in_a_row(tmp_path, manifest_without_sizes,
                                                                            capsys):
    line = refused(capsys, str(manifest_without_sizes), str(tmp_path / "out"), "--model", "flux.2-klein-4b",
                   "--guidance", "3.5")
    assert line == ("error: --guidance 3.5: guidance must be empty: this model is step-distilled and takes no "
                    "guidance")


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_python_api_default_outside_the_models_sizes_is_refused_before_output_exists(tmp_path, tiny_model,
                                                                                     manifest_without_sizes):
    from pipeline import render
    from schemas.overrides import SpecFileError
    from tests.helpers import make_job

    out = tmp_path / "out"
    job = make_job(str(manifest_without_sizes), str(out), str(tiny_model), defaults={"height": 1056})
    with pytest.raises(SpecFileError, match=r"^defaults\.height: height must be between 64 and 1024 for this "
                                             r"model, got 1056$"):
        render(job, progress=False)
    assert not out.exists()


# --- globs, URLs and storage options: one line each, in render, validate and verify ----------------------------


def one_line(result) -> str:
    """The error line of a refused command: exit 2, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_a_manifest_glob_fsspec_cannot_read_is_one_line_in_render_and_validate(tmp_path, manifest, tiny_model,
                                                                               capsys):
    glob = f"{tmp_path}/prompts/**.parquet"
    out = tmp_path / "out"
    expected = (f"error: MANIFEST {glob}: '**' in a glob must be a whole path component (did you mean "
                f"'{tmp_path}/prompts/**/*.parquet'?)")
    assert refused(capsys, glob, str(out), "--model", str(tiny_model)) == expected
    assert one_line(call_cli(capsys, "validate", glob, "--model", str(tiny_model))) == expected
    job = tmp_path / "job.yaml"
    job.write_text("manifest: prompts/**.parquet\n")
    assert one_line(call_cli(capsys, "validate", "--job", str(job), "--model", str(tiny_model))) == (
        f"error: {job}: manifest: '**' in a glob must be a whole path component (did you mean "
        "'prompts/**/*.parquet'?), got 'prompts/**.parquet'")
    assert not out.exists()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_an_output_of_an_unknown_protocol_is_one_line_in_render_and_verify_and_nothing_is_written(
        tmp_path, manifest, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fsspec would not make a local folder of it, but nothing may be written anywhere
    before = sorted(tmp_path.rglob("*"))
    expected = "error: OUTPUT s4://x: unknown protocol 's4' (did you mean s3://?)"
    assert refused(capsys, str(manifest), "s4://x", "--model", str(tiny_model)) == expected
    assert one_line(call_cli(capsys, "verify", "s4://x")) == expected
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_a_manifest_or_reference_root_of_an_unknown_protocol_is_one_line(tmp_path, manifest, tiny_model, capsys):
    out = tmp_path / "out"
    assert refused(capsys, "s4://prompts/m.parquet", str(out), "--model", str(tiny_model)) == (
        "error: MANIFEST s4://prompts/m.parquet: unknown protocol 's4' (did you mean s3://?)")
    assert one_line(call_cli(capsys, "validate", "S3://prompts/m.parquet", "--model", str(tiny_model))) == (
        "error: MANIFEST S3://prompts/m.parquet: unknown protocol 'S3' (did you mean s3://?)")
    assert refused(capsys, str(manifest), str(out), "--model", str(tiny_model), "--reference-root", "s4://photos") == (
        "error: --reference-root s4://photos: unknown protocol 's4' in 's4://photos' (did you mean s3://?)")
    job = tmp_path / "job.yaml"
    job.write_text("reference_roots: [/srv/photos, 'htps://cdn.example.com/photos']\n")
    assert one_line(call_cli(capsys, "validate", str(manifest), "--model", str(tiny_model), "--job", str(job))) == (
        f"error: {job}: reference_roots: unknown protocol 'htps' in 'htps://cdn.example.com/photos' "
        "(did you mean https://?)")
    assert not out.exists()


@pytest.mark.usefixtures("clean_env", "no_ray")
def test_a_url_whose_file_system_package_is_not_installed_or_that_names_no_bucket_is_one_line(
        tmp_path, manifest, tiny_model, capsys, monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "fbtest",
                        {"class": "fluxbatch_no_such_package.FileSystem", "err": "pip install fluxbatch-fbtest"})
    out = tmp_path / "out"
    assert refused(capsys, "fbtest://prompts/m.parquet", str(out), "--model", str(tiny_model)) == (
        "error: MANIFEST fbtest://prompts/m.parquet: the protocol 'fbtest' needs a package that is not installed "
        "(pip install fluxbatch-fbtest)")
    assert refused(capsys, str(manifest), "s3:///run", "--model", str(tiny_model)) == (
        "error: OUTPUT s3:///run: no bucket or host after 's3://'")
    assert not out.exists()


@pytest.mark.parametrize(("options", "expected"), [
    (["=x"], "--storage-option =x: the key is empty; write KEY=VALUE (nested: client_kwargs.region_name=VALUE)"),
    (["a.=x"], "--storage-option a.=x: the key has an empty part; write KEY=VALUE (nested: "
               "client_kwargs.region_name=VALUE)"),
    (["anon=true", "anon.x=1"], "--storage-option anon.x=1: anon is also set to a value (--storage-option "
                                "anon=true); an option takes a value or nested keys, not both"),
    (["client_kwargs=x", "endpoint_url=http://127.0.0.1:9"],
     "--storage-option endpoint_url=http://127.0.0.1:9: client_kwargs is also set to a value (--storage-option "
     "client_kwargs=x); an option takes a value or nested keys, not both"),
    (["endpont_url=http://127.0.0.1:9"], "--storage-option endpont_url=http://127.0.0.1:9: s3:// (s3fs) takes no "
                                         "option 'endpont_url' (did you mean 'endpoint_url'?)"),
    (["config_kwargs=3"], "--storage-option config_kwargs=3: config_kwargs takes nested keys for s3:// "
                          "(config_kwargs.KEY=VALUE)"),
    (["config_kwargs.connect_timeot=3"], "--storage-option config_kwargs.connect_timeot=3: botocore's Config takes "
                                         "no option 'connect_timeot' (did you mean 'connect_timeout'?)"),
])
@pytest.mark.usefixtures("clean_env", "no_ray")
def test_storage_option_garbage_is_one_line_naming_the_flag_in_render_and_verify(tmp_path, manifest, tiny_model,
                                                                                 options, expected, capsys):
    words = [word for option in options for word in ("--storage-option", option)]
    assert refused(capsys, str(manifest), "s3://bucket/run", "--model", str(tiny_model), *words) == (
        f"error: {expected}")
    assert one_line(call_cli(capsys, "verify", "s3://bucket/run", *words)) == f"error: {expected}"


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
@pytest.mark.usefixtures("clean_env", "stand_in_renderer")  # _job.json's identity of the model; no pipeline loads
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

    from flux_worker.model_folder import ModelFolder

    recorded = json.loads((out / "_job.json").read_text())
    assert recorded["identity"]["model"]["name"] == ModelFolder(tiny_model).fingerprint()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_revision"] == ModelFolder(tiny_model).fingerprint()



def test_hub_cache_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    from flux_worker import hub

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == tmp_path / "cache"

