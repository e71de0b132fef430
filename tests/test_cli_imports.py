"""`fluxbatch validate` only reads a manifest, and `fluxbatch plan` for a known model only reads recorded parameter
counts: both start in well under a second, without torch, diffusers, transformers or Ray. `fluxbatch render`'s
driver needs Ray, never torch or diffusers: only the renderer actors load a model."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import write_manifest
from tests.own_ray import REPO

HEAVY = ("torch", "diffusers", "transformers", "ray")


def modules_loaded_by(*args: str) -> set[str]:
    """Run `fluxbatch ARGS` in a fresh interpreter and return which heavy modules it imported."""
    return run_cli(*args)[0]


def run_cli(*args: str, env: dict[str, str] | None = None, cli: str = "jobs.cli") -> tuple[set[str], str]:
    """Run `fluxbatch ARGS` in a fresh interpreter: the heavy modules it imported, and what it printed. `cli`:
    tests.stand_in_cli renders with the stand-in renderer (what the driver imports does not depend on it)."""
    code = (f"import sys\nfrom {cli} import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=env)
    *printed, line = result.stdout.splitlines()
    assert line.startswith("LOADED"), result.stdout + result.stderr
    return set(eval(line.removeprefix("LOADED "))), "\n".join(printed)  # noqa: S307 - our own printed list


def test_validate_imports_no_torch_diffusers_or_ray(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a cat", "width": 1000}])
    assert modules_loaded_by("validate", str(manifest), "--model", "flux.1-dev") == set()


def test_a_render_driver_imports_no_torch_diffusers_or_transformers(tmp_path, tiny_model, ray_cluster):
    from tests.helpers import metadata, session_cluster_env

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "cup", "prompt": "a cup", "width": 64, "height": 64}])
    loaded, printed = run_cli("render", str(manifest), str(tmp_path / "out"), "--model", str(tiny_model),
                              "--no-progress", env=session_cluster_env(ray_cluster), cli="tests.stand_in_cli")
    assert "1 rendered" in printed
    assert loaded == {"ray"}
    assert metadata(str(tmp_path / "out")).num_rows == 1


# What `fluxbatch plan` printed before the counts were recorded, when it built every component on the meta device.
FLUX1_DEV_ON_24GB = """\
model flux.1-dev: bf16, 1024x1024, batch 1, card 22.4 GiB (21.4 GiB usable)
tensor-parallel degree: 2 GPUs per replica
component             params     weights  where
transformer          11.901B    22.2 GiB  GPU 0-1 (sharded)
text_encoder          0.123B     0.2 GiB  CPU (offload)
text_encoder_2        4.762B     8.9 GiB  CPU (offload)
vae                   0.084B     0.2 GiB  GPU 0
predicted peak per GPU: GPU 0: 17.3 GiB, GPU 1: 15.5 GiB
host memory for offloaded weights: 9.1 GiB per replica
offloaded text_encoder: ~0.019 s of host compute per new prompt (repeated prompts are cached), at 1 TFLOP/s
offloaded text_encoder_2: ~4.9 s of host compute per new prompt (repeated prompts are cached), at 1 TFLOP/s"""

KNOWN_MODELS_ON_24GB_AND_80GB = """\
| model | card | GPUs per replica | text encoders | VAE | predicted peak per GPU | host memory |
| --- | --- | --- | --- | --- | --- | --- |
| flux.1-dev | 24GB | 2 | CPU (offload) | GPU 0 | 17.3 / 15.5 GiB | 9.1 GiB |
| flux.1-dev | 80GB | 1 | GPU 0 | GPU 0 | 34.4 GiB | - |
| flux.1-schnell | 24GB | 2 | CPU (offload) | GPU 0 | 17.3 / 15.4 GiB | 9.1 GiB |
| flux.1-schnell | 80GB | 1 | GPU 0 | GPU 0 | 34.4 GiB | - |
| flux.2-dev | 24GB | 4 | CPU (offload) | GPU 0 | 19.3 / 17.6 / 17.6 / 17.6 GiB | 44.7 GiB |
| flux.2-dev | 80GB | 1 | CPU (offload) | GPU 0 | 63.2 GiB | 44.7 GiB |"""


def test_plan_for_a_known_model_imports_no_torch_diffusers_transformers_or_ray_and_prints_the_same_plan():
    loaded, printed = run_cli("plan", "--model", "flux.1-dev", "--gpu-memory", "24GB")
    assert loaded == set()
    assert printed == FLUX1_DEV_ON_24GB


def test_plan_table_of_the_known_models_imports_no_torch_diffusers_transformers_or_ray():
    loaded, printed = run_cli("plan", "--model", "flux.1-dev,flux.1-schnell,flux.2-dev", "--table", "24GB,80GB")
    assert loaded == set()
    assert printed == KNOWN_MODELS_ON_24GB_AND_80GB
