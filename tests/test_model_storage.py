"""Models from object storage: `model mirror`, a render from an s3:// model, the node cache (one download per node,
never a half-written or altered copy), pre-flight of a model URL, and the hub token's way to the renderers.

All on moto's S3 server; the fetches run as separate processes where the point is several renderers of one node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_worker.model_cache import ModelCacheError, cache_key, fetch_model
from flux_worker.model_folder import CHECKSUM_FILE, ModelFolder
from tests.conftest import write_manifest
from tests.fault_proxy import FaultProxy
from tests.test_cli import call_cli

REPO = Path(__file__).resolve().parents[1]
FETCH = ("import json, sys; from flux_worker.model_cache import fetch_model; "
         "path, downloaded = fetch_model(sys.argv[1], {}, sys.argv[2]); print(json.dumps([str(path), downloaded]))")


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def s3_model(s3_env, bucket, tiny_model, capsys) -> str:
    """The tiny model mirrored to moto's S3 with `fluxbatch model mirror`."""
    url = f"s3://{bucket}/models/tiny"
    result = call_cli(capsys, "model", "mirror", str(tiny_model), url)
    assert result.returncode == 0, result.stderr
    return url


def fetch_in_process(url: str, cache: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FETCH, url, str(cache)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env, "PYTHONPATH": str(REPO)})


def test_mirror_copies_the_folder_with_its_checksums_and_says_how_to_render_from_it(s3_env, bucket, tiny_model,
                                                                                     capsys):
    url = f"s3://{bucket}/models/tiny"
    result = call_cli(capsys, "model", "mirror", str(tiny_model), url)
    assert result.returncode == 0, result.stderr
    assert f"render with --model {url}" in result.stdout
    mirrored = ModelFolder(url)
    sums = mirrored.read_json(CHECKSUM_FILE)["files"]
    local = ModelFolder(tiny_model)
    assert {rel: entry["size"] for rel, entry in sums.items()} == local.files
    assert mirrored.fingerprint() == local.fingerprint()  # one model, wherever it is copied

    again = call_cli(capsys, "model", "mirror", str(tiny_model), url)
    assert f"0 copied, {len(local.files)} already there" in again.stdout


def test_a_mirror_cut_short_resumes_where_it_stopped(tmp_path, tiny_model):
    from flux_worker.model_mirror import PROGRESS_FILE, mirror

    dest = tmp_path / "mirror"
    lines: list[str] = []

    def stop_after_three(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third file

    with pytest.raises(KeyboardInterrupt):
        mirror(str(tiny_model), str(dest), say=stop_after_three)
    assert not (dest / CHECKSUM_FILE).exists() and (dest / PROGRESS_FILE).exists()  # a mirror under way
    done = mirror(str(tiny_model), str(dest), say=lambda line: None)
    assert done.copied == done.files - 3
    assert not (dest / PROGRESS_FILE).exists()
    assert ModelFolder(dest).fingerprint() == ModelFolder(tiny_model).fingerprint()


def test_mirror_refuses_a_pickle_checkpoint_in_one_line(tmp_path, tiny_model, capsys):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    result = call_cli(capsys, "model", "mirror", str(folder), str(tmp_path / "dest"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {folder}/transformer/diffusion_pytorch_model.bin is a pickle-format checkpoint; fluxbatch loads "
        "safetensors only. Convert it (e.g. `safetensors.torch.save_file(torch.load(..., weights_only=True), "
        "...)`)"]
    assert not (tmp_path / "dest").exists()


@pytest.mark.slow
def test_a_render_from_an_s3_model_is_the_same_job_as_from_its_local_folder(s3_model, tmp_path, tiny_model,
                                                                            ray_cluster, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red cat", "width": 64, "height": 64},
                                                       {"id": "b", "prompt": "a blue dog", "width": 64, "height": 64}])
    out = tmp_path / "out"
    cache = tmp_path / "node-cache"
    first = call_cli(capsys, "render", str(manifest), str(out), "--model", s3_model, "--model-cache-dir", str(cache),
                     "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "2 rendered" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_source"] == s3_model  # the ledger says where this run loaded the weights from
    assert summary["model_revision"] == ModelFolder(tiny_model).fingerprint()
    assert (cache / cache_key(s3_model) / "complete.json").is_file()

    again = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress")
    assert again.returncode == 0, again.stderr  # the local copy is the same model: nothing to render
    assert "0 rendered, 2 already done" in again.stdout


def test_four_renderers_on_one_node_download_the_model_once(s3_model, s3_server, tmp_path, tiny_model):
    cache = tmp_path / "cache"
    with FaultProxy(s3_server, failure_rate=0.0) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url}
        fetches = [fetch_in_process(s3_model, cache, env) for _ in range(4)]
        answers = [fetch.communicate(timeout=240) for fetch in fetches]
    assert all(fetch.returncode == 0 for fetch in fetches), [err[-2000:] for _, err in answers]
    results = [json.loads(out) for out, _ in answers]
    assert len({path for path, _ in results}) == 1
    assert sorted(downloaded for _, downloaded in results) == [False, False, False, True]
    weights = sum(size for method, path, size in proxy.log
                  if method == "GET" and path.endswith(".safetensors"))
    assert weights == sum(p.stat().st_size for p in tiny_model.rglob("*.safetensors"))  # each byte read once


