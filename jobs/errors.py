"""The exceptions a user can act on; the CLI prints them as one line instead of a traceback.

Every fluxbatch error a user can fix subclasses `schemas.errors.FluxbatchError`; the two OS errors are
the ones a mistyped path or a missing permission raise from the standard library.
"""

from __future__ import annotations

from schemas.errors import FluxbatchError

USER_ERRORS: tuple[type[BaseException], ...] = (
    FluxbatchError,
    FileNotFoundError,
    PermissionError,
)


class UsageError(FluxbatchError):
    """A command line that lacks something it needs (MANIFEST, OUTPUT) and no job file gives it."""
