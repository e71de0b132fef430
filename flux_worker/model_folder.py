"""A diffusers pipeline folder wherever it lies: on this machine, or at an fsspec URL (`s3://`, `gs://`, `file://` ...).

The driver reads what it needs to check and identify a model (the list of files with their sizes, and the small
JSON files) the same way in both places, without fetching any weights: the pre-flight checks
(flux_worker/weights.py), the preset (flux_worker/presets.py), the memory planner's configs and the model's
fingerprint, which is therefore one value for a folder and for every copy of it (a mirror, a node's cache).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from flux_worker.storage import StorageError, filesystem
from schemas.errors import FluxbatchError, first_line

CHECKSUM_FILE = "fluxbatch-checksums.json"  # written by `fluxbatch model mirror`: each file's size and sha256
CHUNK = 8 * 2**20  # bytes a weight file is streamed in


class ModelSourceError(FluxbatchError, OSError):
    """A model URL that cannot be listed or read."""


def is_model_url(name: str) -> bool:
    """`model.name` is a storage URL of a diffusers folder (a preset, hub id or local path has no `://`)."""
    return "://" in name


class ModelFolder:
    """The files of one pipeline folder, local or at a URL: relative POSIX paths, their sizes, small JSON reads."""

    def __init__(self, where: str | Path, storage_options: dict[str, Any] | None = None):
        self.where = str(where)
        self.is_url = is_model_url(self.where)
        self.storage_options = storage_options or {}

    def __str__(self) -> str:
        return self.where

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        return filesystem(self.where, self.storage_options)

    @cached_property
    def files(self) -> dict[str, int]:
        """Every file under the folder and its size in bytes (empty when there is no such folder)."""
        if not self.is_url:
            root = Path(self.where).expanduser()
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        storage, root = self._fs
        try:
            found = storage.find(root, detail=True)  # retried; a failure a user can act on is one StorageError
        except FileNotFoundError:
            return {}
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - any other failure is one line naming the URL too
            raise ModelSourceError(f"model {self.where}: cannot list it: {first_line(error)}") from None
        return {path[len(root) + 1:]: int(info.get("size") or 0) for path, info in sorted(found.items())
                if info.get("type") != "directory" and path.startswith(root + "/")}

    def path(self, rel: str) -> str:
        """Where `rel` is: a local path, or the path inside the URL's filesystem (`storage`)."""
        return str(Path(self.where).expanduser() / rel) if not self.is_url else f"{self._fs[1]}/{rel}"

    @property
    def storage(self) -> Any:
        """The URL's `Storage` (flux_worker/storage.py)."""
        return self._fs[0]

    def open(self, rel: str) -> Any:
        """`rel` opened for reading in binary, streamed (a weight file is read in chunks, never whole)."""
        return self.storage.fs.open(self.path(rel), "rb") if self.is_url else open(self.path(rel), "rb")

    def copy_to(self, rel: str, out: Any) -> tuple[int, str]:
        """Stream `rel` into the open binary file `out`, hashing it on the way: (bytes, sha256). A failure to open
        or read the source, whatever its library, is one ModelSourceError; the writer's own errors pass through."""
        digest, size = hashlib.sha256(), 0
        try:
            handle = self.open(rel)
        except Exception as error:  # noqa: BLE001
            raise ModelSourceError(f"model {self.where}: cannot read {rel}: {first_line(error)}") from None
        with handle:
            while True:
                try:
                    chunk = handle.read(CHUNK)
                except Exception as error:  # noqa: BLE001 - a read cut short
                    raise ModelSourceError(f"model {self.where}: reading {rel} failed: {first_line(error)}") from None
                if not chunk:
                    return size, digest.hexdigest()
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)

    def read_bytes(self, rel: str) -> bytes:
        if not self.is_url:
            return Path(self.path(rel)).read_bytes()
        try:
            return self.storage.read_bytes(self.path(rel))
        except (StorageError, FileNotFoundError):
            raise
        except Exception as error:  # noqa: BLE001
            raise ModelSourceError(f"model {self.where}: cannot read {rel}: {first_line(error)}") from None

    def read_json(self, rel: str) -> Any:
        """The JSON file at `rel`; ValueError when it is not JSON, OSError (or ModelSourceError) when unreadable."""
        return json.loads(self.read_bytes(rel))

    def fingerprint(self) -> str:
        """`local-<16 hex>` from the folder's configs and weight sizes: the same model wherever it is copied, however
        its path or URL is spelled, and a different one once its configs or weights change size. fluxbatch's own
        checksum file is left out (a mirror has one, its source may not)."""
        digest = hashlib.sha256()
        for rel, size in sorted(self.files.items(), key=lambda item: item[0].split("/")):  # as Paths sort
            if rel == CHECKSUM_FILE or not rel.endswith((".json", ".safetensors")):
                continue
            digest.update(rel.encode())
            digest.update(self.read_bytes(rel) if rel.endswith(".json") else str(size).encode())
        return "local-" + digest.hexdigest()[:16]
