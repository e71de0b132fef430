"""`fluxbatch model mirror SOURCE DEST`: stage a model where the cluster's data lives, with a checksum file.

SOURCE is a hub id or preset (at `--revision`), a local diffusers folder or a model URL; DEST any fsspec URL (or a
local folder). Only what diffusers loads is copied: the configs, tokenizers and safetensors weights of the
folder's components. A pickle checkpoint with no safetensors beside it is refused in one line before anything
is copied (weights.check_model_folder); a hub repo's root-level single-file checkpoints (BFL's own format, not a
diffusers folder) are left out. Each file is hashed as it is copied; `fluxbatch-checksums.json` (each file's size
and sha256) is written last, so a DEST without it is a mirror under way, and renderers fetching the mirror check
every byte against it (flux_worker/model_cache.py).

Resumable: after each file, DEST's `.fluxbatch-mirror-progress.json` records it; a second run skips each recorded
file that DEST still holds at its size.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_worker.model_folder import CHECKSUM_FILE, ModelFolder, ModelSourceError, is_model_url
from flux_worker.storage import filesystem
from flux_worker.weights import PICKLE_SUFFIXES, check_model_folder
from schemas.errors import first_line

PROGRESS_FILE = ".fluxbatch-mirror-progress.json"
# What a diffusers pipeline folder needs from a hub repo (no root-level weights, no pickles, no images).
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model", "*/*.tiktoken"]


@dataclass
class Mirrored:
    files: int
    copied: int
    bytes: int
    seconds: float


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The diffusers files of a hub repo, downloaded into the local Hugging Face cache (a gated repo needs
    HF_TOKEN); the snapshot folder (named by its commit)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as error:  # noqa: BLE001 - gated, missing, offline: one line, whatever the hub said
        raise ModelSourceError(f"cannot download {repo_id} from the hub: {first_line(error)}") from None


def source_folder(source: str, revision: str | None, storage_options: dict[str, Any]) -> tuple[ModelFolder, str]:
    """SOURCE as a ModelFolder, and how the checksum file names it: a URL or local folder as it is, a preset or hub
    id from the hub (`hub:<id>@<commit>`)."""
    from flux_worker.presets import PRESETS

    if is_model_url(source):
        return ModelFolder(source, storage_options), source
    if Path(source).expanduser().is_dir():
        return ModelFolder(Path(source).expanduser()), str(Path(source).expanduser().resolve())
    repo_id = PRESETS[source].source if source in PRESETS else source
    if source not in PRESETS and Path(source).expanduser().parent.is_dir() and Path(source).parent != Path("."):
        # `models/tiny2` beside a `models/` folder is most likely a mistyped path, not the hub's user "models"
        raise ModelSourceError(f"SOURCE {source}: no such folder here ({Path(source).expanduser().resolve()}); give "
                               "a model folder, a model URL, a preset or a hub id")
    snapshot = hub_snapshot(repo_id, revision)
    return ModelFolder(snapshot), f"hub:{repo_id}@{Path(snapshot).name}"


def mirror(source: str, dest: str, *, revision: str | None = None, storage_options: dict[str, Any] | None = None,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Mirrored:
    """Copy the model at `source` to `dest` with its checksum file; resumes a mirror cut short."""
    started = time.monotonic()
    options = storage_options or {}
    folder, origin = source_folder(source, revision, options)
    check_model_folder(folder)  # a supported pipeline, safetensors only (a pickle is refused here, in one line)
    files = {rel: size for rel, size in folder.files.items()
             if rel not in (CHECKSUM_FILE, PROGRESS_FILE) and not rel.endswith(PICKLE_SUFFIXES)}
    storage, root = filesystem(dest, options)
    done = _progress(storage, root, origin)
    copied, sums = 0, {}
    for index, (rel, size) in enumerate(sorted(files.items()), 1):
        path = f"{root}/{rel}"
        earlier = done.get(rel)
        if earlier and earlier["size"] == size and storage.exists(path) and storage.info(path)["size"] == size:
            sums[rel] = earlier
            continue
        sums[rel] = {"size": size, "sha256": _copy(folder, rel, storage, path)}
        copied += 1
        done[rel] = sums[rel]
        storage.write_bytes(f"{root}/{PROGRESS_FILE}", json.dumps({"source": origin, "files": done}).encode())
        say(f"fluxbatch: {index}/{len(files)} {rel} ({size / 2**20:.1f} MiB)")
    body = {"source": origin, "files": sums}
    storage.write_bytes(f"{root}/{CHECKSUM_FILE}", (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    if storage.exists(f"{root}/{PROGRESS_FILE}"):
        storage.rm_file(f"{root}/{PROGRESS_FILE}")
    return Mirrored(len(files), copied, sum(files.values()), time.monotonic() - started)


def _progress(storage: Any, root: str, origin: str) -> dict[str, dict[str, Any]]:
    """What an earlier mirror of the same source to this DEST copied: a whole one (its checksum file), then one cut
    short (its progress file); nothing for a new DEST. A DEST holding a mirror of another source is refused: its
    files could pass for this one's by their sizes."""
    done: dict[str, dict[str, Any]] = {}
    for name in (CHECKSUM_FILE, PROGRESS_FILE):
        try:
            recorded = json.loads(storage.read_bytes(f"{root}/{name}"))
        except (FileNotFoundError, ValueError):
            continue
        if recorded.get("source") != origin:
            raise ModelSourceError(f"DEST {storage.uri(root)} holds a mirror of {recorded.get('source')!r}, not of "
                                   f"{origin!r}; mirror into another DEST (fluxbatch deletes none of its files)")
        done.update(recorded.get("files", {}))
    return done


def _copy(folder: ModelFolder, rel: str, storage: Any, path: str) -> str:
    """Stream one file to `path` (local: a temp file renamed; an object store: one upload), its sha256."""
    if storage.local:
        storage.makedirs(path.rsplit("/", 1)[0])
    tmp = f"{path}.partial" if storage.local else path
    try:
        with storage.fs.open(tmp, "wb") as out:
            _, sha = folder.copy_to(rel, out)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelSourceError(f"no space left writing {storage.uri(path)}: free space there and run the mirror "
                                   "again; it resumes") from None
        raise
    if storage.local:
        storage.mv(tmp, path)
    return sha
