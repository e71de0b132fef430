"""Private diffusers and torch names fluxbatch still uses, each checked against the installed versions, and our own
copies of the small math diffusers keeps private, checked against diffusers' output: an upgrade that moves one
fails here, not in a user's run. (Private Ray calls: tests/test_ray_private.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "flux_worker", "pipeline", "jobs")
# Every private diffusers or torch name a module of ours uses, and why there is no public way yet.
ALLOWED = {
    "flux_worker/tensor_parallel_rank.py": {
        "_resolve_tp_plan", "_styles",  # diffusers' apply_tensor_parallel refuses a CPU mesh; its two steps, used alone
        "_tp_plan",  # the transformer class's own tensor-parallel plan: diffusers' only description of it
    },
    "flux_worker/memory_plan.py": {"_tp_plan"},  # which parameters a tensor-parallel rank holds a share of
    "flux_worker/tensor_parallel.py": {"_tp_plan"},  # named in its docstring
    "flux_worker/__init__.py": {"_pytree"},  # torch.utils._pytree's logger, quieted: a name, not an API
    "flux_worker/fast_path.py": {"_dynamo"},  # torch._dynamo.config.cache_size_limit: no public setting
    "flux_worker/cold_start.py": {"_dynamo"},  # torch._dynamo.utils.counters: the one count of inductor reuse
}
PRIVATE = re.compile(r"(?:torch|diffusers)(?:\.\w+)*\.(_[a-z]\w*)|\b(_tp_plan|_resolve_tp_plan|_styles)\b|"
                     r"\bpipe\.(_[a-z]\w*)")


def test_no_module_names_a_private_diffusers_or_torch_name_it_is_not_listed_for():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            allowed = ALLOWED.get(str(path.relative_to(REPO)), set())
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for match in PRIVATE.finditer(line):
                    name = next(group for group in match.groups() if group)
                    if name not in allowed:
                        found.append(f"{path.relative_to(REPO)}:{number}: {name}: {line.strip()}")
    assert not found, "private diffusers or torch names outside their listed module:\n" + "\n".join(found)


def test_private_names_fluxbatch_relies_on_still_exist():
    import diffusers
    from diffusers.hooks import tensor_parallel
    from torch._dynamo import config
    from torch._dynamo.utils import counters

    assert callable(tensor_parallel._resolve_tp_plan) and callable(tensor_parallel._styles)
    for name in ("FluxTransformer2DModel", "Flux2Transformer2DModel"):
        assert isinstance(getattr(diffusers, name)._tp_plan, dict), name
    assert isinstance(config.cache_size_limit, int)
    assert "inductor" in counters or hasattr(counters, "__getitem__")


@pytest.mark.parametrize("height, width", [(64, 64), (64, 128), (96, 32)])
def test_our_flux1_unpacking_equals_flux_pipelines(height, width):
    from diffusers import FluxPipeline

    from flux_worker.latents import unpack_flux1

    tokens = torch.randn(2, (height // 16) * (width // 16), 64)
    assert torch.equal(unpack_flux1(tokens, height, width, 8), FluxPipeline._unpack_latents(tokens, height, width, 8))


@pytest.mark.parametrize("grid", [(4, 4), (2, 6), (5, 3)])
def test_our_flux2_unpacking_equals_flux2_pipelines(grid):
    from diffusers import Flux2Pipeline

    from flux_worker.latents import unpack_flux2, unpatchify_flux2

    height, width = grid
    tokens = torch.randn(2, height * width, 128)
    ids = Flux2Pipeline._prepare_latent_ids(torch.empty(2, 0, height, width))
    theirs = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    assert torch.equal(unpack_flux2(tokens, height, width), theirs)
    assert torch.equal(unpatchify_flux2(theirs), Flux2Pipeline._unpatchify_latents(theirs))
