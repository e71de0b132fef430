"""The compile cache: torch.compile's artifacts carried from one renderer actor to the next, and across nodes.

A cold `model.compile` costs minutes per actor (inductor generates and builds kernels for every block
type and shape); inductor's own disk cache helps only a second actor on the same machine. Mega-Cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) serialises what inductor built into one
blob, which we keep at `model.compile_cache` (any fsspec URL, so every node of a cluster can share an S3
prefix). An actor loads the blob for a shape before its first call and, if that call compiled anything
the blob did not hold, writes the blob once for the next actor.

One blob per key: the things that make compiled code wrong or useless elsewhere (torch and triton
versions, the device, the transformer's config, dtype, fast-path options, the call's shape). The key is
also stored inside the blob with a checksum, so a foreign, stale or truncated blob is ignored with one
log line and the actor compiles as if there were none; a cache never stops a render.

Writes are whole-object (`Storage.write_bytes`: one put on object stores, write-then-rename on disk), so
two actors saving at once leave one complete blob, never a mixed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flux_worker.storage import filesystem
from schemas import ModelSpec
from schemas.errors import first_line

log = logging.getLogger(__name__)

MAGIC = b"fluxbatch-compile-cache 1\n"


def default_uri() -> str:
    """Where a single machine keeps the cache when the job names none: the user's cache folder."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(root) / "fluxbatch" / "compile-cache")


# The model-spec fields that change what the compiled blocks are (compile_cache itself only says where).
FAST_PATH_FIELDS = {"compile", "fuse_qkv", "quantize", "cache", "cache_threshold"}


def for_model(spec: ModelSpec, transformer: torch.nn.Module, device: str,
              storage_options: dict[str, Any] | None = None, **extra: Any) -> CompileCache | None:
    """The actor's view of the job's compile cache, or None when model.compile is off.

    With no `model.compile_cache` the default is resolved here, on the worker: each machine its own folder.
    `storage_options` (the job's, with the driver's credentials) apply to a cache on an object store only.
    `extra`: more of what the compiled code depends on (a tensor-parallel rank's degree)."""
    if not spec.compile:
        return None
    uri = spec.compile_cache or default_uri()
    remote = "://" in uri and not uri.startswith("file://")
    options = {**spec.model_dump(include=FAST_PATH_FIELDS), **extra}
    identity = cache_identity(transformer, getattr(transformer, "dtype", None), device, options)
    return CompileCache(uri, identity, storage_options if remote else None)


@contextlib.contextmanager
def around_first_call(cache: CompileCache | None, shape: tuple) -> Iterator[None]:
    """`cache.around_first_call(shape)`, or nothing when there is no cache (model.compile off)."""
    if cache is None:
        yield
        return
    with cache.around_first_call(shape):
        yield


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{platform.machine()}"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def cache_identity(transformer: torch.nn.Module, dtype: torch.dtype, device: str, options: dict[str, Any]) -> dict:
    """What invalidates compiled code, except the shape (added per call)."""
    config = json.dumps(dict(getattr(transformer, "config", {})), sort_keys=True, default=str)
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "device": device_name(device),
        "model_config": hashlib.sha256(config.encode()).hexdigest(),
        "dtype": str(dtype),
        "fast_path": options,
    }


@dataclass
class CompileCacheStats:
    """What the cache did for one actor, for its cold-start report."""

    loaded: int = 0  # blobs loaded (one per shape at most)
    ignored: int = 0  # blobs found but stale, foreign or corrupt
    saved: int = 0  # blobs written


@dataclass
class CompileCache:
    """One actor's view of the shared cache at `uri`; `around_first_call` wraps each new shape's first call."""

    uri: str
    identity: dict[str, Any]
    storage_options: dict[str, Any] | None = None
    stats: CompileCacheStats = field(default_factory=CompileCacheStats)
    _seen: set[tuple] = field(default_factory=set)

    def key(self, shape: tuple) -> dict[str, Any]:
        return {**self.identity, "shape": list(shape)}

    def path_of(self, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return f"{self.uri.rstrip('/')}/{digest}.bin"

    @contextlib.contextmanager
    def around_first_call(self, shape: tuple) -> Iterator[None]:
        """Load the shape's blob before its first call; save one after it if the call compiled new code."""
        if shape in self._seen:
            yield
            return
        key = self.key(shape)
        loaded = self._load(key)
        yield
        self._seen.add(shape)
        self._save_if_new(key, loaded)

    def _load(self, key: dict[str, Any]) -> set[str]:
        """Hot-load the blob for `key`; returns the artifact names it held (empty when none was usable)."""
        path = self.path_of(key)
        try:
            fs, root = filesystem(path, self.storage_options)
            if not fs.exists(root):
                return set()
            blob = fs.read_bytes(root)
            payload = _unwrap(blob, key)
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as error:  # a cache must never stop a render: compile as if it were absent
            self.stats.ignored += 1
            log.warning("ignoring compile cache %s (%s); compiling from scratch", path, _reason(error))
            return set()
        self.stats.loaded += 1
        names = _artifact_names(info)
        log.info("compile cache %s: loaded %d artifacts", path, len(names))
        return names

    def _save_if_new(self, key: dict[str, Any], loaded: set[str]) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        payload, info = saved
        if _artifact_names(info) <= loaded:
            return  # everything this call used came from the blob: nothing new to share
        path = self.path_of(key)
        try:
            fs, root = filesystem(path, self.storage_options)
            fs.write_bytes(root, _wrap(payload, key))
        except Exception as error:  # the next actor compiles again; this one renders on
            log.warning("could not save compile cache %s (%s)", path, _reason(error))
            return
        self.stats.saved += 1
        log.info("compile cache %s: saved %d artifacts", path, len(_artifact_names(info)))


class CacheMismatch(ValueError):
    """The blob is not the one this key wants (written by another torch, device or model), or is damaged."""


def _wrap(payload: bytes, key: dict[str, Any]) -> bytes:
    header = json.dumps({"key": key, "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode()
    return MAGIC + header + b"\n" + payload


def _unwrap(blob: bytes, key: dict[str, Any]) -> bytes:
    if not blob.startswith(MAGIC):
        raise CacheMismatch("not a fluxbatch compile cache")
    header_line, _, payload = blob[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError as error:
        raise CacheMismatch("unreadable header") from error
    if header.get("key") != json.loads(json.dumps(key)):
        raise CacheMismatch("written for another torch, device, model or shape")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CacheMismatch("checksum mismatch (truncated or altered)")
    return payload


def _artifact_names(info: Any) -> set[str]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {f"{kind}:{name}" for kind, names in artifacts.items() for name in names}


def _reason(error: BaseException) -> str:
    return first_line(error, typed=True)
