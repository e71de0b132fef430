"""`FluxbatchError`: the one base class of every mistake a user can act on.

The CLI catches it once (`jobs.cli.main`) and prints its message as one line, exit code 2; `-v` shows the
traceback. A subclass per kind of failure keeps `except` clauses precise for Python API callers.
"""

from __future__ import annotations


class FluxbatchError(Exception):
    """A user-facing error: the message names the thing at fault and what to do."""
