"""`--storage-option KEY=VALUE` flags, checked before any storage is asked: each mistake is one line naming the flag.

`parse_storage_options` turns the flags into fsspec options (a dotted KEY nests, `endpoint_url` moves into
`client_kwargs`) for every URL of the job. A key that is empty, or given both a value and nested keys, would end
that parsing in a TypeError; on s3:// a name that s3fs, its botocore session or botocore's Config does not take
would fail at the first request, in a traceback. Here each is refused before anything is read or written. The other
file systems (local disk, http) take any option and ignore those that are not theirs: the options reach every
URL of a job, its manifest, OUTPUT and reference images alike.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from typing import Any

from jobs.errors import UsageError
from schemas.errors import first_line

HOW = "write KEY=VALUE (nested: client_kwargs.region_name=VALUE)"
BOTH = "an option takes a value or nested keys, not both"
S3 = ("s3://", "s3a://")


def check_storage_options(pairs: list[str], urls: list[str | None]) -> None:
    """Raise UsageError naming the first of `pairs` (the flags' KEY=VALUE) that parsing them, or the file system of
    one of `urls`, would refuse."""
    typed: dict[str, str] = {}  # each dotted key as parse_storage_options nests it -> the flag as typed
    for pair in pairs:
        key = pair.split("=", 1)[0]
        flag = f"--storage-option {pair}"
        if not key:
            raise UsageError(f"{flag}: the key is empty; {HOW}")
        if "" in key.split("."):
            raise UsageError(f"{flag}: the key has an empty part; {HOW}")
        dotted = "client_kwargs.endpoint_url" if key == "endpoint_url" else key
        for other, other_flag in typed.items():
            if dotted.startswith(f"{other}."):
                raise UsageError(f"{flag}: {other} is also set to a value ({other_flag}); {BOTH}")
            if other.startswith(f"{dotted}."):
                raise UsageError(f"{flag}: {dotted} also has nested keys ({other_flag}); {BOTH}")
        typed[dotted] = flag
    if pairs and any(url and url.startswith(S3) for url in urls):
        _check_s3(typed)


def _check_s3(typed: dict[str, str]) -> None:
    """What s3fs hands its options to, made here as it makes them at its first request (no request is sent)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession
    from botocore.config import Config
    from s3fs import S3FileSystem

    options = parse_storage_options([flag.removeprefix("--storage-option ") for flag in typed.values()])
    parameters = _parameters(S3FileSystem)
    for name, value in options.items():
        if name.endswith("_kwargs") and name in parameters and not isinstance(value, dict):
            raise UsageError(f"{typed[name]}: {name} takes nested keys for s3:// ({name}.KEY=VALUE)")
    try:
        fs = S3FileSystem(**{**options, "skip_instance_cache": True})
    except Exception as error:  # noqa: BLE001 - s3fs checks a few values itself (key and username, ...)
        raise UsageError(f"--storage-option: s3fs refuses these options: {first_line(error, typed=True)}") from None
    refused = _refused(lambda: AioSession(**fs.kwargs))
    if refused is not None:
        known = parameters | _parameters(AioSession)
        raise UsageError(f"{typed.get(refused, '--storage-option')}: s3:// (s3fs) takes no option {refused!r}"
                         f"{_near(refused, known)}")
    refused = _refused(lambda: AioConfig(**fs.config_kwargs))
    if refused is not None:
        known = set(Config.OPTION_DEFAULTS) | _parameters(AioConfig)
        flag = typed.get(f"config_kwargs.{refused}", "--storage-option")
        raise UsageError(f"{flag}: botocore's Config takes no option {refused!r}{_near(refused, known)}")


def _refused(make: Any) -> str | None:
    """The keyword argument `make()` refuses (by its TypeError), or None."""
    try:
        make()
    except TypeError as error:
        found = re.search(r"unexpected keyword argument '([^']*)'", str(error))
        if found:
            return found.group(1)
        raise
    return None


def _parameters(callable_: Any) -> set[str]:
    signature = inspect.signature(callable_.__init__)
    return {name for name, parameter in signature.parameters.items()
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}


def _near(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
