"""What a URL in a spec must be before any storage is asked: a protocol fsspec knows and can load, a bucket or
host after `://`, and (a manifest) a glob that fsspec can read.

Each mistake here would surface as fsspec's traceback at the first request; as a validator of the spec's
field it is one line naming the flag or the file and the field (schemas/overrides.py), before anything is
written, wherever the spec is loaded (`render`, `validate`, `fluxbatch k8s`, the Python API). Nothing is
asked of the storage itself: that is the pre-flight's (pipeline/preflight.py).
"""

from __future__ import annotations

import difflib
import re

from fsspec.registry import get_filesystem_class, known_implementations, registry
from fsspec.utils import glob_translate

GLOB_CHARACTERS = "*?["  # as pipeline/manifest.py tells a glob from a path
LOCAL = ("file", "local")
# The protocols a near miss is compared with ("s4" -> s3): the common ones, not fsspec's long tail of names.
SUGGESTED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "file", "hf", "sftp")


def storage_url(url: str, named: bool = False) -> str:
    """`url` if its file system can be made; else ValueError saying what to change (a validator's error), with the
    URL in it if `named` (an item of a list, which the error's flag or field does not show alone)."""
    if "::" in url:  # a chained URL (simplecache::s3://...): fsspec unchains it, and reports its own mistakes
        return url
    protocol, separator, rest = url.partition("://")
    if not separator or "/" in protocol:  # a local path, absolute or relative
        return url
    at = f" in {url!r}" if named else ""
    if protocol not in known_implementations and protocol not in registry:
        near = difflib.get_close_matches(protocol.lower(), SUGGESTED, n=1, cutoff=0.5)
        raise ValueError(f"unknown protocol {protocol!r}{at}" + (f" (did you mean {near[0]}://?)" if near else ""))
    try:
        get_filesystem_class(protocol)  # imports the package that implements it (s3fs for s3://)
    except ImportError as error:
        raise ValueError(f"the protocol {protocol!r}{at} needs a package that is not installed ({error})") from None
    if protocol not in LOCAL and not rest.split("/", 1)[0]:
        raise ValueError(f"no bucket or host after '{protocol}://'{at}")
    return url


def manifest_url(url: str) -> str:
    """A manifest's URL: `storage_url`'s rules, and a glob fsspec can read (`**` a whole path component)."""
    storage_url(url)
    if any(mark in url for mark in GLOB_CHARACTERS):
        try:
            glob_translate(url)
        except ValueError:
            raise ValueError("'**' in a glob must be a whole path component" + _whole(url)) from None
    return url


def _whole(glob: str) -> str:
    """" (did you mean ...?)" with each `**` made a path component of its own, if that glob reads."""
    fixed = re.sub(r"\*\*(?=[^/])", "**/*", re.sub(r"(?<=[^/*])\*\*", "*/**", glob))
    try:
        glob_translate(fixed)
    except ValueError:
        return ""
    return f" (did you mean {fixed!r}?)"

