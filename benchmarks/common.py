"""What the CPU benchmarks share: the bench-size model, manifests, the plain diffusers loop, a fluxbatch run.

Rates are images per second. "Steady" leaves out model load and actor start-up: for fluxbatch it spans
the first image's start to the last image's finish in the metadata; for the plain loop, its render loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FLUXBATCH = [PYTHON, "-m", "jobs.cli"]
SIDE, STEPS = 256, 4  # of every manifest row here


def bench_model(folder: Path) -> Path:
    """The `bench`-size offline model, built once with `fluxbatch model build --size bench`."""
    if not (folder / "model_index.json").is_file():
        run([*FLUXBATCH, "model", "build", str(folder), "--size", "bench"])
    return folder


def write_manifest(path: Path, prompts: list[str], num_images: int = 1, first_seed: int = 1000) -> Path:
    """One row per prompt, 256x256, 4 steps, an explicit seed so the plain loop can use the same one."""
    rows = [{"id": f"row-{i:05d}", "prompt": p, "width": SIDE, "height": SIDE, "steps": STEPS,
             "seed": first_seed + 100 * i, "num_images": num_images} for i, p in enumerate(prompts)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prompts(count: int) -> list[str]:
    words = "red blue cat owl fox river dawn city forest lamp harbour storm glass tower".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) + f" {i}" for i in range(count)]


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run a command from the repository root; its wall seconds."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, **(env or {})},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def plain_loop(model: Path, manifest: Path, out: Path) -> dict[str, float]:
    """Run the plain diffusers loop in a fresh process (like fluxbatch's); its wall, load and loop seconds."""
    start = time.perf_counter()
    done = subprocess.run([PYTHON, str(Path(__file__).with_name("plain_loop.py")), str(model), str(manifest),
                           str(out)], cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return {"wall": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def fluxbatch_render(manifest: Path | str, output: str, model: Path, *flags: str,
                     env: dict[str, str] | None = None) -> tuple[float, pa.Table]:
    """`fluxbatch render` with one replica in a fresh process; its wall seconds and its metadata."""
    wall = run([*FLUXBATCH, "render", str(manifest), output, "--model", str(model), "--replicas", "1",
                "--no-progress", *flags], env={"FLUXBATCH_WORKER_LOGS": "0", **(env or {})})
    from flux_worker.storage import filesystem
    from pipeline.store import ledger

    storage = None
    if env and "AWS_ENDPOINT_URL" in env:  # read the run back from the same object store
        storage = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                   "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}}
    fs, root = filesystem(output, storage)
    table = ledger.read_table(fs, root, "metadata")
    assert table is not None, f"no metadata in {output}"
    return wall, table


def steady_rate(metadata: pa.Table) -> float:
    """Images per second from the first image's start to the last image's finish."""
    rows = metadata.select(["started_at", "finished_at"]).to_pylist()
    first = min(r["started_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    return len(rows) / (last - first).total_seconds()


def spread(values: list[float]) -> str:
    """`min-max` of the rounds, for the table."""
    return f"{min(values):.3f}-{max(values):.3f}"


def add_rounds_flag(parser: Any) -> None:
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the compared paths this many times, interleaved; the table shows medians")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table, ready to paste into benchmarks/README.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def machine() -> str:
    """What ran the benchmark, for the README's record."""
    import platform

    import torch

    return (f"{platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
