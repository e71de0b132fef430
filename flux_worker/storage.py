"""Read and write OUTPUT and manifests through fsspec: `Storage`, whose every operation retries transient faults.

pyarrow's own S3 filesystem ignores `AWS_ENDPOINT_URL`, so every byte goes through fsspec (s3fs honours
it). Storage options may hold credentials: they are passed around, never logged or written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from schemas.errors import FluxbatchError, first_line
from schemas.layout import TMP_MARK

log = logging.getLogger(__name__)
T = TypeVar("T")

# Environment variables a worker needs to reach the same object store as the driver. No credentials:
# Ray writes a runtime_env's variables to its log files, so those travel as storage options instead.
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def storage_env() -> dict[str, str]:
    """The non-secret storage variables set here, to be handed to Ray workers through their runtime_env."""
    return {name: os.environ[name] for name in STORAGE_ENV_VARS if os.environ.get(name)}


def credential_options(url: str) -> dict[str, str]:
    """The driver's AWS credentials from its environment as s3fs options, for workers (never logged or written).

    Passed in the renderer's constructor arguments (Ray's object store), not its runtime_env, which Ray logs.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return {}
    options = {"key": key, "secret": secret}
    if os.environ.get("AWS_SESSION_TOKEN"):
        options["token"] = os.environ["AWS_SESSION_TOKEN"]
    return options


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Storage, str]:
    """The `Storage` holding `url` and the path inside it, with no instance caching across options."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        # Fresh listings: a re-run must see parts written since the filesystem was created.
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
    fs, path = url_to_fs(url, **options)
    return Storage(fs), path.rstrip("/")


# botocore settings for pre-flight requests (pipeline/preflight.py): one attempt, short timeouts, so an endpoint
# nobody listens on is reported in seconds, not after botocore's and s3fs's retries (15 s and more). The run's
# own requests keep the retries: by then the store is known to be there, and a fault is likely transient.
PROBE_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1}}


def probe_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`storage_options` for one quick pre-flight request to `url`: botocore's retries capped on S3."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        options["config_kwargs"] = {**options.get("config_kwargs", {}), **PROBE_CONFIG}
    return options


TRANSIENT = (OSError, TimeoutError, ConnectionError)
# A local file still being written is `<final name>.fluxbatch-tmp-<pid>-<8 hex>` (schemas/layout.py TMP_NAME);
# `os.replace` gives it its final name once whole. Only fluxbatch's own such files are ever swept
# (pipeline/store/ownership.py): a user's `thesis.tmp-final.docx` is not a temp file of ours.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceLeftError(FluxbatchError):
    """The disk under OUTPUT is full (or over quota). Not a usage mistake: the run had started, so exit code 1."""

    exit_code = 1


class StorageError(FluxbatchError):
    """Storage refused an operation or could not be reached: the message names the URL, the operation (read or
    write) and what to do. Made from the library's error by `storage_error`, the one place that translates them."""


class StoreFailingError(StorageError):
    """A storage operation still failed after every retry (500s, dropped connections): one line, not the library's
    traceback. Exit code 1: not a mistake in the command, and a run may have been under way."""

    exit_code = 1


# Local errors a user fixes by choosing another path or changing permissions; their strerror says which.
_LOCAL_REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)


