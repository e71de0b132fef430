"""The compile cache carries torch.compile's work from one process (a renderer actor, another node) to the next.

Each "actor" here is a fresh Python process with its own empty inductor disk cache, as on a new node,
so the only way it can skip inductor's codegen is the shared cache blob.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flux_worker.compile_cache import CompileCache, CompileCacheStats, _wrap

# A small compiled module stands in for the transformer's blocks (the renderer's own use of the cache, with a
# real pipeline, is covered by tests/test_cold_start.py): the cache's work is the same, in seconds, not minutes.
ACTOR = textwrap.dedent("""
    import json, logging, sys
    import torch
    from torch._dynamo.utils import counters
    from flux_worker.compile_cache import CompileCache, cache_identity

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    uri = sys.argv[1]
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    cache = CompileCache(uri, cache_identity(block, torch.float32, "cpu", {"compile": True}))
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with cache.around_first_call((4, 64)), torch.inference_mode():
        compiled(torch.randn(4, 64))
    print(json.dumps({"loaded": cache.stats.loaded, "ignored": cache.stats.ignored, "saved": cache.stats.saved,
                      "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}))
""")


def run_actor(uri: str, inductor_dir: Path, env_extra: dict[str, str] | None = None):
    """One renderer-like process on a 'fresh node' (its own empty inductor cache); returns (stats, log)."""
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), **(env_extra or {})}
    done = subprocess.run([sys.executable, "-c", ACTOR, uri], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture
def blobs(tmp_path) -> Path:
    return tmp_path / "compile-cache"


@pytest.mark.slow
def test_a_fresh_node_loads_the_first_actors_compiled_code_and_a_corrupt_blob_is_ignored_and_replaced(
        blobs, tmp_path):
    first, _ = run_actor(str(blobs), tmp_path / "node-a")
    assert first == {**first, "loaded": 0, "saved": 1, "hits": 0}
    assert first["misses"] > 0
    (blob,) = blobs.glob("*.bin")

    second, log = run_actor(str(blobs), tmp_path / "node-b")
    assert second == {**second, "loaded": 1, "ignored": 0, "saved": 0, "misses": 0}
    assert second["hits"] == first["misses"]  # every graph the first actor built, the second read back
    assert "loaded" in log and list(blobs.glob("*.bin")) == [blob]

    good = blob.read_bytes()
    blob.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk on a tool that writes in place
    third, log = run_actor(str(blobs), tmp_path / "node-c")
    assert third == {**third, "loaded": 0, "ignored": 1, "saved": 1}
    assert "ignoring compile cache" in log and "checksum mismatch" in log
    assert blob.read_bytes() != good[: len(good) // 2]  # replaced by a whole blob again


def test_a_blob_written_by_another_torch_under_the_same_name_is_ignored(blobs, caplog):
    mine = CompileCache(str(blobs), {"torch": torch.__version__, "device": "cpu-x86_64"})
    theirs = CompileCache(str(blobs), {"torch": "1.0.0", "device": "cpu-x86_64"})
    blobs.mkdir()
    path = Path(mine.path_of(mine.key((1, 64, 64))))
    path.write_bytes(_wrap(b"their kernels", theirs.key((1, 64, 64))))

    with mine.around_first_call((1, 64, 64)):
        pass

    assert mine.stats == CompileCacheStats(loaded=0, ignored=1, saved=0)  # nothing compiled, nothing to save
    assert "written for another torch" in caplog.text
    assert path.read_bytes() == _wrap(b"their kernels", theirs.key((1, 64, 64)))


def test_compile_cache_location_is_not_part_of_the_job_identity():
    from schemas import JobSpec

    base = {"manifest": "m.parquet", "output": {"uri": "out"}}
    one = JobSpec.model_validate({**base, "model": {"compile": True}})
    two = JobSpec.model_validate({**base, "model": {"compile": True, "compile_cache": "s3://team/cache"}})
    assert one.identity() == two.identity()
