"""Pre-flight for the job's scorers (schemas/quality.py): each is where the renderers will look, and they fit
together, checked on the driver before OUTPUT is touched or Ray starts, each mistake one line naming the flag.

A CLIP model is a transformers folder (config.json and safetensors weights), local or at a storage URL (listed,
its config read, no weights fetched), or a hub id (a preset's) cached or known to the hub. An aesthetic predictor is
a folder holding model.safetensors, or that file itself; its first layer must take the CLIP model's embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flux_worker.fleet_plan import memory_table
from flux_worker.hub import check_hub_model
from flux_worker.memory_plan import PlanError
from flux_worker.model_folder import ModelFolder
from flux_worker.presets import UnknownModelError, did_you_mean
from flux_worker.storage import probe_options
from flux_worker.weights import safetensors_header
from schemas import JobSpec
from schemas.errors import FluxbatchError, first_line
from schemas.quality import AESTHETIC_WEIGHTS, CLIP_PRESETS, scorer_kind

CLIP_FILES = ("config.json", "preprocessor_config.json")


class ScorerError(FluxbatchError, ValueError):
    """A scorer the job names that the renderers could not load."""


def check_scorers(job: JobSpec) -> None:
    """Raise the first scorer mistake of `job` as one ScorerError."""
    quality = job.quality
    if not quality.clip:
        return
    width = _clip_width(quality.clip, job.storage_options)
    if quality.aesthetic:
        takes = _aesthetic_width(quality.aesthetic, job.storage_options)
        if width is not None and takes != width:
            raise ScorerError(f"--aesthetic {quality.aesthetic} takes {takes}-value CLIP embeddings and --clip "
                              f"{quality.clip} makes {width}: pair the predictor with the CLIP model it was trained "
                              "on (LAION's: clip-vit-large-patch14)")


def check_scorers_fit(job: JobSpec) -> None:
    """Where the cards' memory is known before Ray starts (FLUXBATCH_GPU_MEMORY=SIZE) and the job gives its GPUs per
    replica as a number, the scorers must fit on GPU 0 beside the model (flux_worker/memory_plan.py); `auto` and
    mixed fleets are planned with the scorers once the cluster is known (pipeline/replica_shape.py)."""
    memory = memory_table(os.environ.get("FLUXBATCH_GPU_MEMORY")).get("*")
    gpus = job.gpus_per_replica
    if not job.quality.clip or memory is None or isinstance(gpus, (str, dict)) or gpus < 1:
        return
    from pipeline.replica_shape import memory_plan_for

    try:
        plan = memory_plan_for(job, int(gpus), memory)
    except PlanError:
        return  # a model the planner has no configs for: nothing to count against
    if plan is not None and not plan.fits and plan.scorer_bytes == 0 and "scorers" in plan.note:
        raise ScorerError(f"gpus_per_replica {int(gpus)} on {os.environ['FLUXBATCH_GPU_MEMORY']} cards: {plan.note}")


def _folder(name: str, storage_options: dict[str, Any] | None) -> ModelFolder | None:
    """The folder `name` is (local or at a URL), or None for a preset or hub id."""
    kind = scorer_kind(name)
    if kind == "url":
        return ModelFolder(name, probe_options(name, storage_options))
    return ModelFolder(Path(name).expanduser()) if kind == "folder" else None


def _clip_width(name: str, storage_options: dict[str, Any] | None) -> int | None:
    """The CLIP model's embedding width (projection_dim) where its config can be read; ScorerError if it is not
    where the renderers will look."""
    flag = f"--clip {name}"
    folder = _folder(name, storage_options)
    if folder is None:
        repo = CLIP_PRESETS.get(name, name)
        try:
            check_hub_model(repo, named=name if name in CLIP_PRESETS else None, file="config.json")
        except UnknownModelError as error:
            raise ScorerError(f"{flag}: {first_line(error)}") from None
        return None
    files = folder.files
    if not files:
        what = "an empty folder" if not folder.is_url and Path(str(folder)).is_dir() else "no such folder"
        hint = did_you_mean(name, CLIP_PRESETS) if "/" not in name else ""
        raise ScorerError(f"{flag}: {what}{hint or ''} (a CLIP model is a preset ({', '.join(CLIP_PRESETS)}) or a "
                          "transformers folder: config.json, model.safetensors, tokenizer and preprocessor_config"
                          ".json; `fluxbatch model build PATH --scorer clip` makes a random-weight one)")
    lacking = [rel for rel in CLIP_FILES if rel not in files]
    if not any(rel.endswith(".safetensors") for rel in files):
        lacking.append("*.safetensors weights")
    if lacking:
        raise ScorerError(f"{flag}: not a CLIP model folder: it has no {', '.join(lacking)}")
    try:
        config = folder.read_json("config.json")
    except (OSError, ValueError) as error:
        raise ScorerError(f"{flag}: cannot read its config.json: {first_line(error)}") from None
    if config.get("model_type") != "clip":
        raise ScorerError(f"{flag}: its config.json is a {config.get('model_type')!r} model, not a CLIP model")
    return int(config.get("projection_dim") or 512)


def _aesthetic_width(name: str, storage_options: dict[str, Any] | None) -> int:
    """The embedding width the aesthetic predictor's first layer takes, read from its safetensors header."""
    flag = f"--aesthetic {name}"
    folder = _folder(name, storage_options) or ModelFolder(Path(name))
    files = folder.files
    rel = AESTHETIC_WEIGHTS
    if not files and not folder.is_url and Path(name).expanduser().is_file():
        folder, rel = ModelFolder(Path(name).expanduser().parent), Path(name).name
        files = folder.files
    if rel not in files:
        exists = folder.is_url or Path(str(folder)).is_dir()
        what = f"no {AESTHETIC_WEIGHTS} in it" if files or exists else "no such folder"
        raise ScorerError(f"{flag}: {what} (the LAION predictor's weights as safetensors, docs/quality.md; "
                          "`fluxbatch model build PATH --scorer aesthetic` makes a random-weight one)")
    try:
        with folder.open(rel) as handle:
            header = safetensors_header(handle)
    except (OSError, ValueError) as error:
        raise ScorerError(f"{flag}: {rel} cannot be read as safetensors: {first_line(error)}") from None
    try:
        return int(header["layers.0.weight"]["shape"][1])
    except (KeyError, IndexError, TypeError):
        raise ScorerError(f"{flag}: {rel} is not the LAION aesthetic predictor's weights (it has no layers.0.weight; "
                          "docs/quality.md converts LAION's checkpoint)") from None
