"""A model URL fetched once per node into a local cache, checked, and never used half-written.

Renderers load a model given as a storage URL (`s3://bucket/models/flux1-dev`) from a folder on their own
machine. The first renderer of a node to ask downloads it; the others on that node wait on a lock and then use
the same copy. The cache (`model.cache_dir`, else $FLUXBATCH_MODEL_CACHE, else $XDG_CACHE_HOME/fluxbatch/models
with ~/.cache for an unset XDG_CACHE_HOME, beside the compile cache) holds:

    <key>/model/...        the diffusers folder, file for file as the source holds it (pickle files left out)
    <key>/complete.json    written last: the source URL, and each file's size, sha256 and modification time
    <key>.lock             held (flock) by the one process fetching or checking <key> on this node
    <key>.partial-<pid>/   a download under way; renamed to <key> whole, or swept by the next holder of the lock

`key` is a digest of the URL with a readable tail. A download is checked file by file against the source's
listing (sizes) and, when the folder has one, the checksum file `fluxbatch model mirror` writes (sha256): a file
that differs means the source changed under us, one line and nothing kept. A cached copy is used when each file
still has the size and modification time recorded, and hashed again when it does not: a file changed in the cache
is caught by its checksum and the model fetched again. A kill at any point leaves at most a partial folder, which
is never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flux_worker.model_folder import CHECKSUM_FILE, ModelFolder, ModelSourceError
from flux_worker.weights import PICKLE_SUFFIXES
from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)

CACHE_ENV = "FLUXBATCH_MODEL_CACHE"
FETCH_THREADS = 8  # files downloaded at once (a FLUX.1 transformer is three 5-10 GB shards)


class ModelCacheError(FluxbatchError, OSError):
    """The node cache cannot hold the model (no space, no permission), or the source changed while it was read."""


def cache_dir(configured: str | None = None) -> Path:
    """Where this node keeps fetched models: the job's `model.cache_dir`, else $FLUXBATCH_MODEL_CACHE, else
    $XDG_CACHE_HOME/fluxbatch/models (~/.cache when unset; beside the compile cache's default)."""
    if configured or os.environ.get(CACHE_ENV):
        return Path(configured or os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fluxbatch" / "models"


def check_cache_here(configured: str | None) -> None:
    """Raise ModelCacheError unless this machine can write the model cache (made if missing): in each renderer before
    it fetches, and on the driver of a local cluster, whose renderers run here, so an unwritable
    `--model-cache-dir` is one line before Ray starts, not a traceback per actor."""
    cache = cache_dir(configured)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError as error:
        reason = error.strerror
    else:
        reason = None if writable else "not writable"
    if reason:
        raise ModelCacheError(f"cannot use the model cache {cache}: {reason}; set model.cache_dir "
                              f"(--model-cache-dir) or ${CACHE_ENV} to a folder this node can write")


def cache_key(url: str) -> str:
    tail = "".join(c if c.isalnum() or c in "-_." else "-" for c in url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}-{tail}"


def expected_files(source: ModelFolder) -> dict[str, dict[str, Any]]:
    """The files to fetch, each with its size (the listing) and sha256 (the checksum file, where there is one).

    The checksum file must agree with the listing: a file it names that is missing or of another size, or a file
    it does not name, means the folder changed since it was mirrored; that is one line, before any download."""
    listed = {rel: size for rel, size in source.files.items()
              if rel != CHECKSUM_FILE and not rel.endswith(PICKLE_SUFFIXES)}
    if "model_index.json" not in listed:
        raise ModelSourceError(f"model {source}: no model_index.json there; give the URL of a diffusers folder "
                               "(`fluxbatch model mirror` writes one)")
    files: dict[str, dict[str, Any]] = {rel: {"size": size, "sha256": None} for rel, size in listed.items()}
    if CHECKSUM_FILE not in source.files:
        return files
    recorded = source.read_json(CHECKSUM_FILE).get("files", {})
    for rel in sorted(set(recorded) | set(files)):
        mine, theirs = files.get(rel), recorded.get(rel)
        if mine is None or theirs is None or mine["size"] != theirs.get("size"):
            what = ("is missing" if mine is None else "is not in the checksum file" if theirs is None
                    else f"is {mine['size']} bytes, the checksum file says {theirs.get('size')}")
            raise ModelCacheError(f"model {source} changed since its {CHECKSUM_FILE} was written: {rel} {what}; "
                                  "mirror it again (`fluxbatch model mirror`)")
        mine["sha256"] = theirs.get("sha256")
    return files


def fetch_model(url: str, storage_options: dict[str, Any] | None = None, configured_cache: str | None = None
                ) -> tuple[Path, bool]:
    """The local folder holding the model at `url`, and whether this call downloaded it (False: it was cached)."""
    source = ModelFolder(url, storage_options)
    files = expected_files(source)
    check_cache_here(configured_cache)
    cache = cache_dir(configured_cache)
    key = cache_key(url)
    with _locked(cache / f"{key}.lock", url):
        final = cache / key
        if _usable(final, url, files):
            return final / "model", False
        for stale in cache.glob(f"{key}.partial-*"):  # a killed download: never used, removed under the lock
            shutil.rmtree(stale, ignore_errors=True)
        _download(source, files, cache, key)
        return final / "model", True


@contextlib.contextmanager
def _locked(path: Path, url: str) -> Iterator[None]:
    """Hold `path`'s lock; another process of this node holding it (fetching `url`) is waited for, said once."""
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise ModelCacheError(f"cannot use the model cache {path.parent}: {error.strerror}; set model.cache_dir "
                              f"(--model-cache-dir) or ${CACHE_ENV} to a folder this node can write") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another renderer on this node fetching %s", url)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _usable(final: Path, url: str, files: dict[str, dict[str, Any]]) -> bool:
    """Whether the cached copy is whole, of this source as it is now, and unchanged since it was fetched; a copy
    that is not is removed (it is ours: nothing but the cache writes there)."""
    record_path = final / "complete.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        shutil.rmtree(final, ignore_errors=True)
        return False
    recorded = record.get("files", {})
    same_source = record.get("url") == url and set(recorded) == set(files) and all(
        recorded[rel]["size"] == want["size"] and want["sha256"] in (None, recorded[rel]["sha256"])
        for rel, want in files.items())
    if not same_source:
        log.warning("the cached copy of %s is of an older version of it; fetching it again", url)
        shutil.rmtree(final, ignore_errors=True)
        return False
    touched = False
    for rel, entry in recorded.items():
        path = final / "model" / rel
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is not None and stat.st_size == entry["size"] and stat.st_mtime_ns == entry["mtime_ns"]:
            continue
        if stat is None or _sha256(path) != entry["sha256"]:
            log.warning("%s in the model cache does not match its checksum; fetching %s again", path, url)
            shutil.rmtree(final, ignore_errors=True)
            return False
        entry["mtime_ns"], touched = stat.st_mtime_ns, True  # touched, same bytes
    if touched:
        _write_json(record_path, record)
    return True


def _download(source: ModelFolder, files: dict[str, dict[str, Any]], cache: Path, key: str) -> None:
    need = sum(entry["size"] for entry in files.values())
    free = shutil.disk_usage(cache).free
    if need > free:
        raise ModelCacheError(f"model {source} needs {_size(need)} in the model cache {cache}, which has "
                              f"{_size(free)} free: free space, or set model.cache_dir (--model-cache-dir) to a "
                              "larger disk")
    partial = cache / f"{key}.partial-{os.getpid()}"
    started = time.monotonic()
    try:
        pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="model-fetch")
        try:
            futures = {rel: pool.submit(_fetch_file, source, rel, files[rel], partial / "model") for rel in files}
            fetched = {rel: future.result() for rel, future in futures.items()}
        finally:  # on the first failure, the files not started yet are not fetched at all
            pool.shutdown(wait=True, cancel_futures=True)
        _write_json(partial / "complete.json", {"url": source.where, "files": fetched})
        final = cache / key
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelCacheError(f"no space left in the model cache {cache} while fetching {source} "
                                  f"({_size(need)}): free space, or set model.cache_dir (--model-cache-dir) to a "
                                  "larger disk") from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("fetched %s (%s) into %s in %.1f s", source, _size(need), cache, time.monotonic() - started)


def _fetch_file(source: ModelFolder, rel: str, want: dict[str, Any], into: Path) -> dict[str, Any]:
    """Copy one file of the source into `into`, hashing it on the way; its size, sha256 and mtime."""
    target = into / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        size, sha = source.copy_to(rel, out)
    if size != want["size"] or want["sha256"] not in (None, sha):
        what = f"{size} bytes, listed as {want['size']}" if size != want["size"] else "its sha256 differs"
        raise ModelCacheError(f"model {source} changed while it was fetched: {rel} is {what}; nothing of it was "
                              "kept. Run again once the source is stable")
    return {"size": size, "sha256": sha, "mtime_ns": target.stat().st_mtime_ns}


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
