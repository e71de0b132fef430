"""`fluxbatch validate` only reads a manifest: it starts in well under a second, without torch, diffusers or Ray."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import write_manifest
from tests.own_ray import REPO

HEAVY = ("torch", "diffusers", "ray")


def modules_loaded_by(*args: str) -> set[str]:
    """Run `fluxbatch ARGS` in a fresh interpreter and return which heavy modules it imported."""
    code = ("import sys\nfrom jobs.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    line = [x for x in result.stdout.splitlines() if x.startswith("LOADED")][-1]
    return set(eval(line.removeprefix("LOADED ")))  # noqa: S307 - our own printed list


def test_validate_imports_no_torch_diffusers_or_ray(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a cat", "width": 1000}])
    assert modules_loaded_by("validate", str(manifest), "--model", "flux.1-dev") == set()

