"""What the job's scorers hold on the GPU that renders (rank 0 of a group): their fp32 weights and the activations
of one image, counted for the memory planner (flux_worker/memory_plan.py `plan_memory(..., scorers=)`).

Weights are counted from the safetensors headers of a folder or URL (no weights read), or from the recorded
parameter count of a preset; activations from the CLIP vision config: one image at a time, fp32.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any

from flux_worker.model_folder import ModelFolder
from flux_worker.weights import safetensors_header
from schemas.quality import QualitySpec, scorer_kind

FP32 = 4
# Parameters of the preset CLIP models (CLIPModel, counted once), and their vision configs.
PRESET_PARAMS = {"clip-vit-large-patch14": 427_616_513, "clip-vit-base-patch32": 151_277_313}
PRESET_VISION = {"clip-vit-large-patch14": {"hidden_size": 1024, "num_attention_heads": 16, "image_size": 224,
                                            "patch_size": 14, "intermediate_size": 4096},
                 "clip-vit-base-patch32": {"hidden_size": 768, "num_attention_heads": 12, "image_size": 224,
                                           "patch_size": 32, "intermediate_size": 3072}}
# LAION's predictor: linear layers from the embedding down to one value (dropouts between them hold no weights).
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_PARAMS = sum((a + 1) * b for a, b in zip((768, *AESTHETIC_WIDTHS), AESTHETIC_WIDTHS))  # ViT-L/14's 768


def scorer_bytes(quality: QualitySpec, storage_options: dict[str, Any] | None = None) -> tuple[int, int]:
    """(weight bytes, activation bytes) of the job's scorers on one device; (0, 0) without scorers."""
    if not quality.clip:
        return 0, 0
    params, vision = _clip(quality.clip, storage_options)
    if quality.aesthetic:
        params += _safetensors_params(_folder(quality.aesthetic, storage_options)) or AESTHETIC_PARAMS
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    width = vision["hidden_size"]
    # One layer's hidden states, its MLP's and its attention scores, fp32, one image.
    activations = (tokens * (2 * width + vision["intermediate_size"]) + vision["num_attention_heads"] * tokens ** 2
                   ) * FP32
    return params * FP32, activations


def _clip(name: str, storage_options: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    if scorer_kind(name) in ("preset", "hub"):
        preset = name if name in PRESET_PARAMS else "clip-vit-large-patch14"  # a hub id: counted as ViT-L/14
        return PRESET_PARAMS[preset], PRESET_VISION[preset]
    folder = _folder(name, storage_options)
    config = folder.read_json("config.json").get("vision_config", {})
    vision = {**PRESET_VISION["clip-vit-base-patch32"], **{k: config[k] for k in PRESET_VISION["clip-vit-base-patch32"]
                                                            if k in config}}
    return _safetensors_params(folder), vision


def _folder(name: str, storage_options: dict[str, Any] | None) -> ModelFolder:
    return ModelFolder(name, storage_options) if scorer_kind(name) == "url" else ModelFolder(Path(name).expanduser())


def _safetensors_params(folder: ModelFolder) -> int:
    """Parameters in the folder's safetensors files, from their headers."""
    total = 0
    for rel in folder.files:
        if rel.endswith(".safetensors"):
            with folder.open(rel) as handle:
                header = safetensors_header(handle)
            total += sum(prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total
