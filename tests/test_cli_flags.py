"""The command line as a user types it: job files, flags generated from the spec, --version, -v anywhere.

Each mistake in a job file is one line on stderr, exit 2, no traceback, and nothing written to OUTPUT.
Commands run through `jobs.cli.main` in this process (see tests/test_cli.py); a render joins the session's
Ray cluster.
"""

from __future__ import annotations

import enum
import re
import subprocess
import typing
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.flags import JOB_FLAGS, flags_markdown, job_leaf_fields
from schemas import JobSpec
from tests.conftest import write_manifest
from tests.own_ray import REPO

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # what the flags make of a job; the model does not matter


def call_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`fluxbatch ARGS` through `jobs.cli.main`: its exit status, stdout and stderr."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse: usage errors, --version, --help
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fluxbatch", *args], code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr starting `error:`, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- job file mistakes ---------------------------------------------------------------------------------------

YAML_MISTAKES = {
    "syntax error": ("manifest: m.parquet\noutput: {uri: out\nreplicas: 2\n",
                     ["job.yaml line 3, column", "not valid YAML"]),
    "python object tag": ("manifest: m.parquet\noutput: !!python/object/apply:os.system ['true']\n",
                          ["job.yaml line 2, column 9", "tag", "python/object", "not allowed"]),
    "top-level list": ("- manifest: m.parquet\n- output: {uri: out}\n",
                       ["job.yaml", "must be a mapping of fields", "got a list"]),
    "unknown key, near miss": ("manifest: m.parquet\noutput: {uri: out}\nreplica: 2\n",
                               ["job.yaml", "unknown field 'replica'", "did you mean 'replicas'?"]),
    "unknown nested key, near miss": ("manifest: m.parquet\noutput: {uri: out}\nmodel: {name: x, dtyp: bf16}\n",
                                      ["job.yaml", "unknown field 'model.dtyp'", "did you mean 'dtype'?"]),
    "unknown key, no near miss": ("manifest: m.parquet\noutput: {uri: out}\ncolour: red\n",
                                  ["job.yaml", "unknown field 'colour'"]),
    "mapping where a value goes": ("manifest: m.parquet\noutput: {uri: out}\nreplicas: {n: 2}\n",
                                   ["job.yaml", "replicas"]),
    "a number where a mapping goes": ("manifest: m.parquet\noutput: 5\n",
                                      ["job.yaml", "output must be a mapping like {uri: /path}"]),
}


@pytest.mark.parametrize("mistake", list(YAML_MISTAKES))
def test_a_job_file_mistake_is_one_line_exit_2_and_writes_nothing(mistake, tmp_path, capsys, monkeypatch):
    text, fragments = YAML_MISTAKES[mistake]
    monkeypatch.chdir(tmp_path)
    Path("job.yaml").write_text(text)
    out = tmp_path / "out"

    assert_one_line_error(call_cli(capsys, "render", "--job", "job.yaml", "m.parquet", str(out)), *fragments)

    assert not out.exists()  # no _job.json, nothing at all


def test_a_missing_job_file_is_one_line_naming_it(tmp_path, capsys):
    assert_one_line_error(call_cli(capsys, "render", "--job", str(tmp_path / "nope.yaml"), "m.parquet", "out"),
                          f"no job file at '{tmp_path / 'nope.yaml'}'")


