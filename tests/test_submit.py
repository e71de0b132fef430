"""`fluxbatch submit`: a job spec runs on a real Ray head (started here, with token auth) via the Jobs API."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.submit import SHIPPED_ENV, SubmitError, connect, prepare, read_token
from tests.conftest import free_port, write_manifest
from tests.own_ray import REPO

VENV_BIN = Path(sys.executable).parent


@dataclass
class Head:
    address: str
    token: str


def stop_head(temp_dir: str) -> None:
    """Stop the processes of this head only (each runs with our temp dir in its command line), by pid."""
    ours = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and any(temp_dir in part for part in process.info["cmdline"] or ()):
            ours.append(process)
    for process in ours:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def start_head(token: str) -> tuple[str, str]:
    """`ray start --head` on free ports; (temp dir, dashboard address). A port found free can be taken by another
    process (the other test process's Ray cluster) before Ray binds it, so a start refused for a taken port is
    retried on fresh ports."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for attempt in itertools.count(1):
        temp_dir = tempfile.mkdtemp(prefix="fbhead-", dir="/tmp")  # short: Ray's socket paths have a length limit
        dashboard = free_port()
        command = [str(VENV_BIN / "ray"), "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
                   f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if started.returncode == 0:
            return temp_dir, f"http://127.0.0.1:{dashboard}"
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        taken = "already occupied" in started.stderr or "already in use" in started.stderr
        if not taken or attempt == 4:
            raise AssertionError(f"ray start failed:\n{started.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own (own temp dir, ports and token); stopped by its own pids."""
    token = secrets.token_hex(32)
    temp_dir, address = start_head(token)
    try:
        yield Head(address, token)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**env, "PYTHONPATH": str(REPO)})


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Ray token or address, and a HOME with no ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), **extra}


def job_folder(tmp_path: Path, model: Path, output: Path) -> Path:
    folder = tmp_path / "job"
    write_manifest(folder / "manifest.parquet", [
        {"id": "lamp", "prompt": "a brass lamp", "width": 64, "height": 64, "num_images": 2},
        {"id": "mug", "prompt": "a speckled mug", "width": 64, "height": 64},
    ])
    spec = {"manifest": "manifest.parquet", "output": {"uri": str(output)}, "model": {"name": str(model)}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder


@pytest.mark.slow
def test_submit_runs_a_render_job_on_a_ray_cluster_and_reports_its_success(tmp_path, tiny_model, ray_head,
                                                                          monkeypatch):
    # An S3 user's usual environment: the region is shipped to the job (SHIPPED_ENV) and is also what the
    # driver inside the job hands its workers; Ray refuses a driver that sets a variable the job already sets.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    out = tmp_path / "out"
    folder = job_folder(tmp_path, tiny_model, out)
    (folder / ".venv").mkdir()
    (folder / ".venv" / "big.bin").write_bytes(b"\0" * 1024)

    result = submit_cli("job/job.yaml", "--address", ray_head.address, cwd=tmp_path,
                        env=clean_env(tmp_path, RAY_AUTH_TOKEN=ray_head.token))

    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "SUCCEEDED" in result.stderr
    assert not re.search(r"\bINFO \S+\.py:\d+ --", result.stderr), result.stderr  # no Ray INFO lines without -v
    assert "3 rendered, 0 already done, 0 failed, 0 bad rows; 3/3 images" in result.stdout  # the job's own log
    assert pq.read_table(out / "metadata").num_rows == 3
    assert len(list((out / "images").rglob("*.png"))) == 3
    job_id = re.search(r"submitted (\S+) to", result.stderr)[1]  # the dashboard's Jobs page names it so
    assert connect(ray_head.address, ray_head.token).get_job_info(job_id).metadata["job_name"] == \
        f"fluxbatch render {out}"


@pytest.mark.slow
def test_submit_without_the_clusters_token_is_refused_with_what_to_do(tmp_path, tiny_model, ray_head):
    job_folder(tmp_path, tiny_model, tmp_path / "out")

    missing = submit_cli("job/job.yaml", "--address", ray_head.address, cwd=tmp_path, env=clean_env(tmp_path))
    (tmp_path / "wrong").write_text("not-the-token\n")
    wrong = submit_cli("job/job.yaml", "--address", ray_head.address, "--token-file", str(tmp_path / "wrong"),
                       cwd=tmp_path, env=clean_env(tmp_path))

    assert missing.returncode == 2
    assert "the cluster requires a token: set RAY_AUTH_TOKEN" in missing.stderr
    assert wrong.returncode == 2
    assert "the cluster refused the token" in wrong.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_failing_job_makes_submit_exit_1(tmp_path, ray_head):
    folder = tmp_path / "job"
    folder.mkdir()
    spec = {"manifest": "missing.parquet", "output": {"uri": str(tmp_path / "out")}, "model": {"name": "nope"}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))

    result = submit_cli("job/job.yaml", "--address", ray_head.address, cwd=tmp_path,
                        env=clean_env(tmp_path, RAY_AUTH_TOKEN=ray_head.token))

    assert result.returncode == 1
    assert "FAILED" in result.stderr


def test_the_spec_folder_is_shipped_without_environments_or_local_output(tmp_path, monkeypatch):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "job.yaml").write_text(yaml.safe_dump({"manifest": "m.parquet", "output": {"uri": "renders/run1"}}))
    for name in SHIPPED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-shipped-unless-asked")

    plain = prepare(folder / "job.yaml")
    asked = prepare(folder / "job.yaml", env_names=["AWS_SECRET_ACCESS_KEY"], command=["synthesize"])

    assert plain.entrypoint == "python -m jobs.cli render m.parquet renders/run1 --job job.yaml --no-progress"
    assert plain.runtime_env["working_dir"] == str(folder)
    assert {".venv", ".git", "/renders/run1"} <= set(plain.runtime_env["excludes"])
    assert plain.runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                             "AWS_DEFAULT_REGION": "eu-west-1"}
    assert asked.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "never-shipped-unless-asked"
    assert asked.entrypoint == "python -m jobs.cli synthesize job.yaml"


def test_a_spec_outside_the_working_dir_or_of_unknown_kind_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "job.yaml").write_text("manifest: m.parquet\noutput: {uri: out}\n")
    (tmp_path / "a" / "odd.yaml").write_text("something: else\n")
    with pytest.raises(SubmitError, match="is not inside the working directory"):
        prepare(tmp_path / "a" / "job.yaml", working_dir=tmp_path / "b")
    with pytest.raises(SubmitError, match="cannot tell which job this spec is"):
        prepare(tmp_path / "a" / "odd.yaml")


def test_token_comes_from_file_option_then_env_then_token_path_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert read_token() == "from-home"
    (tmp_path / "path").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "path"))
    assert read_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_token() == "from-env"
    (tmp_path / "option").write_text("from-option")
    assert read_token(str(tmp_path / "option")) == "from-option"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SubmitError, match="is empty"):
        read_token(str(tmp_path / "empty"))