def test_a_killed_download_is_never_loaded(s3_model, s3_server, tmp_path):
    cache = tmp_path / "cache"
    with FaultProxy(s3_server, failure_rate=0.0, get_delay=1.0) as proxy:
        fetch = fetch_in_process(s3_model, cache, {"AWS_ENDPOINT_URL": proxy.url})
        deadline = time.monotonic() + 120
        while not list(cache.glob("*.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(fetch.pid, signal.SIGKILL)  # mid-download
        fetch.communicate()
    assert list(cache.glob("*.partial-*")), "the kill should have landed mid-download"
    assert not (cache / cache_key(s3_model)).exists()  # nothing a renderer would load

    path, downloaded = fetch_model(s3_model, {}, str(cache))
    assert downloaded and not list(cache.glob("*.partial-*"))  # the partial copy is swept, never used
    assert ModelFolder(path).fingerprint() == ModelFolder(s3_model).fingerprint()


def test_a_file_altered_in_the_cache_is_caught_by_its_checksum_and_fetched_again(s3_model, tmp_path, tiny_model):
    cache = tmp_path / "cache"
    path, downloaded = fetch_model(s3_model, {}, str(cache))
    assert downloaded
    assert fetch_model(s3_model, {}, str(cache)) == (path, False)
    weights = next(path.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))

    assert fetch_model(s3_model, {}, str(cache)) == (path, True)
    original = tiny_model / weights.relative_to(path)
    assert weights.read_bytes() == original.read_bytes()


def test_a_cache_without_room_for_the_model_is_one_line_before_any_download(s3_model, small_disk, tiny_model):
    need = sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    with pytest.raises(ModelCacheError, match=rf"^model {s3_model} needs {need / 2**20:.1f} MiB in the model cache "
                                              rf"{small_disk}, which has 0.2 MiB free: free space, or set "
                                              r"model.cache_dir \(--model-cache-dir\) to a larger disk$"):
        fetch_model(s3_model, {}, str(small_disk))
    assert [p.name for p in small_disk.iterdir()] == [f"{cache_key(s3_model)}.lock"]


def test_a_source_changed_since_its_mirror_is_one_line_and_nothing_is_cached(s3_model, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    target = next(p for p in fs.find(s3_model.removeprefix("s3://")) if p.endswith(".safetensors"))
    fs.pipe_file(target, b"not the same weights")
    cache = tmp_path / "cache"
    with pytest.raises(ModelCacheError, match=r"changed since its fluxbatch-checksums.json was written: "
                                              r"\S+\.safetensors is 20 bytes, the checksum file says \d+"):
        fetch_model(s3_model, {}, str(cache))
    assert not (cache / cache_key(s3_model)).exists()


def test_a_model_url_that_is_no_pipeline_is_refused_before_anything_is_written(s3_env, bucket, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat"}])
    out = tmp_path / "out"
    result = call_cli(capsys, "render", str(manifest), str(out), "--model", f"s3://{bucket}/models/none",
                      "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: s3://{bucket}/models/none is not a diffusers pipeline folder (no model_index.json); build one with "
        "`fluxbatch model build PATH` or give a preset name"]
    assert not out.exists()


def test_the_hub_token_reaches_renderers_in_their_arguments_never_their_environment_or_repr(monkeypatch):
    from pipeline.render_stage import render_stage
    from pipeline.run import worker_env
    from tests.helpers import make_job

    secret = "hf_test_token_never_printed"
    monkeypatch.setenv("HF_TOKEN", secret)
    job = make_job("m.parquet", "out", "black-forest-labs/FLUX.1-schnell")
    stage = render_stage(job, _one_cpu_replica(), env_vars=worker_env())
    assert stage.options.hub_token == secret
    assert secret not in repr(stage.options) and secret not in json.dumps(stage.env_vars)
    assert secret not in json.dumps(stage.options.model_dump(exclude={"hub_token", "image_counter"}))


def _one_cpu_replica():
    from pipeline.cluster.resources import ReplicaAsk

    return ReplicaAsk(gpus=0, cpus=1, replicas=1, threads=1)


@pytest.fixture
def gated_hub(monkeypatch, tmp_path):
    """A hub on loopback holding `owner/gated`, gated: its info is public, its files need an accepted licence (403
    GatedRepo, as huggingface.co answers)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants

    class Gated(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            gated = self.path.split("?")[0].endswith("/auth-check")
            self.send_response(403 if gated else 200)
            if gated:
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", "Access to model owner/gated is restricted.")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "gated"}' if gated else b'{"id": "owner/gated", "sha": "0" , "siblings": []}')

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file of this machine's user
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at its import
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("gated_hub")
@pytest.mark.parametrize("token", [None, "hf_not_allowed_never_printed"])
def test_a_gated_model_without_a_token_that_can_read_it_is_one_line_before_ray_starts(token, tmp_path, capsys,
                                                                                      monkeypatch):
    import pipeline.run

    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(pipeline.run, "_ensure_ray", lambda *_: pytest.fail("Ray started"))
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat"}])
    result = call_cli(capsys, "render", str(manifest), str(tmp_path / "out"), "--model", "owner/gated",
                      "--no-progress")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: model 'owner/gated' is not in the local Hugging Face cache")
    assert ("the token here cannot read it: accept its licence" if token else
            "says it is gated: accept its licence there and set HF_TOKEN") in line
    assert token is None or token not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_mirror_of_a_hub_model_the_hub_cannot_give_is_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at its import
    result = call_cli(capsys, "model", "mirror", "owner/no-such-model", str(tmp_path / "dest"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot download owner/no-such-model from the hub: ")
    assert not (tmp_path / "dest").exists()


def test_mirror_of_a_mistyped_folder_names_the_folder_not_the_hub(tmp_path, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    result = call_cli(capsys, "model", "mirror", "models/tinyy", str(tmp_path / "dest"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: SOURCE models/tinyy: no such folder here ({tmp_path}/models/tinyy); give a model folder, a model "
        "URL, a preset or a hub id"]


def test_mirror_into_a_dest_holding_another_models_mirror_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)  # the same sizes: by size alone its files would pass for this one's
    dest = tmp_path / "dest"
    assert call_cli(capsys, "model", "mirror", str(tiny_model), str(dest)).returncode == 0
    result = call_cli(capsys, "model", "mirror", str(other), str(dest))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: DEST {dest} holds a mirror of {str(tiny_model.resolve())!r}, not of {str(other.resolve())!r}; "
        "mirror into another DEST (fluxbatch deletes none of its files)"]


def test_a_model_cache_this_machine_cannot_write_is_one_line_before_a_local_ray_starts(tmp_path, tiny_model):
    from tests.test_cli import run_cli

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat", "width": 64, "height": 64}])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    result = run_cli("render", str(manifest), str(tmp_path / "out"), "--model", f"file://{tiny_model}",
                     "--model-cache-dir", str(blocked / "cache"), "--no-progress", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot use the model cache {blocked}/cache: Not a directory; set model.cache_dir "
        "(--model-cache-dir) or $FLUXBATCH_MODEL_CACHE to a folder this node can write"]
    assert not (tmp_path / "out").exists()
