"""The memory planner: how many GPUs a replica needs, and where each component of the pipeline lives.

Every figure comes from the models' configs: each component is built on the `meta` device (no memory,
no download) and its parameters counted; the transformer's `_tp_plan` says which of them are split
across the ranks and which every rank keeps whole. For the known models those counts are recorded in
param_counts.json (keyed by component and a hash of its config), so `fluxbatch plan` needs no torch;
`python -m flux_worker.memory_plan --recount` rewrites it, and a test fails when it disagrees with a fresh
count. Activations are estimated from the same configs:

- transformer, per rank: tokens x (4 D replicated + 17 D / N sharded) values, D = heads x head_dim.
  A single-stream block holds the residual, its norm, the all-reduced output and the modulated sum
  whole (4 D), and q, k, v, the attention output, the MLP projection and its activation, and their
  concatenation split over the N ranks (3 D + D + 4 D + 4 D + 5 D = 17 D).
- VAE decode: pixels x (3 x block_out_channels[1] + 2 x block_out_channels[0]) values: the widest
  step, the first full-resolution resnet (its input, norm and activation) next to the upsampled map.
- text encoders: tokens x (4 hidden + 2 ffn), plus T5's attention scores with their position bias.

The peak on a GPU is the weights it holds plus the largest activation of the stages that run there;
`reserve` covers the CUDA context, cuBLAS and NCCL workspaces and allocator slack.

    fluxbatch plan --model flux.1-dev --gpu-memory 24GiB --dtype bf16 --resolution 1024 --batch-size 1
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from flux_worker.families import (  # noqa: F401 - the published configs, re-exported for their tests
    CLIP_L,
    FAMILIES,
    FLUX1_TRANSFORMER,
    FLUX1_VAE,
    FLUX2_TRANSFORMER,
    FLUX2_VAE,
    KLEIN_4B_TRANSFORMER,
    KLEIN_9B_TRANSFORMER,
    MISTRAL_SMALL_3_1,
    QWEN3_4B,
    QWEN3_8B,
    T5_XXL,
    published_configs,
)
from schemas.errors import FluxbatchError

GIB = 2**30
RESERVE_BYTES = 1 * GIB  # CUDA context + cuBLAS/NCCL workspaces + allocator fragmentation, per GPU
MAX_GPUS = 8  # a group never spans nodes, and GPU nodes have at most 8
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# The published configs live in the model table (flux_worker/families.py); named here for the tests that
# count them by hand. KNOWN_MODELS is the table's presets as the planner sees them: configs and text length.
KNOWN_MODELS: dict[str, tuple[dict[str, dict[str, Any]], int]] = {
    preset.name: (family.configs[preset.name], preset.max_sequence_length)
    for family in FAMILIES.values() for preset in family.presets
}
# What an offloaded component costs per image, at this much host compute (a 2-socket server's cores, fp32/bf16).
HOST_FLOPS = 1e12


class PlanError(FluxbatchError, ValueError):
    """The model cannot be planned (unknown name, unreadable folder, a bad memory size)."""


# -- counting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One pipeline component as the planner sees it: parameter counts and the config they came from."""

    name: str
    params: int  # all parameters
    sharded: int  # of which the _tp_plan splits across ranks (transformer only)
    config: dict[str, Any] = field(repr=False, compare=False)

    @property
    def replicated(self) -> int:
        return self.params - self.sharded


