"""Compile cache on the bench model: two `fluxbatch render --compile` runs sharing one `--compile-cache` folder.

Each run is its own driver with its own local Ray cluster. The first runs on an empty inductor cache
(TORCHINDUCTOR_CACHE_DIR and Triton's: a cold node). The second runs on another empty one, as on a fresh node,
so it can skip inductor's work only through fluxbatch's compile-cache blob; the third runs on the first one's
node again (the next job on the same machine). Prints each actor's cold start by stage (from
OUTPUT/summary.json), the native kernels each node's cache holds after it, and the ratio of the compile/warm-up
seconds, first over each other (goal: at least 3).

    python benchmarks/bench_compile_cache.py [--images 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FLUXBATCH, ROOT, bench_model, prompts, run, write_manifest  # noqa: E402

STAGES = ("process_start", "model_load", "warmup", "first_image")


def native_kernels(node: Path) -> int:
    """Compiled kernel libraries in a node's inductor cache (C++ on CPU)."""
    return sum(1 for _ in (node / "inductor").rglob("*.so"))


def render_once(model: Path, manifest: Path, out: Path, cache: Path, node: Path) -> dict:
    """One render on a 'fresh node' (`node`: its inductor and Triton caches); its actor's cold-start record."""
    env = {"RAY_ADDRESS": "local", "TORCHINDUCTOR_CACHE_DIR": str(node / "inductor"),
           "TRITON_CACHE_DIR": str(node / "triton")}
    wall = run([*FLUXBATCH, "render", str(manifest), str(out), "--model", str(model), "--compile",
                "--compile-cache", str(cache), "--replicas", "1", "--no-progress"], env=env)
    summary = json.loads((out / "summary.json").read_text())
    [actor] = summary["actors"]
    return {**actor, "wall": round(wall, 1), "native kernels": native_kernels(node)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    model = bench_model(ROOT / ".fluxbatch" / "bench-model")
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        folder = Path(tmp)
        manifest = write_manifest(folder / "m.parquet", prompts(args.images))
        cache = folder / "compile-cache"
        cold = render_once(model, manifest, folder / "out-1", cache, folder / "node-1")
        fresh = render_once(model, manifest, folder / "out-2", cache, folder / "node-2")
        same = render_once(model, manifest, folder / "out-3", cache, folder / "node-1")
        blobs = sorted(p.name for p in cache.glob("*"))
    runs = (("first (cold node)", cold), ("second (same cache, fresh node)", fresh),
            ("third (same cache, the first's node)", same))
    print("| run | " + " | ".join(STAGES) + " | cache hit | inductor hits / misses | native kernels in the node's "
          "cache after | render wall s |")
    print("| --- " * (len(STAGES) + 5) + "|")
    for name, actor in runs:
        print(f"| {name} | " + " | ".join(f"{actor.get(stage)}" for stage in STAGES)
              + f" | {actor.get('compile_cache_hit')} | {actor.get('inductor_cache_hits')} / "
              f"{actor.get('inductor_cache_misses')} | {actor['native kernels']} | {actor['wall']} |")
    print()
    for name, actor in runs[1:]:
        print(f"compile/warm-up, first over {name.split(' ')[0]}: {cold['warmup'] / actor['warmup']:.1f}x (goal 3x)")
    print(f"cache files: {blobs}; machine: {os.cpu_count()} CPUs")
    return {"cold": cold, "fresh node": fresh, "same node": same}


if __name__ == "__main__":
    main()
