"""Model presets: resolve a preset name, a local diffusers folder or a hub id to its defaults and limits.

The presets themselves are entries of the one model table (flux_worker/families.py); this module only finds
the right one. It imports neither torch nor diffusers, so the driver can resolve defaults and size limits
without loading a model.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import asdict, fields, replace
from pathlib import Path

from flux_worker.families import (
    FAMILIES,
    PIPELINE_CLASSES,
    PRESETS_BY_NAME,
    ModelPreset,
    family_for_class,
    preset_for_hub_id,
)
from flux_worker.model_folder import ModelFolder, is_model_url
from schemas import ModelSpec
from schemas.errors import FluxbatchError

PRESET_FILE = "fluxbatch_preset.json"  # written by `fluxbatch model build` beside model_index.json
PRESETS: dict[str, ModelPreset] = PRESETS_BY_NAME


class UnknownModelError(FluxbatchError, ValueError):
    """The model is neither a preset, nor a local folder of a known pipeline class, nor a hub id."""


def resolve_preset(name_or_path: str, storage_options: dict | None = None) -> ModelPreset:
    """Find the preset for a preset name, a local diffusers folder, a model URL (its small JSON files read with
    `storage_options`, no weights), or a hub id."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if is_model_url(name_or_path):
        return replace(_folder_preset(ModelFolder(name_or_path, storage_options)), source=name_or_path)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return _folder_preset(ModelFolder(folder))
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return replace(_hub_preset(name_or_path), name=name_or_path, source=name_or_path)
    raise UnknownModelError(
        f"model {name_or_path!r} is not a preset ({', '.join(PRESETS)}), "
        f"an existing local folder, or a hub id of the form owner/name{did_you_mean(name_or_path, PRESETS)}"
    )


def _folder_preset(folder: ModelFolder) -> ModelPreset:
    """A built model's own preset file, else the family its model_index.json names, with that family's defaults."""
    if PRESET_FILE in folder.files:
        data = folder.read_json(PRESET_FILE)
        known = {f.name for f in fields(ModelPreset)}
        return replace(ModelPreset(**{k: v for k, v in data.items() if k in known}), source=str(folder))
    index = f"{folder}/model_index.json"
    if "model_index.json" not in folder.files:
        raise UnknownModelError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); "
            "build one with `fluxbatch model build PATH` or give a preset name"
        )
    try:
        class_name = folder.read_json("model_index.json").get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None
    family = family_for_class(class_name)
    if family is None:
        raise UnknownModelError(f"{index} names the pipeline class {class_name!r}; fluxbatch renders with "
                                f"{', '.join(PIPELINE_CLASSES)} pipelines only")
    return family.preset_for_folder(folder)


def _hub_preset(repo_id: str) -> ModelPreset:
    """The preset of this hub id, else the closest family member by name (a fine-tune keeps its base's name)."""
    found = preset_for_hub_id(repo_id)
    if found:
        return found
    lowered = repo_id.lower()
    if "klein" in lowered:
        return PRESETS["flux.2-klein-9b" if "9b" in lowered else "flux.2-klein-4b"]
    if "kontext" in lowered:
        return PRESETS["flux.1-kontext-dev"]
    if "flux.2" in lowered or "flux2" in lowered:
        return FAMILIES["flux.2"].presets[0]
    return PRESETS["flux.1-schnell" if "schnell" in lowered else "flux.1-dev"]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the candidate closest to a mistyped `name` (case aside), or "" if none is close;
    never `name` itself."""
    by_lower = {candidate.lower(): candidate for candidate in candidates if candidate.lower() != name.lower()}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.8)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def write_preset(folder: Path, preset: ModelPreset) -> None:
    """Record a built model's defaults beside its weights so `resolve_preset` finds them."""
    (folder / PRESET_FILE).write_text(json.dumps(asdict(preset), indent=2) + "\n")


def model_revision(preset: ModelPreset, spec: ModelSpec, storage_options: dict | None = None) -> str:
    """The hub revision asked for, or for a folder (local, at a model URL, or a URL's node-cache copy) a fingerprint
    of its configs and weight sizes (ModelFolder.fingerprint: one value for a folder and every copy of it)."""
    if is_model_url(preset.source):
        return ModelFolder(preset.source, storage_options).fingerprint()
    if not Path(preset.source).is_dir():
        return spec.revision or "unpinned"
    return ModelFolder(preset.source).fingerprint()


def model_source(preset: ModelPreset, spec: ModelSpec) -> str:
    """Where a run loads the weights from, as its summary records it: the model URL, the local folder, or the hub
    id and revision."""
    if is_model_url(preset.source):
        return preset.source
    if Path(preset.source).expanduser().is_dir():
        return str(Path(preset.source).expanduser().resolve())
    return f"hub:{preset.source}" + (f"@{spec.revision}" if spec.revision else "")
