"""Which weights fluxbatch loads: safetensors only, in a pipeline of a class it renders with.

Pickle checkpoints (.bin, .pt, .ckpt ...) can run code when loaded, so they are refused. These checks import
neither torch nor diffusers: the driver runs them before `_job.json` is written or any actor starts
(pipeline/preflight.py), and each actor runs them again before it loads (flux_worker/loading.py), since a
worker of a joined cluster may see other files than the driver did.

Adapters have no list of allowed folders: a job names each by a local path (manifest rows name adapters, never
files), and the job is written by the person who runs it, with their rights. What is allowed is decided by
content: a regular file (no device, FIFO or /proc entry), named *.safetensors, whose header parses as a
safetensors header. So `/etc/passwd`, a renamed pickle or a truncated download is refused in one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from flux_worker.families import PIPELINE_CLASSES  # the model table's classes, which loading.py loads
from flux_worker.model_folder import ModelFolder
from schemas.errors import FluxbatchError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own bound on its JSON header


class UnsafeWeightsError(FluxbatchError, ValueError):
    """Weights in a pickle-based format (which can run code when loaded), or a file that is no safetensors file."""


class UnloadableModelError(FluxbatchError, ValueError):
    """A local model folder fluxbatch cannot load: no diffusers pipeline of a class it renders with, or no weights."""


class AdapterNotFoundError(FluxbatchError, FileNotFoundError):
    """An adapter named in the job has no file at its path."""


def refuse_pickle(path: str | Path | ModelFolder) -> None:
    """Raise if an adapter file, or a model folder (local or at a URL), holds pickle weights without safetensors
    beside them."""
    if not isinstance(path, ModelFolder) and Path(path).is_file():
        files, where = [Path(path).name], Path(path).parent
    else:
        folder = path if isinstance(path, ModelFolder) else ModelFolder(path)
        files, where = list(folder.files), folder
    parent = lambda rel: rel.rpartition("/")[0]  # noqa: E731
    safe = {parent(rel) for rel in files if rel.endswith(".safetensors")}
    unsafe = [rel for rel in files if rel.endswith(PICKLE_SUFFIXES) and parent(rel) not in safe]
    if unsafe:
        raise UnsafeWeightsError(
            f"{where}/{unsafe[0]} is a pickle-format checkpoint; fluxbatch loads safetensors only. "
            "Convert it (e.g. `safetensors.torch.save_file(torch.load(..., weights_only=True), ...)`)"
        )


def check_model_folder(folder: str | Path | ModelFolder) -> None:
    """Raise unless `folder` (local, or a URL's ModelFolder) holds a diffusers pipeline of a supported class with
    safetensors weights; only its listing and model_index.json are read."""
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    files = folder.files
    index = f"{folder}/model_index.json"
    if "model_index.json" not in files:
        raise UnloadableModelError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                                   "build one with `fluxbatch model build PATH` or give a preset name")
    try:
        components = folder.read_json("model_index.json")
    except (OSError, ValueError) as error:
        raise UnloadableModelError(f"{index} is not readable JSON ({error}); the folder is not a loadable "
                                   "pipeline") from None
    kind = components.get("_class_name") if isinstance(components, dict) else None
    if kind not in PIPELINE_CLASSES:
        raise UnloadableModelError(f"{index} names the pipeline class {kind!r}; fluxbatch renders with "
                                   f"{', '.join(PIPELINE_CLASSES)} pipelines only")
    refuse_pickle(folder)
    for name, entry in components.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue  # "_class_name", "_diffusers_version"; [null, null] is an optional component left out
        inside = [rel.removeprefix(f"{name}/") for rel in files if rel.startswith(f"{name}/")]
        if not inside:
            raise UnloadableModelError(f"{index} lists the component {name!r}, but there is no folder "
                                       f"{folder}/{name}")
        # A model component (it has a config.json; schedulers and tokenizers do not) needs its weights.
        if "config.json" in inside and not any("/" not in rel and rel.endswith(".safetensors") for rel in inside):
            raise UnloadableModelError(f"{folder}/{name} holds no .safetensors weights; fluxbatch loads "
                                       "safetensors only")


def check_adapter(name: str, path: str) -> Path:
    """The adapter file at `path`, or one line saying why it is not a readable safetensors file."""
    file = Path(path).expanduser()
    if file.suffix != ".safetensors":
        raise UnsafeWeightsError(f"adapter {name!r}: {path} is not a .safetensors file; fluxbatch loads no pickles")
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise AdapterNotFoundError(f"adapter {name!r}: no file at {path}") from None
    except OSError as error:
        raise UnsafeWeightsError(f"adapter {name!r}: cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise UnsafeWeightsError(f"adapter {name!r}: {path} is not a regular file")
    try:
        reason = _safetensors_header_problem(file)
    except OSError as error:
        raise UnsafeWeightsError(f"adapter {name!r}: cannot read {path}: {error.strerror}") from None
    if reason:
        raise UnsafeWeightsError(f"adapter {name!r}: {path} is not a safetensors file ({reason})")
    return file


def safetensors_header(handle: Any) -> dict[str, Any]:
    """The JSON table at the start of an open safetensors file (local or at a URL), without reading a tensor;
    ValueError when it does not start like one (a header past MAX_HEADER_BYTES included)."""
    length = int.from_bytes(handle.read(8), "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise ValueError("its first 8 bytes are not the length of a safetensors header")
    header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a table of tensors")
    return header


def _safetensors_header_problem(file: Path) -> str | None:
    """Why `file` does not start like a safetensors file (8-byte little-endian length, then a JSON table of
    tensors whose data lies inside the file), or None when it does."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            return "its first 8 bytes are not the length of a header inside the file"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    data = size - 8 - length
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            return f"tensor {tensor!r} has no data offsets inside the file (truncated?)"
    return None