def storage_error(error: BaseException, what: str) -> StorageError | None:
    """The one-line `StorageError` for a storage failure a user can act on, or None for any other error.

    `what` is the operation and its URL ("write s3://bucket/run/x"). botocore's classes are matched by name,
    so this module imports no AWS library. A missing file stays FileNotFoundError (callers test for it); a
    missing bucket does not.
    """
    names = {cls.__name__ for cls in type(error).__mro__}
    cause = error.__cause__ or error.__context__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    verb, _, target = what.partition(" ")
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageError(
            f"no AWS credentials to {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or pass --storage-option key=... --storage-option secret=... (anon=true for a public bucket)")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ClientConnectorError"}:
        url = urlsplit(getattr(error, "kwargs", {}).get("endpoint_url") or "")  # the request's URL: keep the host
        host = url.netloc.rsplit("@", 1)[-1]  # never a user:password written into the URL
        endpoint = f"{url.scheme}://{host}" if host else "the storage endpoint"
        return StorageError(
            f"cannot reach {endpoint} to {what} ({type(error).__name__}): is the endpoint up and its address "
            "right? It comes from AWS_ENDPOINT_URL or --storage-option endpoint_url=...")
    if isinstance(error, FileNotFoundError) and (code == "NoSuchBucket" or "bucket does not exist" in str(error)):
        bucket = target.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"bucket {bucket!r} does not exist (to {what}): create it, or correct the URL")
    if isinstance(error, PermissionError):
        if "://" in target:  # s3fs maps 403 AccessDenied / Forbidden to PermissionError
            reason = code if code and not code.isdigit() else "Forbidden"  # a HEAD's 403 has no code but "403"
            return StorageError(
                f"access denied (403 {reason}) to {what}: the credentials in use may not {verb} "
                "there; check the key, its policy and the bucket's policy")
        return StorageError(f"permission denied to {what}: {error.strerror or error}; choose a path you may "
                            f"{verb}, or change its permissions")
    if isinstance(error, OSError) and error.errno in _LOCAL_REFUSALS:
        return StorageError(f"cannot {what}: {error.strerror}"
                            + (f" ({error.filename})" if error.filename and str(error.filename) not in what else ""))
    return None


def _with_retries(action: Callable[[], T], what: str, tries: int, base_delay: float = 0.2) -> T:
    """Run a storage action, retrying transient faults with exponential backoff and full jitter.

    A failure a user can act on (no credentials, endpoint down, no bucket, access denied) comes out as one
    `StorageError` naming `what` (see `storage_error`); anything else as the library raised it.
    """
    for attempt in range(1, tries + 1):
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            translated = storage_error(error, what)
            if translated is not None:
                raise translated from error
            raise
        except TRANSIENT as error:
            refused = isinstance(error, OSError) and error.errno in _LOCAL_REFUSALS  # a read-only disk stays one
            if attempt == tries or refused:
                translated = storage_error(error, what)
                if translated is not None:
                    raise translated from error
                if refused:
                    raise
                raise StoreFailingError(
                    f"{what} failed {tries} times ({first_line(error, typed=True)}): the store is failing or "
                    "overloaded; run again once it answers (what was committed is kept)") from error
            delay = random.uniform(0, base_delay * 2 ** (attempt - 1))
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(error).__name__, error,
                        attempt, tries - 1, delay)
            time.sleep(delay)
        except Exception as error:  # botocore's own classes (no credentials, endpoint down) are no OSError
            translated = storage_error(error, what)
            if translated is not None:
                raise translated from error
            raise
    raise AssertionError("unreachable")


