"""Shared fixtures: one local Ray cluster per session, an offline tiny model, a moto S3 server on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

# Hermetic: the Ray cluster, object store and model hub of the machine running the tests never reach them
# (a set RAY_ADDRESS would send every render to that cluster, AWS_ENDPOINT_URL every s3:// URL to that endpoint).
# A test that is about such a variable sets it itself (monkeypatch, or a subprocess's env).
for _name in list(os.environ):
    if _name.startswith(("AWS_", "HF_", "HUGGINGFACE_")) or _name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        del os.environ[_name]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with `slow` tests first, so the two test processes finish together instead of one idling while
    the other runs the chaos tests last. `make test` passes `--no-loadscope-reorder`, or xdist would reorder
    modules by their number of tests."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: file order within each part


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    """A real local Ray cluster; 4 logical CPUs and 4 fake GPUs so pools and TP groups can be scheduled.

    Started first in every test process (autouse): a test that renders without asking for it would otherwise
    start a default cluster of its own (this machine's 2 CPUs, no GPUs) that every later test in the process
    would then share."""
    import ray

    if not ray.is_initialized():
        # address="local": always a cluster of our own, never one another process started with `ray start`.
        ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def _stand_in_installed():
    from pipeline import render_stage
    from tests.stand_in import member_classes, stand_in

    renderer = stand_in()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(render_stage, "in_actor", member_classes(renderer, render_stage.in_actor))
        yield renderer


@pytest.fixture(scope="module")
def stand_in_renderer():
    """Every render in this module (the Python API and `fluxbatch` commands run in-process) uses the stand-in
    renderer of tests/stand_in.py: no torch, a replica up in about a second. For tests of the driver (lease,
    ledger, ownership, versions, verify, report), not of the model; a module opts in with
    `pytestmark = pytest.mark.usefixtures("stand_in_renderer")`, and its module-scoped fixtures that render
    ask for it by name. Tensor-parallel stages are left as they are."""
    with _stand_in_installed() as renderer:
        yield renderer


@pytest.fixture
def stand_in_for_this_test():
    """`stand_in_renderer` for one test of a module whose other tests render with the real pipeline."""
    with _stand_in_installed() as renderer:
        yield renderer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight Flux pipeline in the diffusers folder format, built offline."""
    from flux_worker.model_build import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: a real S3 API over HTTP."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto/s3fs at the moto server through the standard AWS_* variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-never-logged")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the moto server; returns its name."""
    import uuid

    import boto3

    name = f"fb-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing-key-id",
                          aws_secret_access_key="testing-secret-never-logged", region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Write rows as a Parquet manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 256 KiB: room for a few 64x64 images and their ledger, not for 30."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)
