"""`FluxbatchError`: the one base class of every mistake a user can act on.

The CLI catches it once (`jobs.cli.main`) and prints its message as one line, exit code 2; `-v` shows the
traceback. A subclass per kind of failure keeps `except` clauses precise for Python API callers.
"""

from __future__ import annotations


class FluxbatchError(Exception):
    """A user-facing error: the message names the thing at fault and what to do."""

    # True when `pipeline.render` raised it before anything was under way, leaving OUTPUT as it was.
    refused: bool = False


def first_line(error: BaseException, *, typed: bool = False) -> str:
    """The first line of an error's message (a library's can run to pages), or its type's name when it has none.

    One-line errors and failure rows keep only this. `typed` puts the type's name in front: "OSError: disk full".
    """
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    name = type(error).__name__
    if typed:
        return f"{name}: {line}" if line else name
    return line or name