def model_configs(model: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The configs of a preset (by name or hub id, from the model table), or read from a local diffusers folder;
    plus its text length."""
    found = published_configs(model)
    if found:
        return found
    from flux_worker.model_folder import ModelFolder
    from flux_worker.presets import resolve_preset

    folder = ModelFolder(model if "://" in model else Path(model).expanduser())  # a local folder or a model URL
    if "model_index.json" not in folder.files:
        known = ", ".join(KNOWN_MODELS)
        raise PlanError(f"{model!r} is neither a known model ({known}) nor a diffusers folder with model_index.json")
    configs = {name: folder.read_json(f"{name}/config.json") for name in ("transformer", *TEXT_ENCODERS, "vae")
               if f"{name}/config.json" in folder.files}
    return configs, resolve_preset(str(folder)).max_sequence_length


def count_component(name: str, config: dict[str, Any]) -> Component:
    """Build the component on the meta device and count its parameters (and the _tp_plan's share)."""
    return _count(name, json.dumps(config, sort_keys=True))


# Counts of every component of KNOWN_MODELS, as _count_on_meta makes them: read instead of importing torch,
# diffusers and transformers (~5 s) for the presets. Package data (pyproject.toml); a test compares it
# with a fresh count, and `python -m flux_worker.memory_plan --recount` rewrites it.
COUNTS_FILE = Path(__file__).with_name("param_counts.json")


def _count_key(name: str, config_json: str) -> str:
    """The file's key for a component: its name (only the transformer's split is counted) and its config's hash."""
    return f"{name} {hashlib.sha256(config_json.encode()).hexdigest()}"


@lru_cache(maxsize=1)
def _recorded_counts() -> dict[str, dict[str, int]]:
    return json.loads(COUNTS_FILE.read_text())


@lru_cache(maxsize=64)
def _count(name: str, config_json: str) -> Component:
    recorded = _recorded_counts().get(_count_key(name, config_json))
    if recorded:
        return Component(name, recorded["params"], recorded["sharded"], json.loads(config_json))
    return _count_on_meta(name, config_json)  # a local folder's own config


def _count_on_meta(name: str, config_json: str) -> Component:
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        module = _build(config)
    params = sum(p.numel() for p in module.parameters())
    sharded = 0
    plan = getattr(type(module), "_tp_plan", None) if name == "transformer" else None  # diffusers' plan only
    if plan:
        from diffusers.hooks.tensor_parallel import resolve_tp_shard_specs

        specs = resolve_tp_shard_specs(module, plan, 1)
        found = dict(module.named_parameters())
        sharded = sum(found[key].numel() for key, spec in specs.items() if spec.dim is not None)
    return Component(name, params, sharded, config)


def _build(config: dict[str, Any]) -> Any:
    if "_class_name" in config:
        import diffusers

        cls = getattr(diffusers, config["_class_name"])
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
    return cls(hf_config)


def count_known_models() -> dict[str, dict[str, Any]]:
    """Count every component of KNOWN_MODELS on the meta device: what COUNTS_FILE must hold."""
    counts = {}
    for configs, _ in KNOWN_MODELS.values():
        for name, config in configs.items():
            config_json = json.dumps(config, sort_keys=True)
            comp = _count_on_meta(name, config_json)
            counts[_count_key(name, config_json)] = {"class": config.get("_class_name") or config["architectures"][0],
                                                     "params": comp.params, "sharded": comp.sharded}
    return dict(sorted(counts.items()))


# -- activations ------------------------------------------------------------------------------------


def image_tokens(config_vae: dict[str, Any], width: int, height: int) -> int:
    """Latent tokens of one image: the VAE's downsampling, then Flux's 2x2 patches."""
    scale = 2 ** (len(config_vae["block_out_channels"]) - 1) * 2
    return (width // scale) * (height // scale)


def transformer_activation_bytes(config: dict[str, Any], tokens: int, batch: int, degree: int,
                                 value_bytes: int) -> int:
    """Peak activations of one transformer forward on one rank of a TP-`degree` group."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return batch * tokens * (4 * width + 17 * width // degree) * value_bytes


def vae_decode_bytes(config: dict[str, Any], width: int, height: int, batch: int, value_bytes: int) -> int:
    """Peak activations of decoding `batch` images: the widest full-resolution step of the decoder."""
    channels = config.get("decoder_block_out_channels") or config["block_out_channels"]
    return batch * width * height * (3 * channels[1] + 2 * channels[0]) * value_bytes


def encoder_activation_bytes(config: dict[str, Any], tokens: int, batch: int, value_bytes: int) -> int:
    """Peak activations of one text encoder over `batch` prompts of `tokens` tokens."""
    text = config.get("text_config", config)
    hidden = text.get("d_model") or text["hidden_size"]
    ffn = text.get("d_ff") or text["intermediate_size"]
    heads = text.get("num_heads") or text["num_attention_heads"]
    if "max_position_embeddings" in text and text["max_position_embeddings"] < tokens:
        tokens = text["max_position_embeddings"]  # CLIP stops at 77
    total = batch * tokens * (4 * hidden + 2 * ffn) * value_bytes
    if config.get("model_type") == "t5":
        total += batch * heads * tokens * tokens * 2 * 4  # eager attention: fp32 scores + position bias
    layers = text.get("num_hidden_layers")
    if "text_config" in config and layers:
        total += batch * tokens * hidden * (layers + 1) * value_bytes  # Flux.2 keeps every layer's hidden states
    return total


# -- the plan ---------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """The planner's answer for one model on one card size."""

    model: str
    gpu_memory: int
    dtype: str
    width: int
    height: int
    batch_size: int
    reserve: int
    components: dict[str, Component]
    tp_degree: int | None  # None: even MAX_GPUS cards cannot hold the transformer
    where: dict[str, str]  # component -> "GPU 0-1 (sharded)", "GPU 1", "CPU (offload)"
    peak_per_gpu: list[int]  # predicted peak bytes on each rank's GPU
    cpu_bytes: int  # weights offloaded to host memory, per replica
    note: str = ""
    offload_seconds: dict[str, float] = field(default_factory=dict)  # offloaded component -> host s per image
    scorer_bytes: int = 0  # the scorers' fp32 weights on GPU 0 (schemas/quality.py)

    @property
    def fits(self) -> bool:
        return self.tp_degree is not None

    def describe(self) -> str:
        """The plan as `fluxbatch plan` prints it."""
        lines = [
            f"model {self.model}: {self.dtype}, {self.width}x{self.height}, batch {self.batch_size}, "
            f"card {_gib(self.gpu_memory)} ({_gib(self.gpu_memory - self.reserve)} usable)",
        ]
        if not self.fits:
            lines.append(f"does not fit: {self.note}")
            return "\n".join(lines)
        lines.append(f"tensor-parallel degree: {self.tp_degree} GPU{'s' if self.tp_degree > 1 else ''} per replica")
        lines.append(f"{'component':<16}{'params':>12}{'weights':>12}  where")
        for name, comp in self.components.items():
            weight = comp.params * self._weight_bytes(name)
            lines.append(f"{name:<16}{comp.params / 1e9:>11.3f}B{_gib(weight):>12}  {self.where[name]}")
        if self.scorer_bytes:
            lines.append(f"{'scorers':<16}{self.scorer_bytes / 4e9:>11.3f}B{_gib(self.scorer_bytes):>12}  GPU 0 (fp32)")
        peaks = ", ".join(f"GPU {i}: {_gib(p)}" for i, p in enumerate(self.peak_per_gpu))
        lines.append(f"predicted peak per GPU: {peaks}")
        if self.cpu_bytes:
            lines.append(f"host memory for offloaded weights: {_gib(self.cpu_bytes)} per replica")
        for name, seconds in self.offload_seconds.items():
            per = "new prompt (repeated prompts are cached)" if name in TEXT_ENCODERS else "image"
            lines.append(f"offloaded {name}: ~{seconds:.2g} s of host compute per {per}, "
                         f"at {HOST_FLOPS / 1e12:.0f} TFLOP/s")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def _weight_bytes(self, name: str) -> int:
        return weight_bytes(name, self.dtype)


def weight_bytes(component: str, dtype: str) -> int:
    """Bytes per parameter: fp8 applies to the transformer only; the rest stays bf16."""
    if dtype == "fp8" and component != "transformer":
        return 2
    return WEIGHT_BYTES[dtype]


def activation_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def plan_memory(model: str, gpu_memory: int, *, dtype: str = "bf16", width: int = 1024, height: int | None = None,
                batch_size: int = 1, reserve: int = RESERVE_BYTES, max_gpus: int = MAX_GPUS,
                tp_degree: int | None = None, scorers: tuple[int, int] = (0, 0)) -> MemoryPlan:
    """Pick the smallest TP degree whose transformer shard fits (or take `tp_degree`), then place the rest.

    `scorers`: the job's scorers' (weight bytes, activation bytes) (flux_worker/scorer_memory.py); they run on GPU 0,
    where the images are decoded, so a plan they do not fit beside the transformer's shard and the VAE is no plan."""
    if dtype not in WEIGHT_BYTES:
        raise PlanError(f"dtype {dtype!r}: choose one of {', '.join(WEIGHT_BYTES)}")
    height = height or width
    configs, text_tokens = model_configs(model)
    if "transformer" not in configs or "vae" not in configs:
        raise PlanError(f"{model}: a planner needs at least the transformer's and the VAE's config.json")
    comps = {name: count_component(name, cfg) for name, cfg in configs.items()}
    act = activation_bytes(dtype)
    budget = gpu_memory - reserve
    tcfg, tcomp = configs["transformer"], comps["transformer"]
    tokens = image_tokens(configs["vae"], width, height) + text_tokens

    def transformer_on_rank(degree: int) -> tuple[int, int]:
        weights = (tcomp.replicated + tcomp.sharded // degree) * weight_bytes("transformer", dtype)
        return weights, transformer_activation_bytes(tcfg, tokens, batch_size, degree, act)

    heads = tcfg["num_attention_heads"]
    single_gpu = _single_gpu_family(model)
    if single_gpu:
        max_gpus = 1  # the family has no tensor-parallel replicas: plan what the renderer can run
        if tp_degree not in (None, 1):
            raise PlanError(f"{tp_degree} GPUs per replica: {single_gpu} models render on one GPU per replica "
                            "(no tensor-parallel replicas)")
    degrees = [d for d in range(1, max_gpus + 1) if heads % d == 0]
    if tp_degree is not None:
        if tp_degree < 1 or heads % tp_degree:
            raise PlanError(f"{tp_degree} GPUs per replica do not divide the transformer's {heads} attention heads; "
                            f"choose one of {degrees}")
        degrees = [tp_degree]  # the user chose; the plan still places the encoders and the VAE around it
    scorer_w, scorer_a = scorers

    def rank0_fits(degree: int) -> bool:  # the scorers run where the images are decoded: beside rank 0's shard
        weights, activations = transformer_on_rank(degree)
        return weights + scorer_w + max(activations, scorer_a) <= budget

    degree = next((d for d in degrees if rank0_fits(d)), None)
    base = MemoryPlan(model, gpu_memory, dtype, width, height, batch_size, reserve, comps, degree, {}, [], 0)
    if degree is None and scorer_w and sum(transformer_on_rank(degrees[-1])) <= budget:
        base.note = (f"the scorers (--clip, --aesthetic) need {_gib(scorer_w + scorer_a)} on GPU 0 beside the "
                     f"transformer, which does not leave room for them even over {degrees[-1]} GPU(s); use bigger "
                     "cards or a smaller CLIP model")
        return base
    if degree is None:
        need = sum(transformer_on_rank(degrees[-1]))
        base.note = (f"the transformer needs {_gib(need)} per GPU even over {degrees[-1]} GPUs; "
                     f"use bigger cards{' or --dtype fp8' if dtype != 'fp8' else ''}")
        if single_gpu:
            base.note = (f"the transformer needs {_gib(need)} on one GPU, and {single_gpu} models render on one "
                         "GPU per replica; use bigger cards")
        return base

    t_weights, t_act = transformer_on_rank(degree)
    held = [t_weights] * degree  # weights resident on each rank
    acts: list[list[int]] = [[t_act] for _ in range(degree)]
    where = {"transformer": f"GPU 0-{degree - 1} (sharded)" if degree > 1 else "GPU 0"}
    cpu = 0

    def fits_on(rank: int, weights: int, activations: int) -> bool:
        return held[rank] + weights + max([*acts[rank], activations]) <= budget

    # The scorers first: they run where the images are decoded, on GPU 0 (the VAE may go to the host instead).
    if scorer_w:
        if not fits_on(0, scorer_w, scorer_a):
            base.tp_degree = None
            base.note = (f"the scorers (--clip, --aesthetic) need {_gib(scorer_w + scorer_a)} on GPU 0 beside the "
                         f"transformer{' shard' if degree > 1 else ''}, and {_gib(budget - held[0])} is "
                         "left there; use bigger cards or a smaller CLIP model")
            return base
        held[0] += scorer_w
        acts[0].append(scorer_a)
        base.scorer_bytes = scorer_w

    # The VAE belongs to rank 0, which decodes and writes.
    vae_w = comps["vae"].params * weight_bytes("vae", dtype)
    vae_a = vae_decode_bytes(configs["vae"], width, height, batch_size, act)
    if fits_on(0, vae_w, vae_a):
        held[0] += vae_w
        acts[0].append(vae_a)
        where["vae"] = "GPU 0"
    else:
        cpu += vae_w
        where["vae"] = "CPU (offload)"

    # The text encoders stay together, on the emptiest GPU that holds them (another GPU than the VAE's first).
    encoders = [n for n in TEXT_ENCODERS if n in comps]
    enc_w = sum(comps[n].params * weight_bytes(n, dtype) for n in encoders)
    enc_a = max((encoder_activation_bytes(configs[n], text_tokens, batch_size, act) for n in encoders), default=0)
    rank = min(range(degree), key=lambda r: (held[r], -r))
    if encoders and fits_on(rank, enc_w, enc_a):
        held[rank] += enc_w
        acts[rank].append(enc_a)
        for n in encoders:
            where[n] = f"GPU {rank}"
    else:
        cpu += enc_w
        for n in encoders:
            where[n] = "CPU (offload)"
    base.where = where
    base.peak_per_gpu = [held[r] + max(acts[r]) + reserve for r in range(degree)]
    base.cpu_bytes = cpu
    base.offload_seconds = offload_seconds(comps, configs, where, text_tokens, width, height)
    if dtype == "fp8":
        base.note = ("fp8: the transformer quantized on one GPU (model.quantize: fp8); a quantized transformer "
                     "cannot be sharded, so fp8 plans needing 2+ GPUs are figures only")
    return base


def _single_gpu_family(model: str) -> str:
    """The name of `model`'s family if it renders on one GPU per replica only (families.py: no `tp_decode`);
    "" if it has tensor-parallel replicas or its family cannot be told."""
    from flux_worker.presets import resolve_preset

    try:
        family = FAMILIES[resolve_preset(model).family]
    except (FluxbatchError, KeyError):
        return ""
    return "" if family.tp_decode else family.name


def offload_seconds(comps: dict[str, Component], configs: dict[str, dict[str, Any]], where: dict[str, str],
                    text_tokens: int, width: int, height: int) -> dict[str, float]:
    """Host seconds per image (per new prompt for an encoder) of each component the plan put on the CPU."""
    seconds = {}
    for name, place in where.items():
        if not place.startswith("CPU"):
            continue
        if name == "vae":
            flops = vae_decode_flops(configs["vae"], width, height)
        else:
            text = configs[name].get("text_config", configs[name])
            tokens = min(text_tokens, text.get("max_position_embeddings") or text_tokens)  # CLIP stops at 77
            flops = 2 * comps[name].params * tokens  # one multiply-add per weight per token
        seconds[name] = flops / HOST_FLOPS
    return seconds


def vae_decode_flops(config: dict[str, Any], width: int, height: int) -> int:
    """Multiply-adds x 2 of one VAE decode: its 3x3 convolutions, from the deepest level (the latent) up."""
    channels = list(reversed(config.get("decoder_block_out_channels") or config["block_out_channels"]))
    pixels = (width // 2 ** (len(channels) - 1)) * (height // 2 ** (len(channels) - 1))  # latent resolution
    per_block = config.get("layers_per_block", 2) + 1  # the decoder's up blocks have one resnet more
    flops = 2 * 2 * 9 * channels[0] ** 2 * pixels * 2  # the middle block: two resnets of two convolutions
    previous = channels[0]
    for level, width_c in enumerate(channels):
        for _ in range(per_block):
            flops += 2 * 9 * pixels * (previous * width_c + width_c * width_c)
            previous = width_c
        if level < len(channels) - 1:
            pixels *= 4
            flops += 2 * 9 * pixels * width_c * width_c  # the upsampler's convolution, at the new resolution
    return flops


def placement_of(plan: MemoryPlan) -> dict[str, Any]:
    """The plan as the `Placement` of flux_worker.tensor_parallel (encoder rank, encoder and VAE device)."""
    enc = plan.where.get("text_encoder_2") or plan.where.get("text_encoder") or "GPU 0"
    on_cpu = enc.startswith("CPU")
    return {
        "encoder_rank": 0 if on_cpu else int(enc.split()[1]),
        "encoder_device": "cpu" if on_cpu else "gpu",
        "vae_device": "cpu" if plan.where.get("vae", "").startswith("CPU") else "gpu",
    }


# -- sizes and the command --------------------------------------------------------------------------

_UNITS = {"": GIB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": GIB, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '80gib' or a bare number of GiB, in bytes (GB is 10^9, GiB is 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise PlanError(f"memory size {text!r}: write it like 24GiB, 24GB or 24 (GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def markdown_table(models: list[str], sizes: list[str], *, dtype: str = "bf16", resolution: int = 1024,
                   batch_size: int = 1, reserve: int = RESERVE_BYTES) -> str:
    """One row per model and card size: TP degree, where the encoders and VAE live, peak per GPU."""
    lines = ["| model | card | GPUs per replica | text encoders | VAE | predicted peak per GPU | host memory |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        for size in sizes:
            plan = plan_memory(model, parse_size(size), dtype=dtype, width=resolution, batch_size=batch_size,
                               reserve=reserve)
            if not plan.fits:
                lines.append(f"| {model} | {size} | does not fit | | | {plan.note} | |")
                continue
            enc = plan.where.get("text_encoder_2") or plan.where.get("text_encoder", "-")
            peak = " / ".join(f"{p / GIB:.1f}" for p in plan.peak_per_gpu) + " GiB"
            host = _gib(plan.cpu_bytes) if plan.cpu_bytes else "-"
            lines.append(f"| {model} | {size} | {plan.tp_degree} | {enc} | {plan.where['vae']} | {peak} | {host} |")
    return "\n".join(lines)


def recount_main() -> int:
    """`python -m flux_worker.memory_plan --recount`: rewrite COUNTS_FILE after a diffusers/transformers
    upgrade or an edit to a preset's config."""
    COUNTS_FILE.write_text(json.dumps(count_known_models(), indent=1) + "\n")
    print(f"wrote {COUNTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(recount_main() if sys.argv[1:] == ["--recount"] else "usage: python -m flux_worker.memory_plan --recount")
