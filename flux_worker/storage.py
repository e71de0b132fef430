"""Read and write OUTPUT and manifests through fsspec, with retries for transient storage faults.

pyarrow's own S3 filesystem ignores `AWS_ENDPOINT_URL`, so every byte goes through fsspec (s3fs honours
it). Storage options may hold credentials: they are passed around, never logged or written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from schemas.errors import FluxbatchError

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


def add_storage_option_flag(parser: argparse.ArgumentParser) -> None:
    """The `--storage-option KEY=VALUE` flag of every command that reads or writes storage."""

    def key_value(text: str) -> str:
        if "=" not in text:
            raise argparse.ArgumentTypeError(f"{text!r}: expected key=value, e.g. endpoint_url=http://host:9000")
        return text

    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="fsspec option for the input and output files, e.g. endpoint_url=http://host:9000 "
                             "(repeatable)")


def apply_storage_options(spec: Any, pairs: list[str]) -> Any:
    """Merge `--storage-option key=value` flags into a spec's input and output storage options; returns it."""
    options = parse_storage_options(pairs)
    if options:
        spec.storage_options = {**spec.storage_options, **options}
        spec.output.storage_options = {**spec.output.storage_options, **options}
    return spec


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """Turn `key=value` flags into fsspec options; `client_kwargs.endpoint_url=...` nests with dots."""
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--storage-option {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        node = options
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    if "endpoint_url" in options:  # s3fs takes the endpoint inside client_kwargs
        options.setdefault("client_kwargs", {})["endpoint_url"] = options.pop("endpoint_url")
    return options


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `url` and the path inside it, with no instance caching across options."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        # Fresh listings: a re-run must see parts written since the filesystem was created.
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
    fs, path = url_to_fs(url, **options)
    return fs, path.rstrip("/")


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


def uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for a path, for the metadata's image_uri."""
    protocol = protocol_of(fs)
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


TRANSIENT = (OSError, TimeoutError, ConnectionError)
# A local file still being written is `<final name>.fluxbatch-tmp-<pid>-<8 hex>`; `os.replace` gives it its final
# name once whole. Only names matching TMP_NAME exactly, and only in fluxbatch's own folders, are ever swept
# (pipeline/ownership.py): a user's `thesis.tmp-final.docx` is not a temp file of ours.
TMP_MARK = ".fluxbatch-tmp-"
TMP_NAME = re.compile(r".+\.fluxbatch-tmp-[0-9]+-[0-9a-f]{8}")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceLeftError(FluxbatchError):
    """The disk under OUTPUT is full (or over quota). Not a usage mistake: the run had started, so exit code 1."""

    exit_code = 1


def is_temp_name(name: str) -> bool:
    """Whether a file name (no folder) is one of `write_bytes`'s temp files."""
    return TMP_NAME.fullmatch(name) is not None


def with_retries(action: Callable[[], T], what: str, tries: int = 6, base_delay: float = 0.2) -> T:
    """Run a storage action, retrying transient faults with exponential backoff and full jitter."""
    for attempt in range(1, tries + 1):
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except TRANSIENT as error:
            if attempt == tries:
                raise
            delay = random.uniform(0, base_delay * 2 ** (attempt - 1))
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(error).__name__, error,
                        attempt, tries - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object whole: a single put on object stores, write-then-rename on local disk.

    A local write that fails for any reason removes its temp file and re-raises; a full disk raises
    `NoSpaceLeftError` naming the path. Only a killed process leaves a temp file (swept by the next run).
    """
    if protocol_of(fs) in ("file", "local"):
        tmp = f"{path}{TMP_MARK}{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException as error:  # also KeyboardInterrupt: a half-written file must not stay behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(error, OSError) and error.errno in NO_SPACE:
                raise NoSpaceLeftError(
                    f"no space left on device writing {path}: free space there (or choose another OUTPUT) "
                    "and run again; images already committed stay, the rest render then") from error
            raise
        return
    with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return with_retries(lambda: fs.cat_file(path), f"read {path}")
