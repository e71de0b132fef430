"""Model presets as data: each names where the weights live and the defaults that suit the model.

This module imports neither torch nor diffusers, so the driver can resolve defaults and size limits
without loading a model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from schemas import ModelLimits, ModelSpec
from schemas.errors import FluxbatchError

PRESET_FILE = "fluxbatch_preset.json"  # written by `fluxbatch model build` beside model_index.json


@dataclass(frozen=True)
class ModelPreset:
    """Defaults and limits of one model family member."""

    name: str
    source: str  # hub id or local path the weights load from
    steps: int
    guidance: float
    max_sequence_length: int
    width: int = 1024
    height: int = 1024
    min_side: int = 256
    max_side: int = 2048
    max_steps: int = 200

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(min_side=self.min_side, max_side=self.max_side, max_steps=self.max_steps)


PRESETS: dict[str, ModelPreset] = {
    "flux.1-schnell": ModelPreset(
        name="flux.1-schnell",
        source="black-forest-labs/FLUX.1-schnell",
        steps=4,
        guidance=0.0,
        max_sequence_length=256,
    ),
    "flux.1-dev": ModelPreset(
        name="flux.1-dev",
        source="black-forest-labs/FLUX.1-dev",
        steps=28,
        guidance=3.5,
        max_sequence_length=512,
    ),
}


class UnknownModelError(FluxbatchError, ValueError):
    """The model is neither a preset, nor a local folder, nor something that looks like a hub id."""


def resolve_preset(name_or_path: str) -> ModelPreset:
    """Find the preset for a preset name, a local diffusers folder, or a hub id."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        own = folder / PRESET_FILE
        if own.is_file():
            data = json.loads(own.read_text())
            return replace(ModelPreset(**data), source=str(folder))
        config = folder / "transformer" / "config.json"
        if not (folder / "model_index.json").is_file():
            raise UnknownModelError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                "build one with `fluxbatch model build PATH` or give a preset name"
            )
        guidance = config.is_file() and json.loads(config.read_text()).get("guidance_embeds", False)
        base = PRESETS["flux.1-dev" if guidance else "flux.1-schnell"]
        return replace(base, name=str(folder), source=str(folder))
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        base = PRESETS["flux.1-schnell" if "schnell" in name_or_path.lower() else "flux.1-dev"]
        return replace(base, name=name_or_path, source=name_or_path)
    raise UnknownModelError(
        f"model {name_or_path!r} is not a preset ({', '.join(PRESETS)}), "
        f"an existing local folder, or a hub id of the form owner/name{did_you_mean(name_or_path, PRESETS)}"
    )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the candidate closest to a mistyped `name` (case aside), or "" if none is close."""
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.8)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def write_preset(folder: Path, preset: ModelPreset) -> None:
    """Record a built model's defaults beside its weights so `resolve_preset` finds them."""
    (folder / PRESET_FILE).write_text(json.dumps(asdict(preset), indent=2) + "\n")


def model_revision(preset: ModelPreset, spec: ModelSpec) -> str:
    """The hub revision asked for, or for a local folder a fingerprint of its configs and weight sizes."""
    folder = Path(preset.source)
    if not folder.is_dir():
        return spec.revision or "unpinned"
    return local_fingerprint(folder)


def local_fingerprint(folder: Path) -> str:
    """`local-<16 hex>` from a model folder's configs and weight sizes: the same model wherever it is copied,
    however its path is spelled, and a different one once its configs or weights change size."""
    digest = hashlib.sha256()
    for item in sorted(folder.rglob("*")):
        if item.is_file() and item.suffix in {".json", ".safetensors"}:
            digest.update(str(item.relative_to(folder)).encode())
            digest.update(item.read_bytes() if item.suffix == ".json" else str(item.stat().st_size).encode())
    return "local-" + digest.hexdigest()[:16]