class Storage:
    """A filesystem (local disk or an object store) whose every operation retries transient faults with backoff
    and turns a failure the user can act on into one `StorageError`: no call site can forget either.

    Made by `filesystem(url, options)`. Method names and paths are fsspec's; each message names the operation and
    the URL ("read s3://bucket/run/_job.json"). `fs` is the fsspec filesystem underneath, for what only one
    store offers (the lease's conditional puts on S3), called through `retry`.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, tries: int = 6):
        self.fs, self.tries = fs, tries  # tries=1: pre-flight's first request, reported at once
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.protocols: tuple[str, ...] = tuple(protocols)
        self.protocol = self.protocols[0]
        self.local = self.protocol in ("file", "local")

    def uri(self, path: str) -> str:
        """A full URL for a path (a local path stays as it is), as the metadata's image_uri and messages show it."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def retry(self, action: Callable[[], T], what: str) -> T:
        """Run `action` (a call on `fs`), retrying transient faults; `what` is the operation and its URL."""
        return _with_retries(action, what, self.tries)

    def read_bytes(self, path: str) -> bytes:
        return self.retry(lambda: self.fs.cat_file(path), f"read {self.uri(path)}")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write one object whole: a single put on object stores, write-then-rename on local disk.

        A local write that fails for any reason removes its temp file and re-raises; a full disk raises
        `NoSpaceLeftError` naming the path. Only a killed process leaves a temp file (swept by the next run).
        """
        if not self.local:
            self.retry(lambda: self.fs.pipe_file(path, data), f"write {self.uri(path)}")
            return
        tmp = f"{path}{TMP_MARK}{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException as error:  # also KeyboardInterrupt: a half-written file must not stay behind
            with contextlib.suppress(OSError):  # not there, or its folder could not be made
                os.unlink(tmp)
            if isinstance(error, OSError) and error.errno in NO_SPACE:
                raise NoSpaceLeftError(
                    f"no space left on device writing {path}: free space there (or choose another OUTPUT) "
                    "and run again; images already committed stay, the rest render then") from error
            translated = storage_error(error, f"write {path}") if isinstance(error, Exception) else None
            if translated is not None:
                raise translated from error
            raise

    def put_file(self, local_path: str, path: str) -> None:
        """Upload a local file (a finished shard) to `path`."""
        self.retry(lambda: self.fs.put_file(local_path, path), f"write {self.uri(path)}")

    def exists(self, path: str) -> bool:
        return self.retry(lambda: self.fs.exists(path), f"read {self.uri(path)}")

    def isfile(self, path: str) -> bool:
        return self.retry(lambda: self.fs.isfile(path), f"read {self.uri(path)}")

    def isdir(self, path: str) -> bool:
        return self.retry(lambda: self.fs.isdir(path), f"read {self.uri(path)}")

    def info(self, path: str, refresh: bool = False) -> dict[str, Any]:
        """fsspec's info; `refresh` asks the store again (the lease's ETag), where the store caches."""
        options = {"refresh": True} if refresh else {}
        return self.retry(lambda: self.fs.info(path, **options), f"read {self.uri(path)}")

    def ls(self, path: str) -> list[str]:
        """The paths directly inside a folder."""
        return self.retry(lambda: self.fs.ls(path, detail=False), f"list {self.uri(path)}")

    def find(self, path: str, detail: bool = False) -> Any:
        """Every file under a folder: paths, or (detail) a mapping of path to info."""
        return self.retry(lambda: self.fs.find(path, detail=detail), f"list {self.uri(path)}")

    def glob(self, pattern: str, detail: bool = False) -> Any:
        return self.retry(lambda: self.fs.glob(pattern, detail=detail), f"list {self.uri(pattern)}")

    def rm_file(self, path: str) -> None:
        self.retry(lambda: self.fs.rm_file(path), f"remove {self.uri(path)}")

    def rm_files(self, paths: list[str]) -> None:
        """Remove many files: on object stores in batched requests (S3's DeleteObjects takes 1,000 keys), on local
        disk one by one."""
        if self.local:
            for path in paths:
                self.rm_file(path)
        elif paths:
            self.retry(lambda: self.fs.rm(paths), f"remove {len(paths)} objects under {self.uri(paths[0])}")

    def rmdir(self, path: str) -> None:
        self.retry(lambda: self.fs.rmdir(path), f"remove {self.uri(path)}")

    def makedirs(self, path: str) -> None:
        """Make a folder and its parents if missing (local disk; object stores have no folders)."""
        self.retry(lambda: self.fs.makedirs(path, exist_ok=True), f"write {self.uri(path)}")

    def mv(self, path: str, target: str) -> None:
        self.retry(lambda: self.fs.mv(path, target), f"move {self.uri(path)} to {self.uri(target)}")

    def copy(self, path: str, target: str) -> None:
        self.retry(lambda: self.fs.copy(path, target), f"copy {self.uri(path)} to {self.uri(target)}")