@pytest.mark.parametrize("command", [
    ["render", "--job", "spec.yaml", "m.parquet", "out"],
    ["validate", "--job", "spec.yaml", "m.parquet"],
    ["synthesize", "spec.yaml"],
    ["catalog", "run", "spec.yaml"],
    ["schedule", "spec.yaml", "--once"],
    ["submit", "spec.yaml", "--address", "http://127.0.0.1:1"],
])
def test_every_spec_file_is_read_by_one_loader_with_the_same_one_line_errors(command, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("spec.yaml").write_text("a: [1, 2\nb: 3\n")
    assert_one_line_error(call_cli(capsys, *command), "spec.yaml line 2, column", "not valid YAML")
    Path("spec.yaml").write_text("output: !!python/object/new:os.getcwd []\n")
    assert_one_line_error(call_cli(capsys, *command), "spec.yaml line 1, column 9", "python/object")
    Path("spec.yaml").write_text("- 1\n")
    assert_one_line_error(call_cli(capsys, *command), "spec.yaml", "got a list")


def test_output_as_a_plain_string_is_its_uri_and_the_command_line_still_overrides_it(tmp_path, capsys):
    from jobs.cli import build_parser, job_from_args

    (tmp_path / "job.yaml").write_text("manifest: m.parquet\noutput: s3://bucket/run\nmodel: flux.1-dev\n")
    job = job_from_args(build_parser().parse_args(["render", "--job", str(tmp_path / "job.yaml"), "--layout",
                                                   "webdataset"]))
    assert (job.output.uri, job.output.layout, job.model.name) == ("s3://bucket/run", "webdataset", "flux.1-dev")

    job = job_from_args(build_parser().parse_args(["render", "--job", str(tmp_path / "job.yaml"), "m2.parquet",
                                                   "other/out", "--dtype", "bf16"]))
    assert (job.manifest, job.output.uri, job.model.name, job.model.dtype) == (
        "m2.parquet", "other/out", "flux.1-dev", "bf16")


def test_a_bad_flag_value_names_the_flag_not_the_job_file(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("manifest: m.parquet\noutput: {uri: out}\n")
    line = assert_one_line_error(call_cli(capsys, "render", "--job", str(tmp_path / "job.yaml"), "--replicas", "0"),
                                 "--replicas")
    assert "job.yaml" not in line


@pytest.mark.parametrize("command, typo, meant", [
    (["render", "m.parquet", "out"], "--replcias", "--replicas"),
    (["render", "m.parquet", "out"], "--cpus-per-replcia", "--cpus-per-replica"),
    (["validate", "m.parquet"], "--referance-root", "--reference-root"),
    (["verify", "out"], "--repiar", "--repair"),
])
def test_a_mistyped_flag_is_one_line_naming_the_flag_it_resembles(command, typo, meant, tmp_path, capsys):
    line = assert_one_line_error(call_cli(capsys, *command, typo, "2"), f"unrecognized arguments: {typo}",
                                 f"did you mean {meant}?", f"fluxbatch {command[0]} --help lists the options")
    assert line.count("did you mean") == 1
    assert not (tmp_path / "out").exists()


def test_a_flag_resembling_none_is_named_without_a_guess(capsys):
    line = assert_one_line_error(call_cli(capsys, "render", "m.parquet", "out", "--colour", "red"),
                                 "unrecognized arguments: --colour red")
    assert "did you mean" not in line


# --- --version and global flags ------------------------------------------------------------------------------

def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    result = call_cli(capsys, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fluxbatch {version('fluxbatch')}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_works_before_or_after_the_subcommand_and_shows_the_traceback(where, tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("- not a mapping\n")
    words = ["render", "--job", str(tmp_path / "job.yaml"), "m.parquet", "out"]
    words = ["-v", *words] if where == "before" else [*words, "-v"]

    result = call_cli(capsys, *words)

    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verbose_after_a_nested_subcommand_is_accepted(tmp_path, capsys):
    from jobs.cli import build_parser

    for words in (["model", "build", "x", "-v"], ["catalog", "run", "s.yaml", "--verbose"],
                  ["submit", "s.yaml", "--address", "http://h:8265", "-v"], ["verify", "out", "-v"]):
        assert build_parser().parse_args(words).verbose is True
    assert getattr(build_parser().parse_args(["verify", "out"]), "verbose", False) is False


def test_verbose_shows_info_logs(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a cat"}])
    # main sets the logging level before a command runs: log from inside the command, as fluxbatch's own code does.
    code = ("import logging, sys\nimport jobs.cli as cli\nreal = cli.cmd_validate\n"
            "def logged(args):\n    logging.getLogger('fluxbatch.test').info('INFO-SEEN')\n    return real(args)\n"
            "cli.cmd_validate = logged\nsys.exit(cli.main(sys.argv[1:]))\n")
    for extra, seen in (([], False), (["-v"], True)):
        result = subprocess.run([__import__("sys").executable, "-c", code, "validate", str(manifest), "--model",
                                 "flux.1-dev", *extra], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert ("INFO-SEEN" in result.stderr) is seen


# --- flags generated from the spec ---------------------------------------------------------------------------

POSITIONAL_OR_HAND_WRITTEN = {"manifest", "output.uri", "storage_options", "output.storage_options"}


@pytest.mark.parametrize("field", sorted(job_leaf_fields()))
def test_every_job_field_has_a_flag(field):
    flags = {flag.field: flag for flag in JOB_FLAGS}
    assert field in flags or field in POSITIONAL_OR_HAND_WRITTEN
    if field in flags:
        assert flags[field].help, f"{field} has no description in schemas/job.py"


def example_value(field: str) -> tuple[list[str], typing.Any]:
    """Command-line words setting `field` to a valid value other than its default, and that value."""
    flag = {flag.field: flag for flag in JOB_FLAGS}[field]
    default = flag.default
    if flag.kind == "bool":
        return ([flag.names[0] if not default else flag.names[-1]], not default)
    if flag.kind == "mapping":
        return ([flag.names[0], "style=/models/style.safetensors"], {"style": "/models/style.safetensors"})
    if flag.kind == "list":  # repeated: each one an item
        return ([flag.names[0], "s3://photos", flag.names[0], "/srv/photos"], ["s3://photos", "/srv/photos"])
    if flag.choices:
        value = next(c for c in flag.choices if c != _plain(default))
        return ([flag.names[0], value], value)
    if flag.kind == "number-or-auto":
        return ([flag.names[0], "2"], 2.0)
    if flag.kind == "str":
        return ([flag.names[0], "example"], "example")
    low = flag.bounds[0]
    # 16 for a default's flag: a side, steps and guidance a manifest row may hold with any model.
    number = (default + 1 if isinstance(default, int) else default + 0.25) if default is not None else (low or 16)
    return ([flag.names[0], str(number)], number)


def _plain(value: typing.Any) -> typing.Any:
    return value.value if isinstance(value, enum.Enum) else value


def _get(job: JobSpec, field: str) -> typing.Any:
    value: typing.Any = job
    for part in field.split("."):
        value = getattr(value, part)
    return _plain(value)


@pytest.mark.parametrize("field", [flag.field for flag in JOB_FLAGS])
def test_each_generated_flag_reaches_the_job_spec_over_the_job_file(field, tmp_path):
    from jobs.cli import build_parser, job_from_args

    # The file sets every field to its default, so the flag, not a default, is what the spec shows.
    (tmp_path / "job.yaml").write_text("manifest: m.parquet\noutput: {uri: out}\n")
    words, expected = example_value(field)
    base = ["render", "--job", str(tmp_path / "job.yaml")]
    if field == "model.quantize":  # fp8 renders on GPUs only (JobSpec refuses it on CPU)
        base += ["--gpus-per-replica", "1"]
    # C2PA signing takes a certificate and its key together (ProvenanceSpec refuses one alone)
    if field == "provenance.c2pa_certificate":
        words += ["--c2pa-key", "signer.key"]
    if field == "provenance.c2pa_key":
        words += ["--c2pa-certificate", "signer.pem"]
    # the aesthetic predictor and best-of-n need the CLIP model that scores (QualitySpec refuses them alone)
    if field in ("quality.aesthetic", "quality.keep_by"):
        words += ["--clip", "clip-vit-large-patch14"]
    job = job_from_args(build_parser().parse_args([*base, *words]))
    assert _get(job, field) == expected
    before = job_from_args(build_parser().parse_args(base))
    assert _get(before, field) != expected


def test_todays_flag_names_still_work(tmp_path):
    from jobs.cli import build_parser, job_from_args

    args = build_parser().parse_args([
        "render", "m.parquet", "out", "--model", "flux.1-dev", "--replicas", "3", "--batch-size", "2",
        "--gpus-per-replica", "auto", "--cpus-per-replica", "2", "--width", "512", "--height", "256",
        "--steps", "8", "--guidance", "2.5", "--format", "webp", "--max-retries", "1", "--max-renderer-deaths",
        "2", "--commit-seconds", "5", "--no-batch-invariant", "--ray-address", "auto", "--revision", "abc",
        "--dtype", "fp16", "--storage-option", "anon=true", "--new-version", "--allow-non-empty-output",
        "--rerender-changed", "--no-progress"])
    job = job_from_args(args)
    assert (job.model.name, job.replicas, job.batch_size, job.gpus_per_replica, job.cpus_per_replica) == (
        "flux.1-dev", 3, 2, "auto", 2)
    assert (job.defaults.width, job.defaults.height, job.defaults.steps, job.defaults.guidance) == (512, 256, 8, 2.5)
    assert (_plain(job.defaults.output_format), job.max_retries, job.max_renderer_deaths, job.commit_seconds) == (
        "webp", 1, 2, 5.0)
    assert (job.batch_invariant, job.ray_address, job.model.revision, job.model.dtype) == (False, "auto", "abc",
                                                                                           "fp16")
    assert job.storage_options == {"anon": True} == job.output.storage_options
    assert (args.new_version, args.allow_non_empty_output, args.rerender_changed, args.no_progress) == (
        True, True, True, True)


def test_validate_takes_the_model_flags(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a cat", "adapters": [{"name": "style"}]}])
    bad = call_cli(capsys, "validate", str(manifest), "--model", "flux.1-dev")
    assert bad.returncode == 1
    good = call_cli(capsys, "validate", str(manifest), "--model", "flux.1-dev", "--adapter", "style=/m/s.safetensors")
    assert good.returncode == 0, good.stdout + good.stderr


# --- --job alone ---------------------------------------------------------------------------------------------

def test_render_with_only_a_job_file_renders(tmp_path, tiny_model, ray_cluster, capsys, monkeypatch):
    from tests.helpers import assert_images_match_metadata, session_cluster_env

    for name, value in session_cluster_env(ray_cluster).items():
        monkeypatch.setenv(name, value)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat", "width": 64, "height": 64}])
    (tmp_path / "job.yaml").write_text(f"manifest: {manifest}\noutput: {tmp_path / 'out'}\n"
                                       f"model: {{name: {tiny_model}}}\n")

    result = call_cli(capsys, "render", "--job", str(tmp_path / "job.yaml"), "--no-progress")

    assert result.returncode == 0, result.stderr[-2000:]
    assert len(assert_images_match_metadata(str(tmp_path / "out"))) == 1


@pytest.mark.parametrize(("yaml_text", "words", "fragments"), [
    ("output: {uri: out}\n", [], ["MANIFEST", "manifest:"]),
    ("manifest: m.parquet\n", [], ["OUTPUT", "output:"]),
    ("model: {name: x}\n", [], ["MANIFEST", "manifest:"]),
])
def test_a_missing_manifest_or_output_names_the_positional_and_the_job_key(yaml_text, words, fragments, tmp_path,
                                                                          capsys):
    (tmp_path / "job.yaml").write_text(yaml_text)
    assert_one_line_error(call_cli(capsys, "render", "--job", str(tmp_path / "job.yaml"), *words), *fragments)


def test_without_a_job_file_render_still_needs_both_positionals(capsys):
    assert_one_line_error(call_cli(capsys, "render", "m.parquet"), "OUTPUT")


def test_a_lone_positional_is_the_output_when_the_job_file_holds_the_manifest(tmp_path):
    from jobs.cli import build_parser, job_from_args

    (tmp_path / "job.yaml").write_text("manifest: m.parquet\n")
    job = job_from_args(build_parser().parse_args(["render", "--job", str(tmp_path / "job.yaml"), "there"]))
    assert (job.manifest, job.output.uri) == ("m.parquet", "there")


# --- README ---------------------------------------------------------------------------------------------------

def test_readmes_flags_table_is_the_one_generated_from_the_spec():
    readme = (Path(REPO) / "README.md").read_text()
    found = re.search(r"<!-- flags table: begin.*?-->\n(.*?)<!-- flags table: end -->", readme, re.S)
    assert found, "README.md has no flags table between its markers"
    assert found.group(1).strip() == flags_markdown().strip(), "regenerate it: python -m jobs.flags"
